"""The sparse blocks of this checkout against those of another git revision: same weights, same inputs, interleaved
rounds in one process, median of the per-round time ratios (forward and forward + backward).

    .venv/bin/python scripts/benchmark_block_revision.py --revision 27dc298 --repeats 7

The revision's `modeling/` files are read with `git show` into a temporary package, so both versions load side by
side; its blocks get this checkout's weights (the state-dict names are the same).
"""

import importlib
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from hf_moe.modeling import MHMoeConfig, MoeConfig
from hf_moe.modeling import modeling_hf_moe as current
from hf_moe.recipes.benchmark_blocks import _forward, _forward_backward, paired_median_seconds

REPO = Path(__file__).resolve().parents[1]


@dataclass
class RevisionBenchmarkArguments:
    revision: str = field(default="HEAD", metadata={"help": "git revision whose blocks are the reference"})
    hidden_size: int = 512
    moe_intermediate_size: int = 1408
    num_experts: int = 8
    num_tokens: int = 2048
    repeats: int = field(default=7, metadata={"help": "timed rounds; the median per-round ratio is reported"})


def modeling_at(revision: str, scratch: Path):
    """The `modeling_hf_moe` module of `revision`, imported as the package `modeling_at_revision`."""
    package = scratch / "modeling_at_revision"
    package.mkdir()
    listed = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", f"{revision}:modeling"],
                            capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:modeling/{name}"],
                                capture_output=True, text=True, check=True).stdout
        (package / name).write_text(source)
    sys.path.insert(0, str(scratch))
    return importlib.import_module("modeling_at_revision.modeling_hf_moe")


def main() -> None:
    (args,) = HfArgumentParser(RevisionBenchmarkArguments).parse_args_into_dataclasses()
    shape = dict(hidden_size=args.hidden_size, moe_intermediate_size=args.moe_intermediate_size,
                 intermediate_size=args.moe_intermediate_size, num_experts=args.num_experts, num_experts_per_tok=2,
                 num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8, router_jitter_noise=0.0)
    rows = {"hf_moe top-2": (MoeConfig, "MoeSparseBlock", {}),
            "hf_moe expert choice": (MoeConfig, "MoeSparseBlock", {"router_type": "expert_choice"}),
            "hf_mh_moe top-2": (MHMoeConfig, "MHMoeSparseBlock", {"num_moe_heads": 4})}
    with tempfile.TemporaryDirectory() as scratch:
        previous = modeling_at(args.revision, Path(scratch))
        print(f"| block | forward vs {args.revision} | forward + backward vs {args.revision} |\n|---|---|---|")
        for name, (config_class, block_name, extra) in rows.items():
            torch.manual_seed(0)
            block = getattr(current, block_name)(config_class(**shape, **extra))
            reference = getattr(previous, block_name)(getattr(previous, config_class.__name__)(**shape, **extra))
            reference.load_state_dict(block.state_dict())
            hidden = torch.randn(args.num_tokens // 512, 512, args.hidden_size)
            ratios = []
            for make in (_forward, _forward_backward):
                seconds = paired_median_seconds({"now": make(block, hidden), "then": make(reference, hidden)},
                                                args.repeats)
                ratios.append(statistics.median(now / then for now, then in zip(seconds["now"], seconds["then"],
                                                                                 strict=True)))
            print(f"| {name} | {ratios[0]:.3f}x | {ratios[1]:.3f}x |")


if __name__ == "__main__":
    main()
