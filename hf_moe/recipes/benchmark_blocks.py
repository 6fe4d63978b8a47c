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

from ..checkpoints.names import HF_MOE_MODEL_TYPES
from ..modeling import MHMoeConfig, MoeConfig, SwitchConfig, mh_moe_matched_config
from ..modeling.modeling_hf_moe import MHMoeSparseBlock, MoeMLP, MoeSparseBlock
from ..moe_layers import EXPERT_CHOICE_ROUTING, find_moe_layers


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
    blocks: str = field(default="hf_moe,hf_switch,hf_mh_moe,expert_choice", metadata={
        "help": "comma-separated rows of the sparse-block table (a subset runs alone, e.g. hf_mh_moe); "
                "expert_choice: hf_moe with experts choosing k tokens each on average, against its top-k block"})
    decode: bool = field(default=True, metadata={"help": "also time greedy decoding (DecodeBenchmarkArguments "
                                                          "defaults): eager vs static cache + torch.compile"})
    decode_new_tokens: int = field(default=32, metadata={"help": "tokens generated per decoding round"})
    decode_model_types: str = field(default=",".join(HF_MOE_MODEL_TYPES), metadata={"help": "comma-separated"})

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"`dtype`={self.dtype!r} is invalid: choose float32 or bfloat16")
        _require_positive(self, "hidden_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
                          "num_tokens", "num_moe_heads", "repeats", "decode_new_tokens")


def _require_positive(arguments, *names: str) -> None:
    """At parsing: a count of 0 would otherwise fail deep in a run (e.g. `repeats`=0: a median of nothing)."""
    for name in names:
        if getattr(arguments, name) < 1:
            raise ValueError(f"`{name}`={getattr(arguments, name)!r} is invalid: a positive integer is required")


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


def _estimate_thresholds(block: nn.Module, hidden: torch.Tensor) -> None:
    """Training forwards of an expert-choice block on the benchmark's inputs, so that its inference threshold is
    estimated (timed forwards then use the causal rule, not the never-trained fallback). With gradients enabled:
    only a forward that trains moves the thresholds (`forward_trains`)."""
    block.train()
    with torch.enable_grad():
        for _ in range(3):
            block(hidden)


