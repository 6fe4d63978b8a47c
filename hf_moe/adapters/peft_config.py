"""adapter_config.json as peft 0.21 reads it: each target's rank and alpha, and the edits a conversion makes.

peft gives a target the rank and alpha of the first `rank_pattern` / `alpha_pattern` key that matches the end of its
name (`peft.utils.other.get_pattern_key`: `re.match(rf"(.*\\.)?({key})$", name)`), else `r` / `lora_alpha`; the
scaling is alpha / r, or alpha / sqrt(r) with `use_rslora`. For a 3-D parameter the name is the experts module's
plus the parameter's (`model.layers.0.mlp.experts.gate_up_proj`). The rule is re-implemented here (three lines)
rather than imported, so the library reads adapters without peft installed; tests/test_adapters.py checks it against
peft's own loading.
"""

import copy
import math
import re

from .names import FUSED_PARAMETERS, PER_EXPERT_PROJECTIONS


def pattern_matches(pattern: str, name: str) -> bool:
    return re.match(rf"(.*\.)?({pattern})$", name) is not None


def _lookup(patterns: dict | None, name: str):
    for pattern, value in (patterns or {}).items():
        if pattern_matches(pattern, name):
            return value
    return None


def rank_and_alpha(config: dict, name: str) -> tuple[int, float]:
    """The rank and alpha peft gives the target `name` (a module, or a module + '.' + a parameter)."""
    rank = _lookup(config.get("rank_pattern"), name)
    alpha = _lookup(config.get("alpha_pattern"), name)
    return (config["r"] if rank is None else rank), (config["lora_alpha"] if alpha is None else alpha)


def scaling_for(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def target_scaling(config: dict, name: str) -> tuple[int, float]:
    """(rank, scaling) peft gives the target `name`."""
    rank, alpha = rank_and_alpha(config, name)
    return rank, scaling_for(alpha, rank, bool(config.get("use_rslora")))


def alpha_for(scaling: float, rank: int, rslora: bool) -> tuple[float, bool]:
    """The alpha giving `scaling` at `rank`, and whether peft's division gives `scaling` back exactly."""
    alpha = scaling * (math.sqrt(rank) if rslora else rank)
    if float(alpha).is_integer():
        alpha = int(alpha)
    return alpha, scaling_for(alpha, rank, rslora) == scaling


def is_expert_target(name: str) -> bool:
    """A target_modules / target_parameters entry that names the routed experts (fused or per expert)."""
    last = name.rpartition(".")[2]
    return (last in FUSED_PARAMETERS and ("experts" in name.split(".")[:-1] or name == last)
            or last in PER_EXPERT_PROJECTIONS)


def without_expert_patterns(config: dict, expert_names: list[str], other_names: list[str]) -> dict:
    """A copy of `config` without the rank / alpha pattern keys that match an expert target; a key matching both an
    expert target and another target cannot be taken apart and raises."""
    config = copy.deepcopy(config)
    for field in ("rank_pattern", "alpha_pattern"):
        kept = {}
        for pattern, value in (config.get(field) or {}).items():
            expert = any(pattern_matches(pattern, name) for name in expert_names)
            if expert and any(pattern_matches(pattern, name) for name in other_names):
                raise ValueError(f"adapter_config.json `{field}` key {pattern!r} matches both expert and other "
                                 "targets; give them separate keys")
            if not expert:
                kept[pattern] = value
        config[field] = kept
    return config


def pin_targets(new: dict, old: dict, names: list[str]) -> None:
    """Give every target in `names` whose rank or alpha differs under `new` (after `r` / `lora_alpha` changed) its
    value under `old`, through an exact-name pattern key."""
    for name in names:
        if rank_and_alpha(new, name) == rank_and_alpha(old, name):
            continue
        rank, alpha = rank_and_alpha(old, name)
        new.setdefault("rank_pattern", {})[re.escape(name)] = rank
        new.setdefault("alpha_pattern", {})[re.escape(name)] = alpha
        if rank_and_alpha(new, name) != (rank, alpha):
            raise ValueError(f"adapter_config.json: another rank / alpha pattern key decides {name!r}; the converted "
                             "adapter could not keep its rank and alpha")
