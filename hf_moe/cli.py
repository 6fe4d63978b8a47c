"""`hf-moe`: the command line. Each subcommand parses its arguments dataclass with `HfArgumentParser` and calls the
library; `hf-moe SUBCOMMAND --help` lists the options."""

import json
import sys

from transformers import HfArgumentParser

POSITIONALS = {"upcycle": ("source", "output_dir"), "export": ("source", "output_dir"), "finetune": ("model_path",),
               "evaluate": ("model_path",), "check": ("folder",), "publish": ("folder", "repo_id")}


def _demo(args) -> None:
    from .demo import run_demo

    for row in run_demo(args):
        print(json.dumps(row))


def _benchmark(args) -> None:
    from .benchmark import (
        DecodeBenchmarkArguments,
        benchmark_decoding,
        benchmark_sparse_blocks,
        format_decoding_table,
        format_table,
    )

    print(format_table(benchmark_sparse_blocks(args)))
    if args.decode:
        decode_args = DecodeBenchmarkArguments(new_tokens=args.decode_new_tokens, repeats=args.repeats,
                                               model_types=args.decode_model_types, seed=args.seed)
        print()
        print(format_decoding_table(benchmark_decoding(decode_args)))


def _upcycle(args) -> None:
    from .upcycling import open_dense_checkpoint, run_upcycle, verify_upcycling

    dense = open_dense_checkpoint(args.source, args.gguf_file)  # opened (and a GGUF dequantised) once
    folder = run_upcycle(args, dense)
    print(f"upcycled model written to {folder}")
    if args.verify and args.experts:  # a mix is not the dense function: report how its routers sort the domains
        print((folder / "mixing.json").read_text())
    elif args.verify:
        report = verify_upcycling(dense, folder)
        for sample in report.pop("samples"):
            print(json.dumps(sample, ensure_ascii=False))
        print(json.dumps(report))


def _export(args) -> None:
    from .export import run_export, verify_export

    folder = run_export(args)
    print(f"exported model written to {folder}")
    if args.verify:
        report = verify_export(args.source, folder)
        for sample in report.pop("samples"):
            print(json.dumps(sample, ensure_ascii=False))
        print(json.dumps(report))


def _finetune(args, training_args) -> None:
    from .training import run_finetune

    print(f"fine-tuned model written to {run_finetune(args, training_args)}")


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


def _benchmark_export(args) -> None:
    from .export.benchmark import benchmark_export

    print(json.dumps(benchmark_export(args), indent=1))


def _check(args) -> None:
    from .hub import check_folder

    problems = check_folder(args.folder, load=not args.skip_load_check)
    for problem in problems:
        print(problem)
    if any(problem.severity == "error" for problem in problems):
        raise SystemExit(1)
    print(f"{args.folder}: ready to publish")


def _publish(args) -> None:
    from dataclasses import asdict

    from .hub import publish

    result = publish(**asdict(args))
    if args.dry_run:
        print("would upload:\n" + "\n".join(f"  {name}" for name in result.files))
        print("left out:\n" + "\n".join(f"  {name}" for name in result.left_out))
        print("card metadata:\n" + json.dumps(result.metadata, indent=1))
    else:
        print(f"published {len(result.files)} files to https://huggingface.co/{result.repo_id}: {result.commit_url}")


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
    from .export import ExportArguments
    from .export.benchmark import ExportBenchmarkArguments
    from .hub.check import CheckArguments
    from .hub.publish import PublishArguments
    from .training import EvaluateArguments, FinetuneArguments, FinetuneTrainingArguments
    from .training.replication import ReplicationArguments
    from .upcycling import UpcycleArguments
    from .upcycling.benchmark import UpcycleBenchmarkArguments

    return {
        "upcycle": (UpcycleArguments, _upcycle, "[SOURCE] [OUTPUT_DIR]: dense Llama-family checkpoint -> MoE "
                    "(no SOURCE: the embedded SmolLM2-135M-Instruct)"),
        "export": (ExportArguments, _export, "FOLDER OUTPUT --to auto|mixtral|qwen2_moe|qwen3_moe: the same model as "
                   "a native checkpoint for stock transformers (or a refusal naming why)"),
        "demo": (DemoArguments, _demo, "build, save, reload as remote code and generate, for each architecture"),
        "finetune": ((FinetuneArguments, FinetuneTrainingArguments), _finetune, "MODEL_PATH: instruction-tune with "
                     "the MoE callbacks; also every TrainingArguments option (default data: the embedded task mixture)"),
        "evaluate": (EvaluateArguments, _evaluate, "MODEL_PATH: perplexity, exact match per task family, "
                     "expert specialisation"),
        "replicate": (ReplicationArguments, _replicate, "dense vs upcycled MoE vs upcycled Switch, equal steps on "
                      "the embedded mixture (SmolLM2 start)"),
        "check": (CheckArguments, _check, "FOLDER: is the model folder ready for the Hub? one line per problem"),
        "publish": (PublishArguments, _publish, "FOLDER REPO_ID: check, then upload the allow-listed files "
                    "(--dry-run: list them)"),
        "benchmark": (SparseBlockBenchmarkArguments, _benchmark, "time the sparse blocks against references"),
        "benchmark-stats": (StatsOverheadArguments, _benchmark_stats,
                            "training-step time with and without the expert-statistics hooks"),
        "benchmark-upcycle": (UpcycleBenchmarkArguments, _benchmark_upcycle,
                              "time and peak memory: streaming upcycling vs in-memory expansion"),
        "benchmark-export": (ExportBenchmarkArguments, _benchmark_export,
                             "time and peak memory: streaming export vs load + save_pretrained"),
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = _commands()
    if not argv or argv[0] not in commands:
        listing = "\n".join(f"  {name:<10} {help_text}" for name, (_, _, help_text) in commands.items())
        print(f"usage: hf-moe {{{','.join(commands)}}} [options]\n\n{listing}", file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    run, arguments = parse_command(argv, commands)
    run(*arguments)


def parse_command(argv: list[str], commands: dict | None = None) -> tuple:
    """(the subcommand's function, its parsed argument dataclasses) for `argv` = [SUBCOMMAND, options...]."""
    arguments_classes, run, _ = (commands or _commands())[argv[0]]  # one dataclass or a tuple (finetune: + Training)
    parser = HfArgumentParser(arguments_classes, prog=f"hf-moe {argv[0]}")
    options = _with_positionals(argv[1:], POSITIONALS.get(argv[0], ()))
    return run, parser.parse_args_into_dataclasses(args=options)


if __name__ == "__main__":
    main()
