"""`hf-moe`: the command line. Each subcommand parses its arguments dataclass with `HfArgumentParser` and calls the
library; `hf-moe SUBCOMMAND --help` lists the options."""

import json
import sys

from transformers import HfArgumentParser


def _demo(args) -> None:
    from .demo import run_demo

    for row in run_demo(args):
        print(json.dumps(row))


def _benchmark(args) -> None:
    from .benchmark import benchmark_sparse_blocks, format_table

    print(format_table(benchmark_sparse_blocks(args)))


def _commands() -> dict:
    from .benchmark import SparseBlockBenchmarkArguments
    from .demo import DemoArguments

    return {
        "demo": (DemoArguments, _demo, "build, save, reload as remote code and generate, for each architecture"),
        "benchmark": (SparseBlockBenchmarkArguments, _benchmark, "time the sparse blocks against references"),
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
    (args,) = parser.parse_args_into_dataclasses(args=argv[1:])
    run(args)


if __name__ == "__main__":
    main()
