"""Upcycle a dense checkpoint: `python scripts/upcycle.py [SOURCE] [OUTPUT_DIR] --arch hf_moe --num_experts 8 ...`.

The same as `hf-moe upcycle` (options: `--help`); without SOURCE the embedded SmolLM2-135M-Instruct is used.
"""

import sys

from hf_moe.cli import main

if __name__ == "__main__":
    main(["upcycle", *sys.argv[1:]])
