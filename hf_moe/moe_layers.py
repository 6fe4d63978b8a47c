"""Find the sparse (MoE) layers of any transformers MoE model: routers, experts, shared experts.

The one place that knows how MoE blocks look; statistics, freezing, heatmaps, the expert report and the
quantisation / LoRA helpers all go through it. Routers are recognised by convention, not by one class name:

1. transformers 5.x models declare their router class in `_can_record_outputs["router_logits"]` (that is how
   `output_router_logits=True` is collected): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, gpt-oss, hf_moe ...
2. otherwise a module with `num_experts`, `top_k` (or a `routing_kind`) and a 2-D `weight` with one row per expert
   is a router.

A router routes by top-k (the token picks k experts: every transformers family, hf_moe's top-k, Switch and MH-MoE
routers) or by expert choice (each expert picks its tokens: hf_moe's expert-choice routers); `MoeLayer.routing_kind`
says which. A top-k router returns `(router_logits (rows, E), top_k_weights (rows, k), top_k_index (rows, k))` or,
in some families, its logits alone; an expert-choice router `(router_logits, weights (rows, E), selected (rows, E))`.
`token_assignment` turns any of these into the same per-row assignment (experts and gate weights), which is all the
statistics, saliency, balancing and the expert-choice gap read. Rows are tokens, or MH-MoE's sub-tokens.
The sparse block is the router's parent; its `experts` child holds the routed experts and its `shared_expert*`
children the always-active ones (Qwen2-MoE's `shared_expert` and `shared_expert_gate`, DeepSeek's `shared_experts`).

A router's selection bias (auxiliary-loss-free balancing) is the tensor named `e_score_correction_bias`, in every
family that has one: hf_moe's routers with `router_bias_update_rate` > 0 and transformers' DeepSeek-V3, GLM-4-MoE,
dots1, Kimi-Linear, MiMo-V2-Flash... on the router itself; Ernie-4.5-MoE one level below (`gate.moe_statics`, a
parameter without gradient); MiniMax-M2 and HY-V3 on the sparse block, which passes it to the router.
"""

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .modeling.configuration_hf_moe import EXPERT_CHOICE_ROUTING, TOP_K_ROUTING

logger = logging.getLogger(__name__)

MOE_PARTS = ("router", "experts", "moe")
SELECTION_BIAS = "e_score_correction_bias"  # the selection bias's name, in hf_moe and transformers alike


@dataclass(frozen=True)
class MoeLayer:
    """One sparse block: its decoder layer index, router and experts (module names are `model.named_modules()`
    names, so they also work for peft/quantisation targeting)."""

    index: int
    router_name: str
    router: nn.Module
    experts_name: str | None
    shared_expert_names: tuple[str, ...]
    num_experts: int
    top_k: int
    selection_bias_name: str | None = None  # the router's selection bias (a `model.named_buffers()` or
    # `named_parameters()` name), None when it has none
    routing_kind: str = TOP_K_ROUTING  # TOP_K_ROUTING or EXPERT_CHOICE_ROUTING
    experts_per_token: float = 1  # per router row: k (top-k), or the capacity factor c, the mean (expert choice)

    @property
    def block_name(self) -> str:
        """The sparse block: the router's parent module ('' when the router hangs off the model itself)."""
        return self.router_name.rpartition(".")[0]

    def module_names(self, part: str) -> tuple[str, ...]:
        """Modules of `part`: 'router', 'experts' (routed and shared experts) or 'moe' (both)."""
        if part not in MOE_PARTS:
            raise ValueError(f"`part`={part!r} is invalid: choose one of {MOE_PARTS}")
        experts = ((self.experts_name,) if self.experts_name else ()) + self.shared_expert_names
        return {"router": (self.router_name,), "experts": experts, "moe": (self.router_name, *experts)}[part]


def _declared_router_matchers(model: nn.Module) -> list:
    """Predicates `(name, module) -> bool` from every `_can_record_outputs["router_logits"]` in the model."""
    matchers = []
    for module in model.modules():
        declared = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        for recorder in declared if isinstance(declared, (list, tuple)) else [declared]:
            if recorder is None:
                continue
            target = recorder if isinstance(recorder, type) else getattr(recorder, "target_class", None)
            class_name = getattr(recorder, "class_name", None)
            layer_name = getattr(recorder, "layer_name", None)

            def matches(name, candidate, target=target, class_name=class_name, layer_name=layer_name):
                if layer_name and layer_name not in name:
                    return False
                if target is not None and isinstance(candidate, target):
                    return True
                return bool(class_name) and type(candidate).__name__.endswith(class_name)

            matchers.append(matches)
    return matchers