def _max_abs_difference(block: nn.Module, reference: nn.Module, hidden: torch.Tensor) -> float:
    """Largest |Δ| between the eval-mode outputs of two blocks on the benchmark's inputs."""
    outputs = []
    for module in (block, reference):
        module.eval()
        with torch.no_grad():
            output = module(hidden.clone())  # a copy: Mixtral's jitter scales its input in place
        outputs.append(output[0] if isinstance(output, tuple) else output)
    return (outputs[0] - outputs[1]).abs().max().item()


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

    expert_choice_config = MoeConfig(**shared, router_type="expert_choice", expert_capacity_factor=float(k))
    # Each case: name, block, references (same weights), inner size of the dense floor with the same active compute.
    # The top-k block and its Mixtral reference compute the same function (softmax, top-k, renormalised), so its
    # row also reports their largest output difference; the other references route differently.
    same_function = {"hf_moe": "mixtral"}
    cases = {
        "hf_moe": lambda: (f"hf_moe top-{k}", MoeSparseBlock(moe_config), {"mixtral": mixtral(k)}, k * inner),
        "hf_switch": lambda: (f"hf_switch top-1, capacity {args.switch_capacity_factor}",
                              MoeSparseBlock(switch_config), {"mixtral": mixtral(1, switch_config.router_jitter_noise)},
                              inner),
        "hf_mh_moe": lambda: (f"hf_mh_moe h={args.num_moe_heads}, top-{mh_config.num_experts_per_tok} of "
                              f"{mh_config.num_experts}, expert {mh_config.moe_intermediate_size}",
                              MHMoeSparseBlock(mh_config), {}, k * inner),
        "expert_choice": lambda: (f"hf_moe expert choice, c={k} (fwd: threshold rule; fwd+bwd: batch selection)",
                                  MoeSparseBlock(expert_choice_config), {"top_k": MoeSparseBlock(moe_config)},
                                  k * inner),
    }
    chosen = [name.strip() for name in args.blocks.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in cases]
    if unknown or not chosen:
        raise ValueError(f"`blocks`={args.blocks!r} is invalid: choose from {', '.join(cases)}")
    rows = []
    for case in chosen:
        name, block, references, active_inner = cases[case]()  # built when timed: one case's weights at a time
        candidates = {"block": _randomize(block, args.seed).to(dtype),
                      "dense": _randomize(dense_floor(active_inner), args.seed).to(dtype)}
        for key, reference in references.items():
            reference.load_state_dict(candidates["block"].state_dict(), strict=False)
            candidates[key] = reference.to(dtype)
        if any(layer.routing_kind == EXPERT_CHOICE_ROUTING for layer in find_moe_layers(block)):
            _estimate_thresholds(block, hidden)
        row = dict(block=name)
        if case in same_function:
            reference = same_function[case]
            row[f"max_abs_difference_vs_{reference}"] = _max_abs_difference(block, candidates[reference], hidden)
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

    references = [("dense", "dense"), ("mixtral", "Mixtral"), ("top_k", "top-k")]
    shown = [(key, label) for key, label in references if any(f"vs_{key}_forward" in row for row in rows)]
    header = "| block | fwd s | fwd+bwd s | " + " | ".join(f"fwd vs {label} | fwd+bwd vs {label}"
                                                      for _, label in shown) + " |"
    lines = [header, "|---|---|---|" + "---|---|" * len(shown)]
    for row in rows:
        cells = [f"{ratio(row, f'vs_{key}_forward')} | {ratio(row, f'vs_{key}_forward_backward')}" for key, _ in shown]
        lines.append(f"| {row['block']} | {row['forward_s']:.3f} | {row['forward_backward_s']:.3f} | "
                     + " | ".join(cells) + " |")
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

    def __post_init__(self):
        _require_positive(self, "hidden_size", "num_hidden_layers", "num_experts", "vocab_size", "batch_size",
                          "sequence_length", "repeats")


def benchmark_stats_overhead(args: StatsOverheadArguments) -> dict:
    """Training-step time with and without the expert-statistics hooks (summary read every step: the worst case).

    One step = forward, backward, AdamW step. Rounds alternate the two variants; the ratio is the median of the
    per-round ratios.
    """
    from ..training.router_stats import RouterStatsRecorder

    torch.manual_seed(args.seed)
    config = MoeConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                       intermediate_size=args.hidden_size * 3, num_hidden_layers=args.num_hidden_layers,
                       num_attention_heads=max(1, args.hidden_size // 64), num_experts=args.num_experts)
    from ..modeling import MoeForCausalLM

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


@dataclass
class DecodeBenchmarkArguments:
    hidden_size: int = field(default=256, metadata={"help": "model width of the decoding models"})
    num_hidden_layers: int = 4
    num_experts: int = 8
    moe_intermediate_size: int = 512
    vocab_size: int = 2048
    batch_size: int = 1
    prompt_length: int = 16
    new_tokens: int = 32
    repeats: int = field(default=5, metadata={"help": "timed rounds; the median is reported"})
    model_types: str = field(default=",".join(HF_MOE_MODEL_TYPES), metadata={"help": "comma-separated"})
    seed: int = 0

    def __post_init__(self):
        _require_positive(self, "hidden_size", "num_hidden_layers", "num_experts", "moe_intermediate_size",
                          "vocab_size", "batch_size", "prompt_length", "new_tokens", "repeats")


def _decode_config(model_type: str, args: DecodeBenchmarkArguments):
    from ..modeling import MODEL_CLASSES

    config_class = next(cls for cls in MODEL_CLASSES if cls.model_type == model_type)
    fields = dict(vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 3,
                  num_hidden_layers=args.num_hidden_layers, num_attention_heads=max(1, args.hidden_size // 64),
                  num_key_value_heads=max(1, args.hidden_size // 128), num_experts=args.num_experts,
                  moe_intermediate_size=args.moe_intermediate_size, sparse_layers=list(range(args.num_hidden_layers)),
                  max_position_embeddings=args.prompt_length + args.new_tokens + 8, pad_token_id=0, eos_token_id=None)
    if model_type == "hf_moe":
        fields.update(num_experts_per_tok=2)
    if model_type == "hf_mh_moe":
        fields.update(num_moe_heads=4, num_experts_per_tok=2)
    return config_class(**fields)


def mixtral_with_the_same_weights(model: nn.Module) -> nn.Module:
    """transformers' `MixtralForCausalLM` holding an hf_moe top-k model's weights (same names and layout)."""
    from transformers import MixtralForCausalLM

    config = model.config
    mixtral_config = MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.moe_intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, num_local_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=config.rope_parameters, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, pad_token_id=config.pad_token_id, eos_token_id=None)
    mixtral = MixtralForCausalLM(mixtral_config).eval()
    mixtral.load_state_dict(model.state_dict(), strict=True)
    return mixtral


def _generator(model: nn.Module, ids: torch.Tensor, new_tokens: int, compiled: bool) -> Callable[[], torch.Tensor]:
    from transformers import CompileConfig

    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if compiled:
        compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
        compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told to
        settings.update(cache_implementation="static", compile_config=compile_config)

    def run():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), **settings)

    return run


