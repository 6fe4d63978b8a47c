"""The per-expert expert LoRA (the transformers v4 layout): read, and write so that peft and vLLM both load it.

Keys `<layer>.<block>.experts.<e>.<projection>.lora_A.weight (r, in)` / `lora_B.weight (out, r)` (`names.py`).
Written for every expert and all three projections of each adapted layer (vLLM's `pack_moe` asserts that), at one
rank and one scaling for all of them: peft's loader fuses gate and up at rank `2 * r` with alpha `2 * lora_alpha`
(`peft.utils.transformers_weight_conversion`), which is only the adapter's scaling when every expert projection has
`r` and `lora_alpha`'s. A fused pair of rank 2k whose B is block-diagonal (peft's own fusion of separate gate and up)
is written back as two rank-k pairs; a shared rank-r A is written once per projection, so fused -> per-expert ->
fused gives back the same tensors bit for bit.
"""

from collections import Counter

import torch

from ..checkpoints.names import HF_MOE_MODEL_TYPES
from .canonical import ExpertAdapter, ExpertFactors, separate_gate_up
from .names import PEFT_PREFIX, PER_EXPERT_KEY, PER_EXPERT_PROJECTIONS, PROJECTIONS, per_expert_key
from .peft_config import alpha_for, is_expert_target, pin_targets, scaling_for, target_scaling, without_expert_patterns


class PerExpertRefusedError(ValueError):
    """The per-expert form cannot carry this adapter for this base; the message says why. Nothing was written."""


def read_per_expert(tensors: dict[str, torch.Tensor], base, config: dict) -> dict[int, dict[str, ExpertFactors]]:
    """The canonical factors of every per-expert pair in `tensors` (keys as saved, either naming family)."""
    found: dict[tuple[int, str], dict[int, dict[str, tuple[str, torch.Tensor]]]] = {}
    for key, tensor in tensors.items():
        match = PER_EXPERT_KEY.fullmatch(key)
        projection = PER_EXPERT_PROJECTIONS[match["projection"]]
        found.setdefault((int(match["layer"]), projection), {}).setdefault(int(match["expert"]), {})[
            match["factor"]] = (key, tensor)
    experts: dict[int, dict[str, ExpertFactors]] = {}
    for (index, projection), by_expert in sorted(found.items()):
        layer = base.layers.get(index)
        if layer is None:
            raise ValueError(f"the adapter adapts experts of layer {index}, which is not a sparse layer of the base "
                             f"{base.folder.source} (its sparse layers: {sorted(base.layers)})")
        count = layer.num_experts
        if beyond := [expert for expert in by_expert if expert >= count]:
            raise ValueError(f"the adapter has experts {sorted(beyond)} in layer {index}, but the base "
                             f"{base.folder.source} has {count} experts there (wrong base)")
        if missing := [expert for expert in range(count) if expert not in by_expert]:
            raise ValueError(f"layer {index} {projection}: the adapter has no LoRA for experts {missing} of {count} "
                             "(every expert is needed)")
        outputs, inputs = layer.shape(projection)
        a_list, b_list, scalings = [], [], set()
        for expert in range(count):
            factors = by_expert[expert]
            if set(factors) != {"A", "B"}:
                key = next(iter(factors.values()))[0]
                raise ValueError(f"{key} has no lora_{'B' if 'A' in factors else 'A'} partner")
            (key, a), (_, b) = factors["A"], factors["B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"{key}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree on the rank "
                                 "(rank mismatch)")
            if (b.shape[0], a.shape[1]) != (outputs, inputs):
                raise ValueError(f"{key}: a {projection} LoRA of {a.shape[1]} -> {b.shape[0]}, but the base's layer "
                                 f"{index} experts map {inputs} -> {outputs} (H={layer.hidden}, I={layer.intermediate};"
                                 " wrong base)")
            module = key.removeprefix(PEFT_PREFIX).rsplit(".lora_A", 1)[0]
            config_rank, scaling = target_scaling(config, module)
            if config_rank != a.shape[0]:
                raise ValueError(f"{key}: rank {a.shape[0]}, but adapter_config.json gives {module} rank "
                                 f"{config_rank} (rank mismatch)")
            a_list.append(a)
            b_list.append(b)
            scalings.add(scaling)
        if len(scalings) > 1 or len({a.shape[0] for a in a_list}) > 1:
            raise ValueError(f"layer {index} {projection}: the experts' ranks or scalings differ "
                             f"({sorted({a.shape[0] for a in a_list})}, {sorted(scalings)}); one is needed per layer")
        experts.setdefault(index, {})[projection] = ExpertFactors(torch.stack(a_list), torch.stack(b_list),
                                                                  scalings.pop())
    for index, projections in experts.items():
        if ("gate" in projections) != ("up" in projections):
            raise ValueError(f"layer {index}: the adapter has a LoRA for the experts' "
                             f"{'gate' if 'gate' in projections else 'up'} projection but none for the "
                             f"{'up' if 'gate' in projections else 'gate'} one; peft and vLLM fuse the two")
    return experts


