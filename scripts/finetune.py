"""`python scripts/finetune.py MODEL_PATH [options]`: the same as `hf-moe finetune` (options: `--help`)."""

import sys

from hf_moe.cli import main

if __name__ == "__main__":
    main(["finetune", *sys.argv[1:]])