def benchmark_decoding(args: DecodeBenchmarkArguments) -> list[dict]:
    """Greedy decoding tokens/s per architecture: eager (dynamic cache) vs static cache with the decoding step
    compiled by inductor (`fullgraph=True`), and for the top-k MoE transformers' Mixtral with the same weights, eager
    and compiled. Every candidate's tokens are checked against the eager hf_moe tokens of the same model."""
    from transformers import AutoModelForCausalLM

    rows = []
    for model_type in args.model_types.split(","):
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(_decode_config(model_type, args)).eval()
        _randomize(model, args.seed)
        ids = torch.randint(1, args.vocab_size, (args.batch_size, args.prompt_length),
                            generator=torch.Generator().manual_seed(args.seed))
        candidates = {"eager": _generator(model, ids, args.new_tokens, compiled=False),
                      "compiled": _generator(model, ids, args.new_tokens, compiled=True)}
        if model_type == "hf_moe":
            mixtral = mixtral_with_the_same_weights(model)
            candidates["mixtral_eager"] = _generator(mixtral, ids, args.new_tokens, compiled=False)
            candidates["mixtral_compiled"] = _generator(mixtral, ids, args.new_tokens, compiled=True)
        reference = candidates["eager"]()
        same_tokens = {name: bool(torch.equal(run(), reference)) for name, run in candidates.items()}  # also warms up
        seconds = paired_median_seconds(candidates, args.repeats)
        generated = args.batch_size * args.new_tokens
        row = {"model": model_type, "same_tokens_as_eager": all(same_tokens.values())}
        for name, times in seconds.items():
            row[f"{name}_tokens_per_s"] = generated / statistics.median(times)
        row["compiled_speedup"] = statistics.median(e / c for e, c in zip(seconds["eager"], seconds["compiled"],
                                                                          strict=True))
        rows.append(row)
    return rows


def format_decoding_table(rows: list[dict]) -> str:
    def rate(row, key):
        return f"{row[key]:.0f}" if key in row else "n/a"

    lines = ["| model | eager tok/s | static cache + compiled tok/s | compiled speedup | Mixtral eager tok/s | "
             "Mixtral compiled tok/s | same tokens |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {rate(row, 'eager_tokens_per_s')} | {rate(row, 'compiled_tokens_per_s')} | "
                     f"{row['compiled_speedup']:.2f}x | {rate(row, 'mixtral_eager_tokens_per_s')} | "
                     f"{rate(row, 'mixtral_compiled_tokens_per_s')} | "
                     f"{'yes' if row['same_tokens_as_eager'] else 'NO'} |")
    return "\n".join(lines)
