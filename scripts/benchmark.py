"""Benchmark the sparse blocks: `python scripts/benchmark.py [--num_tokens 4096 --repeats 5 ...]`.

The same as `hf-moe benchmark` (options: `--help`): a Markdown table of median seconds and ratios against
transformers' Mixtral block (its default `grouped_mm` experts backend) and a dense SwiGLU MLP with the same active
FLOPs.
"""

import sys

from hf_moe.cli import main

if __name__ == "__main__":
    main(["benchmark", *sys.argv[1:]])
