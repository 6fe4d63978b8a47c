"""`python scripts/evaluate_model.py MODEL_PATH [options]`: the same as `hf-moe evaluate` (options: `--help`)."""

import sys

from hf_moe.cli import main

if __name__ == "__main__":
    main(["evaluate", *sys.argv[1:]])
