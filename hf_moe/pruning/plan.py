"""Which experts each sparse layer keeps: the budget, and the pruning plan (the `keep` most salient experts).

A `LayerPlan` says, for one sparse layer, which source experts become the new experts 0..N-1 and, when merging,
which source experts are averaged into each of them (with what weights). Pruning is the plan where every kept expert
is only itself.
"""

from dataclasses import dataclass

import torch

from ..moe_layers import RoutingGroups

ONE_GROUP = RoutingGroups()  # plain top-k routing


@dataclass(frozen=True)
class LayerPlan:
    """Sparse layer `layer`'s new experts: new expert i takes source expert `kept[i]`'s router rows and the
    `weights[i]`-weighted average of source experts `members[i]` (`kept[i]` first); `kept` is in ascending order."""

    layer: int
    kept: tuple[int, ...]
    members: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]

    @classmethod
    def pruning(cls, layer: int, kept) -> "LayerPlan":
        kept = tuple(sorted(int(expert) for expert in kept))
        return cls(layer, kept, tuple((expert,) for expert in kept), tuple((1.0,) for _ in kept))

    def removed(self, num_experts: int) -> list[int]:
        """Source experts that are no new expert of their own (pruned, or merged into another)."""
        return [expert for expert in range(num_experts) if expert not in self.kept]

    @property
    def is_identity(self) -> bool:
        return all(group == (expert,) for expert, group in zip(self.kept, self.members, strict=True))


def keep_count(keep: int | float | str, num_experts: int, top_k: int = 1,
               groups: RoutingGroups = ONE_GROUP) -> int:
    """Experts kept per sparse layer: an integer N, or a ratio in (0, 1) of `num_experts` (rounded to nearest).

    Raises a `ValueError` naming `keep` and the counts this model accepts (`accepted_counts`) unless N is one of them.
    """
    choose = f"choose {_describe(accepted_counts(num_experts, top_k, groups), num_experts)}"
    text = str(keep).strip()
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"`keep`={keep!r} is invalid: an expert count N (e.g. 6) or a ratio in (0, 1) "
                         "(e.g. 0.5)") from None
    if value.is_integer() and "." not in text:
        count = int(value)
    elif 0 < value < 1:
        count = round(value * num_experts)
    else:
        raise ValueError(f"`keep`={keep!r} is invalid: a ratio must lie in (0, 1), e.g. 0.5 keeps half of the "
                         f"{num_experts} experts")
    if count >= num_experts:
        raise ValueError(f"`keep`={keep!r} keeps {count} of {num_experts} experts per layer: nothing to prune; "
                         f"{choose} (or a ratio that rounds to one of those)")
    if count < 1:
        raise ValueError(f"`keep`={keep!r} keeps no expert of {num_experts}; {choose}")
    check_budget(count, num_experts, top_k, groups)
    return count


def accepted_counts(num_experts: int, top_k: int, groups: RoutingGroups = ONE_GROUP) -> list[int]:
    """The expert counts below `num_experts` that a layer can keep and still route as the model does."""
    return [count for count in range(1, num_experts) if _budget_problem(count, top_k, groups) is None]


def _describe(counts: list[int], num_experts: int) -> str:
    if not counts:
        return f"none: no count below {num_experts} routes as the model does"
    if counts == list(range(counts[0], counts[-1] + 1)):
        return f"{counts[0]}..{counts[-1]}" if len(counts) > 1 else str(counts[0])
    return "one of " + ", ".join(map(str, counts))


def _budget_problem(count: int, top_k: int, groups: RoutingGroups) -> str | None:
    """Why a layer of `count` experts cannot route as the model does, or None."""
    if count < top_k:
        return (f"keeping {count} experts per layer is below `num_experts_per_tok`={top_k}: every token is routed "
                f"to {top_k} experts")
    if groups.count > 1:
        if count % groups.count:
            return (f"keeping {count} experts per layer does not split into the model's `n_group`={groups.count} "
                    "routing groups")
        per_group = count // groups.count
        if per_group < 2:
            return (f"keeping {count} experts leaves {per_group} per routing group; group-limited routing scores "
                    "each group by its top 2 experts")
        if groups.chosen * per_group < top_k:
            return (f"keeping {count} experts leaves {per_group} per group, and the `topk_group`={groups.chosen} "
                    f"chosen groups then hold fewer than `num_experts_per_tok`={top_k}")
    return None


def check_budget(count: int, num_experts: int, top_k: int, groups: RoutingGroups) -> None:
    """Raise a `ValueError` when a layer of `count` experts cannot route as the model does: fewer experts than the
    k each token uses, or (group-limited routing) groups that do not stay whole and equal. The message names the
    counts that can."""
    problem = _budget_problem(count, top_k, groups)
    if problem is not None:
        raise ValueError(f"{problem}; choose {_describe(accepted_counts(num_experts, top_k, groups), num_experts)}")


def group_slices(num_experts: int, groups: RoutingGroups) -> list[range]:
    """The experts of each routing group (contiguous, E / groups each; one group without group-limited routing)."""
    size = num_experts // groups.count
    return [range(start, start + size) for start in range(0, num_experts, size)]


def most_salient(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` highest `scores` (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda expert: (-float(scores[expert]), expert))
    return order[:count]


def pruning_plan(scores: torch.Tensor, layers: list[int], count: int, groups: RoutingGroups) -> list[LayerPlan]:
    """Keep the `count` most salient experts of every layer (`scores`: (layers, E)); with routing groups, the same
    number in every group, so each group stays whole."""
    plans = []
    for row, layer in enumerate(layers):
        slices = group_slices(scores.shape[1], groups)
        kept = [group[i] for group in slices for i in most_salient(scores[row, list(group)], count // len(slices))]
        plans.append(LayerPlan.pruning(layer, kept))
    return plans