def _refusal(adapter: ExpertAdapter) -> str | None:
    """Why the per-expert form cannot carry `adapter` for its base, or None."""
    family = adapter.base.family
    config = adapter.config
    if family.per_expert_refusal:
        return family.per_expert_refusal
    if config.get("use_rslora"):
        return ("the adapter uses rsLoRA: peft's per-expert loader fuses gate and up at rank 2r with alpha 2 x "
                "lora_alpha, which changes an rsLoRA scaling (alpha / sqrt(r)), and vLLM ignores rsLoRA for MoE")
    if isinstance(config.get("target_modules"), str):
        return ("adapter_config.json `target_modules` is a regular expression, which cannot be extended with the "
                "per-expert names; list the target modules")
    taken = [module for module in adapter.other_lora_modules() if module.rpartition(".")[2] in family.projections]
    if taken:
        return (f"peft's per-expert loader would take the adapter's LoRA on {taken[0]} for an expert's "
                f"(`{taken[0].rpartition('.')[2]}` is an expert projection name in {family.model_type})")
    if family.model_type in HF_MOE_MODEL_TYPES:
        parameters = [name for name in config.get("target_parameters") or [] if not is_expert_target(name)]
        if parameters:
            return (f"the adapter adapts {parameters[0]}, which the native export of the base renames or "
                    "reshapes; only attention and the routed experts carry over")
    return None


def _chosen_forms(adapter: ExpertAdapter) -> tuple[int, dict[int, dict[str, ExpertFactors]]]:
    """The rank R every expert projection is written at, and each projection's factors at R.

    gate / up come split when their shared B is block-diagonal, else as they are; R is `r` when every projection
    fits it (smaller ones are zero-padded: exact), else the largest rank needed.
    """
    natural = {}
    for index, projections in adapter.experts.items():
        natural[index] = dict(projections)
        if "gate" in projections and (split := separate_gate_up(projections["gate"], projections["up"])):
            natural[index]["split"] = split
    needed = 0
    for projections in natural.values():
        gate_up = projections.get("split") or [projections[name] for name in ("gate", "up") if name in projections]
        needed = max([needed, *(factors.rank for factors in gate_up),
                      *([projections["down"].rank] if "down" in projections else [])])
    rank = max(needed, adapter.config["r"])
    chosen = {}
    for index, projections in natural.items():
        forms = {}
        if "gate" in projections:
            split = projections.get("split")
            if split and split[0].rank == split[1].rank == rank:
                forms["gate"], forms["up"] = split
            elif projections["gate"].rank == projections["up"].rank == rank:
                forms["gate"], forms["up"] = projections["gate"], projections["up"]
            else:
                gate, up = split or (projections["gate"], projections["up"])
                forms["gate"], forms["up"] = gate.padded(rank), up.padded(rank)
        if "down" in projections:
            forms["down"] = projections["down"].padded(rank)
        chosen[index] = forms
    return rank, chosen


def per_expert_adapter(adapter: ExpertAdapter, approximations: list[str]
                       ) -> tuple[dict[str, torch.Tensor], dict, int]:
    """The per-expert tensors (every expert, gate, up and down, of each adapted layer; the other tensors as saved),
    their adapter_config.json and their rank. Raises `PerExpertRefusedError` naming why it cannot."""
    if reason := _refusal(adapter):
        raise PerExpertRefusedError(f"cannot write the per-expert form for this {adapter.base.family.model_type} "
                                    f"base: {reason}. Nothing was written.")
    config, family = adapter.config, adapter.base.family
    rank, chosen = _chosen_forms(adapter)
    scalings = Counter(factors.scaling for forms in chosen.values() for factors in forms.values())
    scaling = scalings.most_common(1)[0][0]
    for index, forms in chosen.items():
        for projection, factors in forms.items():
            if factors.scaling != scaling:
                forms[projection] = factors.rescaled(scaling)
                approximations.append(f"layer {index} {projection}: scaling {factors.scaling} folded into lora_B to "
                                      f"share {scaling} (max |Δ delta| {factors.error_of(forms[projection]):.2g})")
    other_names = adapter.other_target_names()
    new = without_expert_patterns(config, adapter.expert_target_names(), other_names)
    new.pop("lora_B_layout", None)
    new["target_parameters"] = sorted(name for name in config.get("target_parameters") or []
                                      if not is_expert_target(name)) or None
    new["target_modules"] = sorted({*(name for name in config.get("target_modules") or []
                                      if not is_expert_target(name)), *family.projections})
    alpha = config["lora_alpha"]
    if rank != config["r"] or scaling_for(alpha, config["r"], False) != scaling:
        alpha, exact = alpha_for(scaling, rank, False)
        if not exact:
            written = scaling_for(alpha, rank, False)
            largest = max(float(factors.delta().abs().max()) / factors.scaling
                          for forms in chosen.values() for factors in forms.values())
            approximations.append(f"scaling {scaling} is not alpha / {rank} exactly (max |Δ delta| "
                                  f"{abs(scaling - written) * largest:.2g})")
        new["r"], new["lora_alpha"] = rank, alpha
        pin_targets(new, config, other_names)
    dtype = next(iter(next(iter(chosen.values())).values())).a.dtype
    tensors = {}
    for index, forms in sorted(chosen.items()):
        layer = adapter.base.layers[index]
        for expert in range(layer.num_experts):
            for projection in PROJECTIONS:
                factors = forms.get(projection)
                outputs, inputs = layer.shape(projection)
                a = factors.a[expert] if factors else torch.zeros(rank, inputs, dtype=dtype)
                b = factors.b[expert] if factors else torch.zeros(outputs, rank, dtype=dtype)
                tensors[per_expert_key(layer.layer_prefix, family, expert, projection, "A")] = a.contiguous()
                tensors[per_expert_key(layer.layer_prefix, family, expert, projection, "B")] = b.contiguous()
    return {**tensors, **adapter.other_tensors}, new, rank
