"""peft's fused expert LoRA (`target_parameters` on transformers 5.x fused experts, peft >= 0.19): read and write.

Per experts parameter: `lora_A (r*E, in)`, expert e's rows `[e*r, (e+1)*r)`; `lora_B (out, r*E)`, expert e's columns
`e::E` ("rank_major", what peft, vLLM and unsloth >= 2026-09 use) or, in older unsloth adapters marked
`"lora_B_layout": "grouped_by_expert"` in adapter_config.json, `[e*r, (e+1)*r)`. The two agree only when E == 1 or
r == 1, and shapes never tell them apart, hence the marker (or an explicit `lora_B_layout`). Which of the experts
module's parameters a pair adapts is read from its shapes (`names.py`).

peft 0.18 laid non-transposed 3-D parameters out the other way round (`lora_A (r*E, out)`); such adapters fit
neither parameter of the base and are refused as not matching it.
"""

import re

import torch

from .base import BaseModel, SparseLayer
from .canonical import ExpertAdapter, ExpertFactors, shares_a
from .names import FUSED_KEY, FUSED_PARAMETERS, PEFT_PREFIX, PER_EXPERT_PROJECTIONS, fused_key
from .peft_config import alpha_for, is_expert_target, scaling_for, target_scaling

B_LAYOUTS = ("rank_major", "grouped_by_expert")


def _parameter_by_shape(a: torch.Tensor, b: torch.Tensor, layer: SparseLayer, key: str) -> str:
    """'gate_up_proj' (in H, out 2I) or 'down_proj' (in I, out H): the two never agree, as H = I = 2I is
    impossible."""
    fits = {"gate_up_proj": (layer.hidden, 2 * layer.intermediate), "down_proj": (layer.intermediate, layer.hidden)}
    for parameter, (inputs, outputs) in fits.items():
        if a.dim() == 2 and b.dim() == 2 and a.shape[1] == inputs and b.shape[0] == outputs:
            return parameter
    raise ValueError(
        f"{key}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} fit neither gate_up_proj (lora_A (r*E, "
        f"{layer.hidden}), lora_B ({2 * layer.intermediate}, r*E)) nor down_proj (lora_A (r*E, {layer.intermediate}),"
        f" lora_B ({layer.hidden}, r*E)) of the base's layer {layer.index} (E={layer.num_experts}, "
        f"H={layer.hidden}, I={layer.intermediate}): wrong base, or a peft < 0.19 adapter")


def read_fused(tensors: dict[str, torch.Tensor], base: BaseModel, config: dict, b_layout: str
               ) -> dict[int, dict[str, ExpertFactors]]:
    """The canonical factors of every fused experts pair in `tensors` (keys as saved)."""
    pairs: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = FUSED_KEY.fullmatch(key)
        pairs.setdefault((match["experts"], match["nesting"]), {})[match["factor"]] = (key, tensor)
    experts: dict[int, dict[str, ExpertFactors]] = {}
    for (saved_experts_name, _), factors in sorted(pairs.items()):
        pair_key = next(iter(factors.values()))[0]
        if set(factors) != {"A", "B"}:
            missing = "B" if "A" in factors else "A"
            raise ValueError(f"{pair_key} has no lora_{missing} partner")
        experts_name = saved_experts_name.removeprefix(PEFT_PREFIX)
        layer = base.layer_of_experts(experts_name)
        if layer is None:
            raise ValueError(f"{pair_key}: the base {base.folder.source} has no experts module {experts_name} (its "
                             f"sparse layers: {sorted(base.layers)})")
        a, b = factors["A"][1], factors["B"][1]
        parameter = _parameter_by_shape(a, b, layer, pair_key)
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{pair_key}: lora_A has {a.shape[0]} rows but lora_B {b.shape[1]} columns; both are "
                             "rank x experts (rank mismatch)")
        count = layer.num_experts
        if a.shape[0] % count:
            raise ValueError(f"{pair_key}: {a.shape[0]} rows are not rank x {count} experts of the base's layer "
                             f"{layer.index} (wrong base?)")
        rank = a.shape[0] // count
        config_rank, scaling = target_scaling(config, f"{experts_name}.{parameter}")
        if config_rank != rank:
            raise ValueError(f"{pair_key}: {a.shape[0]} rows over the base's {count} experts make rank {rank}, but "
                             f"adapter_config.json gives {experts_name}.{parameter} rank {config_rank} (rank mismatch, "
                             "or a base with another expert count)")
        per_expert_a = a.reshape(count, rank, a.shape[1])  # (E, r, in)
        if b_layout == "rank_major":  # column k*E + e
            per_expert_b = b.reshape(b.shape[0], rank, count).permute(2, 0, 1)  # (E, out, r)
        else:  # grouped_by_expert: column e*r + k
            per_expert_b = b.reshape(b.shape[0], count, rank).permute(1, 0, 2)
        projections = experts.setdefault(layer.index, {})
        if (parameter == "down_proj" and "down" in projections) or (parameter == "gate_up_proj" and "gate" in
                                                                    projections):
            raise ValueError(f"{pair_key}: layer {layer.index}'s {parameter} is adapted twice")
        if parameter == "down_proj":
            projections["down"] = ExpertFactors(per_expert_a, per_expert_b, scaling)
        else:
            gate_b, up_b = split_gate_up(per_expert_b, layer.intermediate, base.family.interleaved_gate_up)
            projections["gate"] = ExpertFactors(per_expert_a, gate_b, scaling)
            projections["up"] = ExpertFactors(per_expert_a, up_b, scaling)  # the same `a`: shared
    return experts


