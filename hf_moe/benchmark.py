"""Speed of the sparse blocks against transformers' Mixtral block and a dense SwiGLU floor (same run, same weights).

The ratios are what matter: every candidate is timed in the same process on the same inputs, interleaved round by
round, and each ratio is the median over `repeats` rounds of (block time / reference time) in that round.
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


def paired_median_seconds(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Time every candidate once per round, `repeats` rounds, after one warm-up round.

    Interleaving the candidates makes each round's ratios compare runs made under the same machine load, and the
    order rotates every round so no candidate always runs first; the caller takes medians of per-round ratios.
    """
    for fn in candidates.values():
        fn()
    seconds = {name: [] for name in candidates}
    names = list(candidates)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn = candidates[name]
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def _forward(block: nn.Module, hidden: torch.Tensor) -> Callable[[], None]:
    def run():
        block.eval()
        with torch.no_grad():
            block(hidden.clone())  # a copy: Mixtral's jitter scales its input in place

    return run


def _forward_backward(block: nn.Module, hidden: torch.Tensor) -> Callable[[], None]:
    def run():
        block.train()
        block.zero_grad(set_to_none=True)
        leaf = hidden.detach().requires_grad_()
        block(leaf.clone()).sum().backward()  # a non-leaf copy: Mixtral's jitter scales its input in place

    return run


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

    def mixtral(top_k: int, jitter: float = 0.0) -> MixtralSparseMoeBlock:
        config = MixtralConfig(hidden_size=d, intermediate_size=inner, num_local_experts=experts,
                               num_experts_per_tok=top_k)
        config._experts_implementation = "grouped_mm"  # transformers' default experts backend
        config.router_jitter_noise = jitter  # same extra work as the block under test
        return MixtralSparseMoeBlock(config)

    def dense_floor(active_inner: int) -> MoeMLP:
        return MoeMLP(moe_config, d, active_inner)

    cases = [
        (f"hf_moe top-{k}", MoeSparseBlock(moe_config), mixtral(k), k * inner),
        (f"hf_switch top-1, capacity {args.switch_capacity_factor}", MoeSparseBlock(switch_config),
         mixtral(1, switch_config.router_jitter_noise),
         inner),
        (f"hf_mh_moe h={args.num_moe_heads}, top-{mh_config.num_experts_per_tok} of {mh_config.num_experts}, "
         f"expert {mh_config.moe_intermediate_size}", MHMoeSparseBlock(mh_config), None, k * inner),
    ]
    rows = []
    for name, block, reference, active_inner in cases:
        candidates = {"block": _randomize(block, args.seed).to(dtype),
                      "dense": _randomize(dense_floor(active_inner), args.seed).to(dtype)}
        if reference is not None:
            reference.load_state_dict(candidates["block"].state_dict(), strict=False)
            candidates["mixtral"] = reference.to(dtype)
        row = dict(block=name)
        for mode, make in (("forward", _forward), ("forward_backward", _forward_backward)):
            seconds = paired_median_seconds({key: make(m, hidden) for key, m in candidates.items()}, args.repeats)
            row[f"{mode}_s"] = statistics.median(seconds["block"])
            for key in candidates.keys() - {"block"}:
                ratios = [mine / theirs for mine, theirs in zip(seconds["block"], seconds[key], strict=True)]
                row[f"{key}_{mode}_s"] = statistics.median(seconds[key])
                row[f"vs_{key}_{mode}"] = statistics.median(ratios)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows: median seconds and median per-round ratios (lower is better)."""

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


@dataclass
class StatsOverheadArguments:
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_experts: int = 8
    vocab_size: int = 8000
    batch_size: int = 8
    sequence_length: int = 128
    repeats: int = 7
    seed: int = 0


def benchmark_stats_overhead(args: StatsOverheadArguments) -> dict:
    """Training-step time with and without the expert-statistics hooks (summary read every step: the worst case).

    One step = forward, backward, AdamW step. Rounds alternate the two variants; the ratio is the median of the
    per-round ratios.
    """
    from .training.router_stats import RouterStatsRecorder

    torch.manual_seed(args.seed)
    config = MoeConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                       intermediate_size=args.hidden_size * 3, num_hidden_layers=args.num_hidden_layers,
                       num_attention_heads=max(1, args.hidden_size // 64), num_experts=args.num_experts)
    from .modeling import MoeForCausalLM

    model = MoeForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.sequence_length))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def step_with_stats():
        recorder = RouterStatsRecorder(model)
        step()
        recorder.summary()
        recorder.remove()

    seconds = paired_median_seconds({"plain": step, "with_stats": step_with_stats}, args.repeats)
    ratios = [s / p for s, p in zip(seconds["with_stats"], seconds["plain"], strict=True)]
    return {"plain_step_s": statistics.median(seconds["plain"]),
            "with_stats_step_s": statistics.median(seconds["with_stats"]),
            "overhead_ratio": statistics.median(ratios)}