def _looks_like_router(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    num_experts = getattr(module, "num_experts", None)
    # An expert-choice router has no k; its `routing_kind` says what it is.
    routes = isinstance(getattr(module, "top_k", None), int) or isinstance(getattr(module, "routing_kind", None), str)
    return (isinstance(num_experts, int) and routes
            and isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.shape[0] == num_experts)


def _selection_bias_name(router_name: str, router: nn.Module, block_name: str, block: nn.Module) -> str | None:
    """The full name of the router's selection bias: on the router or a child of it, else on the sparse block."""
    for prefix, module, recurse in ((router_name, router, True), (block_name, block, False)):
        tensors = [*module.named_buffers(recurse=recurse), *module.named_parameters(recurse=recurse)]
        for name, _ in tensors:
            if name.rpartition(".")[2] == SELECTION_BIAS:
                return f"{prefix}.{name}" if prefix else name
    return None


def _routing(router: nn.Module, top_k: int) -> tuple[str, float]:
    """(routing kind, experts per router row) of `router`: expert choice for hf_moe's expert-choice routers (their
    capacity factor c is the mean experts per row), top-k with k for every other router."""
    kind = getattr(router, "routing_kind", TOP_K_ROUTING)
    if kind == EXPERT_CHOICE_ROUTING:
        return kind, router.expert_capacity_factor
    return TOP_K_ROUTING, top_k


def _layer_index(name: str, fallback: int) -> int:
    parts = name.split(".")
    for key in ("layers", "h", "blocks"):
        if key in parts[:-1] and parts[parts.index(key) + 1].isdigit():
            return int(parts[parts.index(key) + 1])
    return fallback


def find_moe_layers(model: nn.Module, warn: bool = False) -> list[MoeLayer]:
    """Every sparse block of `model` (also inside peft wrappers), in layer order.

    With `warn=True`, a model without a recognisable router gets a warning naming its model type.

    Example:
    ```python
    >>> [(layer.index, layer.router_name, layer.experts_name) for layer in find_moe_layers(mixtral)][:1]
    [(0, 'model.layers.0.mlp.gate', 'model.layers.0.mlp.experts')]
    ```
    """
    matchers = _declared_router_matchers(model)
    modules = dict(model.named_modules())
    layers = []
    for name, module in modules.items():
        if not (any(match(name, module) for match in matchers) or _looks_like_router(module)):
            continue
        block_name = name.rpartition(".")[0]
        block = modules.get(block_name, model)
        prefix = f"{block_name}." if block_name else ""
        children = dict(block.named_children())
        experts = f"{prefix}experts" if "experts" in children else None
        shared = tuple(f"{prefix}{child}" for child in children if child.startswith("shared_expert"))
        weight = getattr(module, "weight", None)
        num_experts = getattr(module, "num_experts", None) or (weight.shape[0] if weight is not None else 0)
        config = getattr(model, "config", None)
        top_k = getattr(module, "top_k", None) or getattr(config, "num_experts_per_tok", 1)
        bias = _selection_bias_name(name, module, block_name, block)
        kind, experts_per_token = _routing(module, top_k)
        layers.append(MoeLayer(_layer_index(name, len(layers)), name, module, experts, shared, num_experts, top_k,
                               bias, kind, experts_per_token))
    if warn and not layers:
        logger.warning("%s (model_type=%r) has no recognisable MoE router: expert statistics, freezing and the expert "
                       "report do not apply to it", type(model).__name__, model_type(model))
    return sorted(layers, key=lambda layer: layer.index)


@dataclass(frozen=True)
class TokenAssignment:
    """Which experts each router row went to, and with which gate weight: one router call, whatever its family or
    routing kind (`token_assignment`). Rows are the router's rows: tokens, or sub-tokens for MH-MoE (h per token).

    `chosen` and `gates` serve every routing kind alike; `index` / `weights` are a top-k router's own layout, kept
    for consumers that need its order (None for expert choice, where a row has no fixed number of experts).
    """

    routing_kind: str  # TOP_K_ROUTING or EXPERT_CHOICE_ROUTING
    logits: torch.Tensor  # (rows, E) the router's clean logits
    chosen: torch.Tensor  # (rows, E) bool: the row was assigned to the expert; top-k: also when dropped over capacity
    gates: torch.Tensor  # (rows, E) the weight the block gives the expert's output for the row; 0 where not chosen
    # and for an assignment dropped over capacity
    index: torch.Tensor | None = None  # (rows, k) top-k: the chosen experts, in the router's order
    weights: torch.Tensor | None = None  # (rows, k) top-k: their combine weights, as the router gave them
    from_logits_only: bool = False  # the router returned only its logits: the assignment is the top-k of their
    # softmax, and the block may weight the experts otherwise (exact counts, approximate gates)

    @property
    def dropped(self) -> torch.Tensor:
        """(rows, E) bool: assignments a top-k router made but dropped over capacity (weight 0); none for expert
        choice, where an expert takes only what fits."""
        if self.routing_kind == EXPERT_CHOICE_ROUTING:
            return torch.zeros_like(self.chosen)
        return self.chosen & (self.gates == 0)


def token_assignment(layer: MoeLayer, router_output) -> TokenAssignment:
    """The per-row assignment of one call of `layer.router`, from its output (what a forward hook receives).

    Reads every router output layout: expert choice `(logits, weights (rows, E), selected (rows, E))`; top-k
    `(logits, top_k_weights (rows, k), top_k_index (rows, k))`, where a dropped assignment keeps its expert with
    weight 0; a router returning only its logits (as a tensor or a 1- or 2-tuple), whose assignments are then the
    top-`layer.top_k` of the softmax, with those probabilities as weights.

    Example:
    ```python
    >>> layer = find_moe_layers(model)[0]
    >>> seen = []
    >>> handle = layer.router.register_forward_hook(lambda r, args, out: seen.append(token_assignment(layer, out)))
    >>> model(input_ids)
    >>> seen[0].chosen.sum(-1)  # experts per router row
    ```
    """
    if layer.routing_kind == EXPERT_CHOICE_ROUTING:
        logits, weights, selected = router_output[:3]
        return TokenAssignment(EXPERT_CHOICE_ROUTING, logits, selected.bool(), weights)
    from_logits_only = not (isinstance(router_output, tuple) and len(router_output) >= 3)
    if from_logits_only:
        logits = router_output[0] if isinstance(router_output, tuple) else router_output
        logits = logits.reshape(-1, logits.shape[-1])
        weights, index = logits.float().softmax(-1).topk(layer.top_k, dim=-1)
    else:
        logits, weights, index = (tensor.reshape(-1, tensor.shape[-1]) for tensor in router_output[:3])
    chosen = torch.zeros(logits.shape, dtype=torch.bool, device=index.device).scatter_(-1, index, True)
    gates = torch.zeros(logits.shape, dtype=weights.dtype, device=weights.device).scatter_(-1, index, weights)
    return TokenAssignment(TOP_K_ROUTING, logits, chosen, gates, index, weights, from_logits_only)


def config_routing_kind(config) -> str:
    """`config`'s routing kind: its `routing_kind` (hf_moe configs), else TOP_K_ROUTING (transformers' families)."""
    return getattr(config, "routing_kind", TOP_K_ROUTING)


def selection_bias(model: nn.Module, layer: MoeLayer) -> torch.Tensor | None:
    """The tensor of `layer`'s selection bias in `model` (None when the router has none)."""
    if layer.selection_bias_name is None:
        return None
    module_name, _, tensor_name = layer.selection_bias_name.rpartition(".")
    return getattr(model.get_submodule(module_name), tensor_name)


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def find_routers(model: nn.Module) -> dict[int, nn.Module]:
    """{decoder layer index: router} for every sparse block of `model`."""
    return {layer.index: layer.router for layer in find_moe_layers(model)}


def moe_module_names(model: nn.Module, part: str) -> list[str]:
    """Names of the router ('router'), expert ('experts', shared experts included) or both ('moe') modules of every
    sparse block: targets for freezing, quantisation or LoRA."""
    return [name for layer in find_moe_layers(model) for name in layer.module_names(part)]


# ------------------------------------------------------------------------------------------------ config fields
# Where a config keeps the routed-expert count E; the name differs by family and version (transformers 5.24: hf_moe,
# Qwen2-MoE, OLMoE `num_experts`; Mixtral, Qwen3-MoE `num_local_experts`; DeepSeek-V3 `n_routed_experts`, the others
# aliases of it). The experts per token k is `num_experts_per_tok` in all of them.
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def expert_count_field(config) -> str | None:
    """The config field that holds the number of routed experts per sparse layer (None for a dense config).

    The name stored in config.json, not an alias: DeepSeek-V3 maps `num_local_experts` to `n_routed_experts`.
    """
    stored = config.to_dict()
    for field in EXPERT_COUNT_FIELDS:
        if isinstance(stored.get(field), int) and stored[field] > 0:
            return field
    return None


@dataclass(frozen=True)
class RoutingGroups:
    """Group-limited routing (DeepSeek-V3's `n_group` / `topk_group`): the E experts form `count` contiguous groups
    of E / count; a token first picks the `chosen` groups with the best sum of their top-2 scores, then its k experts
    inside them. `count=1` is plain top-k."""

    count: int = 1
    chosen: int = 1


def routing_groups(config) -> RoutingGroups:
    """The routing groups of `config` (DeepSeek-V3 family: `n_group` / `topk_group`; everything else: one group)."""
    count = getattr(config, "n_group", None)
    if isinstance(count, int) and count > 1:
        return RoutingGroups(count=count, chosen=getattr(config, "topk_group", None) or count)
    return RoutingGroups()
