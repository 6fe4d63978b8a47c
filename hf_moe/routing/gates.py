"""The gate weights of replayed experts, recomputed from the live router with the family's own convention.

Replaying a routing keeps the router in the graph: the experts are the trace's, but each chosen expert's combine
weight is computed from this forward's router logits exactly as the family computes it for the experts it picks
itself, so the router still gets its gradient through the chosen experts' gates (gathering from probabilities that
were zeroed outside the live top-k would silently give it none).

transformers' families follow one of four conventions, told apart by what the router returned for its own choice in
the same call (each is a function of the logits alone, so matching the router's weights at its own experts fixes
the convention):

- softmax over the experts, the chosen probabilities (OLMoE, Qwen2/3-MoE with `norm_topk_prob=False`);
- the same renormalised over the k chosen (Mixtral, Qwen2/3-MoE with `norm_topk_prob=True`; gpt-oss's softmax over
  the top-k logits is the same function);
- sigmoid scores, times the router's `routed_scaling_factor` (DeepSeek-V3, GLM-4-MoE with `norm_topk_prob=False`);
- the same renormalised over the k chosen, then scaled (DeepSeek-V3, GLM-4-MoE): the selection bias and the group
  limit decide which experts, never the weights, so replay is exact whatever they would have chosen.

hf_moe's own routers are read from their attributes: renormalisation (with the straight-through denominator when
configured) and expert capacity (Switch), which is applied to the replayed assignment as the block applies it.
"""

from collections.abc import Callable

import torch
from torch import nn

from ..modeling.routing_hf_moe import drop_over_capacity


def _softmax(logits, index, scale):
    return logits.float().softmax(-1).gather(-1, index)


def _softmax_renormalised(logits, index, scale):
    chosen = _softmax(logits, index, scale)
    return chosen / chosen.sum(-1, keepdim=True)


def _sigmoid(logits, index, scale):
    return logits.float().sigmoid().gather(-1, index) * scale


def _sigmoid_renormalised(logits, index, scale):
    chosen = logits.float().sigmoid().gather(-1, index)
    return chosen / (chosen.sum(-1, keepdim=True) + 1e-20) * scale


CONVENTIONS: dict[str, Callable] = {
    "softmax": _softmax,
    "softmax, renormalised over the top-k": _softmax_renormalised,
    "sigmoid, scaled": _sigmoid,
    "sigmoid, renormalised over the top-k, scaled": _sigmoid_renormalised,
}


class UnknownGateConvention(ValueError):
    """A router's gate weights follow none of the conventions replay knows."""


def is_hf_moe_router(router: nn.Module) -> bool:
    return hasattr(router, "routing_kind") and hasattr(router, "straight_through_topk")


def detect_convention(router: nn.Module, logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> str:
    """The convention that reproduces the router's own `weights` at its own `index` from its `logits`."""
    scale = float(getattr(router, "routed_scaling_factor", 1.0) or 1.0)
    tolerance = 1e-4 if weights.dtype in (torch.float32, torch.float64) else 2e-2
    errors = {name: (convention(logits, index, scale) - weights.float()).abs().max().item() if index.numel() else 0.0
              for name, convention in CONVENTIONS.items()}
    best = min(errors, key=errors.get)
    if errors[best] > tolerance:
        raise UnknownGateConvention(
            f"{type(router).__name__}: its gate weights follow none of the conventions routing replay knows "
            f"({', '.join(CONVENTIONS)}; closest: {best!r}, max |difference| {errors[best]:.3g})")
    return best


def replayed_gates(router: nn.Module, convention: str | None, logits: torch.Tensor, index: torch.Tensor,
                   dtype: torch.dtype, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, k) the combine weights of the experts `index (rows, k)` from the live `logits (rows, E)`."""
    if is_hf_moe_router(router):
        weights = logits.float().softmax(-1).gather(-1, index)
        if router.norm_topk_prob:
            norm = weights.sum(-1, keepdim=True)
            weights = weights / (norm.detach() if router.straight_through_topk else norm)
        capacity_factor = router.capacity_factor if router.training else router.eval_capacity_factor
        if capacity_factor is not None:
            weights = drop_over_capacity(index, weights, router.num_experts, capacity_factor, token_mask)
        return weights.to(dtype)
    scale = float(getattr(router, "routed_scaling_factor", 1.0) or 1.0)
    return CONVENTIONS[convention](logits, index, scale).to(dtype)
