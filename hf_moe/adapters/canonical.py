"""The canonical in-memory form of an expert LoRA adapter, which every reader produces and every writer consumes.

Per sparse layer and projection (gate, up, down): per-expert factors `a (E, r, in)`, `b (E, out, r)` and the
`scaling` (alpha / r, or alpha / sqrt(r) with rsLoRA), so that expert e's delta (out x in) is
`scaling * b[e] @ a[e]`. Nothing about file layouts survives here: no interleaving, no flattening, no nesting. A
fused adapter's gate and up keep the one `a` they share (the same tensor), which is how a writer knows it may write
them fused at rank r again. Everything else in the adapter (attention LoRA, routers, modules_to_save ...) travels
unchanged in `other_tensors`, with the adapter_config.json as read.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .base import BaseModel
from .names import FUSED_PARAMETERS, LORA_KEY, MIXTRAL_NAMES, PEFT_PREFIX, PROJECTIONS, QWEN_NAMES


@dataclass
class ExpertFactors:
    """One projection of one sparse layer: expert e's delta is `scaling * b[e] @ a[e]`."""

    a: torch.Tensor  # (E, r, in)
    b: torch.Tensor  # (E, out, r)
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def delta(self) -> torch.Tensor:
        """(E, out, in), computed in float32."""
        return self.scaling * torch.bmm(self.b.float(), self.a.float())

    def padded(self, rank: int) -> "ExpertFactors":
        """The same deltas at a higher rank: zero rows in `a`, zero columns in `b` (exact)."""
        extra = rank - self.rank
        if extra == 0:
            return self
        a = torch.cat([self.a, self.a.new_zeros(self.a.shape[0], extra, self.a.shape[2])], dim=1)
        b = torch.cat([self.b, self.b.new_zeros(self.b.shape[0], self.b.shape[1], extra)], dim=2)
        return ExpertFactors(a, b, self.scaling)

    def rescaled(self, scaling: float) -> "ExpertFactors":
        """The same deltas under another `scaling`, the ratio folded into `b` (exact only up to rounding)."""
        if scaling == self.scaling:
            return self
        return ExpertFactors(self.a, (self.b.float() * (self.scaling / scaling)).to(self.b.dtype), scaling)

    def error_of(self, other: "ExpertFactors") -> float:
        """max |delta - other's delta| over every expert: what an approximate rewrite measurably changes."""
        return float((self.delta() - other.delta()).abs().max())


def shares_a(gate: ExpertFactors, up: ExpertFactors) -> bool:
    """Whether gate and up can be written as one fused rank-r pair: the same `a` for every expert, same scaling."""
    return gate.scaling == up.scaling and gate.a.shape == up.a.shape and torch.equal(gate.a, up.a)


def separate_gate_up(gate: ExpertFactors, up: ExpertFactors) -> tuple[ExpertFactors, ExpertFactors] | None:
    """Split a shared-`a` pair of rank 2k whose `b` is block-diagonal (gate uses only the first k ranks, up only the
    last k, for every expert; what peft's v4 -> v5 converter makes of separate gate and up adapters) into two
    rank-k pairs with the same deltas; None when it is not block-diagonal."""
    if not shares_a(gate, up) or gate.rank % 2:
        return None
    half = gate.rank // 2
    if gate.b[:, :, half:].any() or up.b[:, :, :half].any():
        return None
    return (ExpertFactors(gate.a[:, :half], gate.b[:, :, :half], gate.scaling),
            ExpertFactors(up.a[:, half:], up.b[:, :, half:], up.scaling))


@dataclass
class ExpertAdapter:
    """An adapter read against its base: the experts' factors by layer index and projection, everything else as
    saved."""

    source: Path
    config: dict  # adapter_config.json as read
    base: BaseModel
    experts: dict[int, dict[str, ExpertFactors]] = field(default_factory=dict)
    other_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # saved keys -> tensors

    def ranks(self) -> dict[str, int]:
        """The largest per-expert rank of each canonical projection."""
        return {projection: max(factors[projection].rank for factors in self.experts.values()
                                if projection in factors)
                for projection in PROJECTIONS if any(projection in factors for factors in self.experts.values())}

    def other_lora_modules(self) -> list[str]:
        """The modules (model names) of the adapter's other LoRA pairs: attention, shared experts, routers..."""
        modules = {match["module"].removeprefix(PEFT_PREFIX) for key in self.other_tensors
                   if (match := LORA_KEY.fullmatch(key))}
        return sorted(modules)

    def other_target_names(self) -> list[str]:
        """Every non-expert target's name as peft's rank / alpha patterns see it."""
        parameters = [name for name in self.config.get("target_parameters") or []
                      if name.rpartition(".")[2] not in FUSED_PARAMETERS]
        return sorted({*self.other_lora_modules(), *parameters})

    def expert_target_names(self) -> list[str]:
        """The experts' names as peft's rank / alpha patterns see them, fused (`...experts.gate_up_proj`) and per
        expert in both naming families (expert 0 of each layer stands for all)."""
        names = []
        for layer in self.base.layers.values():
            names += [f"{layer.experts_name}.{parameter}" for parameter in FUSED_PARAMETERS]
            for block, projections in (("mlp", QWEN_NAMES), ("block_sparse_moe", MIXTRAL_NAMES)):
                names += [f"{layer.layer_prefix}.{block}.experts.0.{name}" for name in projections]
        return names
