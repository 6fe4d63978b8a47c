"""Speed of the sparse blocks against transformers' Mixtral block and a dense SwiGLU floor (same run, same weights).

The ratios are what matter: every row is timed in the same process on the same inputs, and each number is the
median of `repeats` timed calls after a warm-up call.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from .modeling import MHMoeConfig, MoeConfig, SwitchConfig, mh_moe_matched_config
from .modeling.modeling_hf_moe import MHMoeSparseBlock, MoeMLP, MoeSparseBlock


@dataclass
class SparseBlockBenchmarkArguments:
    hidden_size: int = field(default=1024, metadata={"help": "model width d"})
    moe_intermediate_size: int = field(default=2816, metadata={"help": "inner size of one expert"})
    num_experts: int = field(default=8, metadata={"help": "experts E"})
    num_experts_per_tok: int = field(default=2, metadata={"help": "top-k of the MoE block"})
    num_tokens: int = field(default=4096, metadata={"help": "tokens per forward call (batch x sequence)"})
    num_moe_heads: int = field(default=4, metadata={"help": "h of the MH-MoE block (FLOPs-matched to the MoE)"})
    switch_capacity_factor: float = field(default=1.25, metadata={"help": "training capacity factor of Switch"})
    repeats: int = field(default=5, metadata={"help": "timed calls per row; the median is reported"})
    dtype: str = field(default="float32", metadata={"help": "float32 or bfloat16"})
    seed: int = field(default=0)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_block(block: nn.Module, hidden: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(forward seconds in eval mode without grad, forward+backward seconds in training mode)."""

    def forward():
        with torch.no_grad():
            block(hidden)

    def forward_backward():
        block.zero_grad(set_to_none=True)
        block(hidden.requires_grad_()).sum().backward()

    block.eval()
    forward_seconds = median_seconds(forward, repeats)
    block.train()
    return forward_seconds, median_seconds(forward_backward, repeats)


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return module


def benchmark_sparse_blocks(args: SparseBlockBenchmarkArguments) -> list[dict]:
    """Time each block; return rows with seconds and ratios to the dense floor and to the Mixtral block."""
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    d, inner, experts, k = args.hidden_size, args.moe_intermediate_size, args.num_experts, args.num_experts_per_tok
    hidden = torch.randn(1, args.num_tokens, d, dtype=dtype)
    shared = dict(hidden_size=d, num_attention_heads=max(1, d // 64), moe_intermediate_size=inner,
                  num_experts=experts, experts_implementation="eager", router_aux_loss_coef=0.0)

    moe_config = MoeConfig(**shared, num_experts_per_tok=k)
    switch_config = SwitchConfig(**shared, capacity_factor=args.switch_capacity_factor)
    mh_config = mh_moe_matched_config(moe_config, num_moe_heads=args.num_moe_heads)
    mh_config = MHMoeConfig(**{**mh_config.to_dict(), "experts_implementation": "eager"})

    def mixtral(top_k: int) -> MixtralSparseMoeBlock:
        config = MixtralConfig(hidden_size=d, intermediate_size=inner, num_local_experts=experts,
                               num_experts_per_tok=top_k)
        config._experts_implementation = "grouped_mm"  # transformers' default experts backend
        return MixtralSparseMoeBlock(config)

    def dense_floor(active_inner: int) -> MoeMLP:
        return MoeMLP(moe_config, d, active_inner)

    cases = [
        (f"hf_moe top-{k}", MoeSparseBlock(moe_config), mixtral(k), k * inner),
        (f"hf_switch top-1, capacity {args.switch_capacity_factor}", MoeSparseBlock(switch_config), mixtral(1),
         inner),
        (f"hf_mh_moe h={args.num_moe_heads}, top-{mh_config.num_experts_per_tok} of {mh_config.num_experts}, "
         f"expert {mh_config.moe_intermediate_size}", MHMoeSparseBlock(mh_config), None, k * inner),
    ]
    rows = []
    for name, block, reference, active_inner in cases:
        block = _randomize(block, args.seed).to(dtype)
        floor_fwd, floor_fb = _time_block(_randomize(dense_floor(active_inner), args.seed).to(dtype), hidden,
                                          args.repeats)
        fwd, fb = _time_block(block, hidden, args.repeats)
        row = dict(block=name, forward_s=fwd, forward_backward_s=fb, dense_forward_s=floor_fwd,
                   dense_forward_backward_s=floor_fb, vs_dense_forward=fwd / floor_fwd,
                   vs_dense_forward_backward=fb / floor_fb)
        if reference is not None:
            reference = reference.to(dtype)
            reference.load_state_dict(block.state_dict(), strict=False)
            ref_fwd, ref_fb = _time_block(reference, hidden, args.repeats)
            row.update(mixtral_forward_s=ref_fwd, mixtral_forward_backward_s=ref_fb,
                       vs_mixtral_forward=fwd / ref_fwd, vs_mixtral_forward_backward=fb / ref_fb)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows (seconds and ratios; lower is better)."""

    def ratio(row, key):
        return f"{row[key]:.2f}x" if key in row else "n/a"

    lines = [
        "| block | fwd s | fwd+bwd s | fwd vs dense | fwd+bwd vs dense | fwd vs Mixtral | fwd+bwd vs Mixtral |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['block']} | {row['forward_s']:.3f} | {row['forward_backward_s']:.3f} | "
            f"{ratio(row, 'vs_dense_forward')} | {ratio(row, 'vs_dense_forward_backward')} | "
            f"{ratio(row, 'vs_mixtral_forward')} | {ratio(row, 'vs_mixtral_forward_backward')} |"
        )
    return "\n".join(lines)