def split_gate_up(b: torch.Tensor, intermediate: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, 2I, r) -> gate (E, I, r), up (E, I, r)."""
    if interleaved:
        return b[:, 0::2], b[:, 1::2]
    return b[:, :intermediate], b[:, intermediate:]


def join_gate_up(gate: torch.Tensor, up: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """gate (E, I, r), up (E, I, r) -> (E, 2I, r)."""
    if interleaved:
        return torch.stack([gate, up], dim=2).reshape(gate.shape[0], 2 * gate.shape[1], gate.shape[2])
    return torch.cat([gate, up], dim=1)


def fused_pair(gate: ExpertFactors, up: ExpertFactors, interleaved: bool, approximations: list[str], where: str
               ) -> ExpertFactors:
    """gate_up_proj's factors: at rank r when gate and up share `a` (exactly what a fused adapter holds), else at rank
    r_gate + r_up with `a` stacked and `b` block-diagonal (what peft's converter makes of separate adapters)."""
    if shares_a(gate, up):
        return ExpertFactors(gate.a, join_gate_up(gate.b, up.b, interleaved), gate.scaling)
    if up.scaling != gate.scaling:
        rescaled = up.rescaled(gate.scaling)
        approximations.append(f"{where}: up's scaling {up.scaling} folded into lora_B to share gate's {gate.scaling} "
                              f"(max |Δ delta| {up.error_of(rescaled):.2g})")
        up = rescaled
    a = torch.cat([gate.a, up.a], dim=1)
    gate_b = torch.cat([gate.b, gate.b.new_zeros(*gate.b.shape[:2], up.rank)], dim=2)
    up_b = torch.cat([up.b.new_zeros(*up.b.shape[:2], gate.rank), up.b], dim=2)
    return ExpertFactors(a, join_gate_up(gate_b, up_b, interleaved), gate.scaling)


def fused_parameters(adapter: ExpertAdapter, approximations: list[str]) -> dict[tuple[int, str], ExpertFactors]:
    """{(layer, 'gate_up_proj' | 'down_proj'): factors} as the fused layout holds them."""
    interleaved = adapter.base.family.interleaved_gate_up
    fused = {}
    for index, projections in sorted(adapter.experts.items()):
        if "gate" in projections:
            fused[index, "gate_up_proj"] = fused_pair(projections["gate"], projections["up"], interleaved,
                                                      approximations, f"layer {index} gate_up_proj")
        if "down" in projections:
            fused[index, "down_proj"] = projections["down"]
    return fused


def fused_tensors(adapter: ExpertAdapter, fused: dict[tuple[int, str], ExpertFactors]) -> dict[str, torch.Tensor]:
    """peft's keys and flat tensors. With both parameters adapted, gate_up_proj is the inner wrapper
    (`experts.base_layer.lora_*`), as peft nests them on full-precision experts and vLLM reads them."""
    tensors = {}
    for (index, parameter), factors in fused.items():
        layer = adapter.base.layers[index]
        inner = parameter == "gate_up_proj" and (index, "down_proj") in fused
        count, rank, inputs = factors.a.shape
        tensors[fused_key(layer.experts_name, "A", inner)] = factors.a.reshape(count * rank, inputs).contiguous()
        b = factors.b.permute(1, 2, 0)  # (out, r, E): column k*E + e
        tensors[fused_key(layer.experts_name, "B", inner)] = b.reshape(b.shape[0], rank * count).contiguous()
    return tensors


def fused_config(adapter: ExpertAdapter, fused: dict[tuple[int, str], ExpertFactors], base_config: dict,
                 approximations: list[str]) -> dict:
    """adapter_config.json for the fused tensors: the experts in `target_parameters` by their full names (the only
    names peft matches on 4-bit parametrized experts too), per-expert names out of `target_modules`, a rank / alpha
    pattern for each parameter whose rank or scaling is not `r` / `lora_alpha`'s (one key for all layers when they
    agree), and `"lora_B_layout": "rank_major"` (unsloth's marker). `base_config` is the adapter's config with the
    expert patterns removed."""
    config = dict(base_config)
    rslora = bool(config.get("use_rslora"))
    other_modules = set(adapter.other_lora_modules())
    target_modules = config.get("target_modules")
    if isinstance(target_modules, list | tuple | set):
        target_modules = sorted(name for name in target_modules if not _drops_per_expert_name(name, other_modules))
    config["target_modules"] = target_modules
    expert_targets = {f"{adapter.base.layers[index].experts_name}.{parameter}" for index, parameter in fused}
    kept = [name for name in config.get("target_parameters") or [] if not is_expert_target(name)]
    config["target_parameters"] = sorted({*kept, *expert_targets})
    for parameter in FUSED_PARAMETERS:
        entries = {index: factors for (index, name), factors in fused.items() if name == parameter}
        needed = {}
        for index, factors in entries.items():
            full_name = f"{adapter.base.layers[index].experts_name}.{parameter}"
            if target_scaling(config, full_name) == (factors.rank, factors.scaling):
                continue
            alpha, exact = alpha_for(factors.scaling, factors.rank, rslora)
            if not exact:
                error = abs(factors.scaling - scaling_for(alpha, factors.rank, rslora)) / factors.scaling * float(
                    factors.delta().abs().max())
                approximations.append(f"{full_name}: scaling {factors.scaling} is not alpha / rank exactly "
                                      f"(max |Δ delta| {error:.2g})")
            needed[index] = (factors.rank, alpha)
        if not needed:
            continue
        if len(set(needed.values())) == 1 and len(needed) == len(entries):
            layer = adapter.base.layers[next(iter(needed))]
            keys = {re.escape(f"{layer.experts_name.removeprefix(layer.layer_prefix + '.')}.{parameter}"):
                    next(iter(needed.values()))}
        else:
            keys = {re.escape(f"{adapter.base.layers[index].experts_name}.{parameter}"): value
                    for index, value in needed.items()}
        for key, (rank, alpha) in keys.items():
            config.setdefault("rank_pattern", {})[key] = rank
            config.setdefault("alpha_pattern", {})[key] = alpha
    config["lora_B_layout"] = "rank_major"
    return config


def _drops_per_expert_name(name: str, other_modules: set[str]) -> bool:
    """A per-expert projection name in `target_modules` (`w1`, `gate_proj` ...): dropped unless another LoRA module
    of the adapter (a shared expert's `gate_proj`) still needs it."""
    last = name.rpartition(".")[2]
    if last not in PER_EXPERT_PROJECTIONS:
        return False
    return not any(module == name or module.endswith(f".{name}") for module in other_modules)
