"""Benchmark the sparse blocks: `python scripts/benchmark.py [--num_tokens 4096 --repeats 5 ...]`.

Prints a Markdown table of median seconds and ratios against transformers' Mixtral block (its default `grouped_mm`
experts backend) and against a dense SwiGLU MLP with the same active FLOPs.
"""

import json

import torch
from transformers import HfArgumentParser

from hf_moe.benchmark import SparseBlockBenchmarkArguments, benchmark_sparse_blocks, format_table


def main() -> None:
    (args,) = HfArgumentParser(SparseBlockBenchmarkArguments).parse_args_into_dataclasses()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args}")
    rows = benchmark_sparse_blocks(args)
    print(format_table(rows))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
