"""Import times of hf_moe's entry points against transformers' own, each in a fresh process, interleaved rounds,
median wall time and the ratio to the reference (the first row) measured in the same run.

    .venv/bin/python scripts/benchmark_startup.py --rounds 7
"""

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from transformers import HfArgumentParser

STATEMENTS = {
    "reference": "from transformers import Trainer",
    "callback": "from hf_moe.training import ExpertStatsCallback",
    "training": "import hf_moe.training",
    "hf_moe": "import hf_moe",
    "auto": "from transformers import AutoModelForCausalLM",
}


@dataclass
class StartupArguments:
    rounds: int = field(default=7, metadata={"help": "fresh processes per statement (interleaved)"})


def seconds_to_run(statement: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    (args,) = HfArgumentParser(StartupArguments).parse_args_into_dataclasses()
    seconds = {name: [] for name in STATEMENTS}
    for _ in range(args.rounds):
        for name, statement in STATEMENTS.items():
            seconds[name].append(seconds_to_run(statement))
    reference = statistics.median(seconds["reference"])
    print(f"| statement | median of {args.rounds} | vs `{STATEMENTS['reference']}` |\n|---|---|---|")
    for name, statement in STATEMENTS.items():
        median = statistics.median(seconds[name])
        print(f"| `{statement}` | {median:.2f} s | {median / reference:.2f}x |")


if __name__ == "__main__":
    main()
