"""Find the sparse (MoE) layers of any transformers MoE model: routers, experts, shared experts.

The one place that knows how MoE blocks look; statistics, freezing, heatmaps, the expert report and the
quantisation / LoRA helpers all go through it. Routers are recognised by convention, not by one class name:

1. transformers 5.x models declare their router class in `_can_record_outputs["router_logits"]` (that is how
   `output_router_logits=True` is collected): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, gpt-oss, hf_moe ...
2. otherwise a module with `num_experts`, `top_k` and a 2-D `weight` with one row per expert is a router.

Either way the router's output is `(router_logits (tokens, E), top_k_weights (tokens, k), top_k_index (tokens, k))`.
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
    return (isinstance(num_experts, int) and isinstance(getattr(module, "top_k", None), int)
            and isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.shape[0] == num_experts)


def _selection_bias_name(router_name: str, router: nn.Module, block_name: str, block: nn.Module) -> str | None:
    """The full name of the router's selection bias: on the router or a child of it, else on the sparse block."""
    for prefix, module, recurse in ((router_name, router, True), (block_name, block, False)):
        tensors = [*module.named_buffers(recurse=recurse), *module.named_parameters(recurse=recurse)]
        for name, _ in tensors:
            if name.rpartition(".")[2] == SELECTION_BIAS:
                return f"{prefix}.{name}" if prefix else name
    return None


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
        layers.append(MoeLayer(_layer_index(name, len(layers)), name, module, experts, shared, num_experts, top_k,
                               bias))
    if warn and not layers:
        logger.warning("%s (model_type=%r) has no recognisable MoE router: expert statistics, freezing and the expert "
                       "report do not apply to it", type(model).__name__, model_type(model))
    return sorted(layers, key=lambda layer: layer.index)


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
