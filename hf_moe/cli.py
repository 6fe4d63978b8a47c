"""`hf-moe`: the command line. Each subcommand parses its arguments dataclass with `HfArgumentParser` and calls the
library; `hf-moe SUBCOMMAND --help` lists the options."""

import json
import sys

from transformers import HfArgumentParser

POSITIONALS = {"upcycle": ("source", "output_dir"), "finetune": ("model_path",), "evaluate": ("model_path",)}


def _demo(args) -> None:
    from .demo import run_demo

    for row in run_demo(args):
        print(json.dumps(row))


def _benchmark(args) -> None:
    from .benchmark import benchmark_sparse_blocks, format_table

    print(format_table(benchmark_sparse_blocks(args)))


def _upcycle(args) -> None:
    from .upcycling import open_dense_checkpoint, run_upcycle, verify_upcycling

    folder = run_upcycle(args)
    print(f"upcycled model written to {folder}")
    if args.verify and args.experts:  # a mix is not the dense function: report how its routers sort the domains
        print((folder / "mixing.json").read_text())
    elif args.verify:
        report = verify_upcycling(open_dense_checkpoint(args.source, args.gguf_file), folder)
        for sample in report.pop("samples"):
            print(json.dumps(sample, ensure_ascii=False))
        print(json.dumps(report))


def _finetune(args) -> None:
    from .training import run_finetune

    print(f"fine-tuned model written to {run_finetune(args)}")


def _evaluate(args) -> None:
    from .training import run_evaluate

    report = run_evaluate(args)
    report.pop("expert_specialisation", None)
    print(json.dumps(report, indent=1))


def _replicate(args) -> None:
    from .training.replication import format_rows, run_replication

    print(format_rows(run_replication(args)))


def _benchmark_stats(args) -> None:
    from .benchmark import benchmark_stats_overhead

    print(json.dumps(benchmark_stats_overhead(args), indent=1))


def _benchmark_upcycle(args) -> None:
    from .upcycling.benchmark import benchmark_upcycling

    print(json.dumps(benchmark_upcycling(args), indent=1))


def _with_positionals(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """`hf-moe upcycle SRC OUT --x 1` -> `--source SRC --output_dir OUT --x 1` (leading bare words only)."""
    result, index = [], 0
    while index < len(argv) and index < len(names) and not argv[index].startswith("-"):
        result += [f"--{names[index]}", argv[index]]
        index += 1
    return result + argv[index:]


def _commands() -> dict:
    from .benchmark import SparseBlockBenchmarkArguments, StatsOverheadArguments
    from .demo import DemoArguments
    from .training import EvaluateArguments, FinetuneArguments
    from .training.replication import ReplicationArguments
    from .upcycling import UpcycleArguments
    from .upcycling.benchmark import UpcycleBenchmarkArguments

    return {
        "upcycle": (UpcycleArguments, _upcycle, "[SOURCE] [OUTPUT_DIR]: dense Llama-family checkpoint -> MoE "
                    "(no SOURCE: the embedded SmolLM2-135M-Instruct)"),
        "demo": (DemoArguments, _demo, "build, save, reload as remote code and generate, for each architecture"),
        "finetune": (FinetuneArguments, _finetune, "MODEL_PATH: instruction-tune with the MoE callbacks "
                     "(default data: the embedded task mixture)"),
        "evaluate": (EvaluateArguments, _evaluate, "MODEL_PATH: perplexity, exact match per task family, "
                     "expert specialisation"),
        "replicate": (ReplicationArguments, _replicate, "dense vs upcycled MoE vs upcycled Switch, equal steps on "
                      "the embedded mixture (SmolLM2 start)"),
        "benchmark": (SparseBlockBenchmarkArguments, _benchmark, "time the sparse blocks against references"),
        "benchmark-stats": (StatsOverheadArguments, _benchmark_stats,
                            "training-step time with and without the expert-statistics hooks"),
        "benchmark-upcycle": (UpcycleBenchmarkArguments, _benchmark_upcycle,
                              "time and peak memory: streaming upcycling vs in-memory expansion"),
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = _commands()
    if not argv or argv[0] not in commands:
        listing = "\n".join(f"  {name:<10} {help_text}" for name, (_, _, help_text) in commands.items())
        print(f"usage: hf-moe {{{','.join(commands)}}} [options]\n\n{listing}", file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    arguments_class, run, _ = commands[argv[0]]
    parser = HfArgumentParser(arguments_class, prog=f"hf-moe {argv[0]}")
    options = _with_positionals(argv[1:], POSITIONALS.get(argv[0], ()))
    (args,) = parser.parse_args_into_dataclasses(args=options)
    run(args)


if __name__ == "__main__":
    main()
