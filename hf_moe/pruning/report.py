"""What a pruned folder records about its pruning: pruning.json (the plan and the saliency per layer × expert) and
the saliency heatmap."""

from pathlib import Path

import numpy as np
import torch

from ..heatmap import save_heatmap
from .plan import LayerPlan
from .saliency import METHODS, ExpertSaliency

SALIENCY_HEATMAP = "pruning_saliency.png"
MERGE_METHOD = ("HC-SMoE (arXiv 2410.08589): average-linkage clustering of the experts' mean outputs (Euclidean "
                "distance), routing-frequency-weighted average into each cluster's most frequently routed member")


def pruning_report(plans: list[LayerPlan], num_experts: int, top_k: int, *, method: str | None = None,
                   merge: bool = False, keep: str | None = None, saliency: ExpertSaliency | None = None) -> dict:
    """The content of pruning.json: what was asked, the plan per layer, and the calibration statistics (`method`
    None: a plan made by hand, without calibration)."""
    report = {
        "method": method,
        "method_definition": METHODS.get(method, "a plan given by the caller"),
        "merge": MERGE_METHOD if merge else None,
        "keep": keep if keep is not None else str(len(plans[0].kept)),
        "num_experts": {"source": num_experts, "pruned": len(plans[0].kept)},
        "num_experts_per_tok": top_k,
        "plan": [{"layer": plan.layer, "kept": list(plan.kept), "removed": plan.removed(num_experts),
                  **({"merged": [{"into": kept, "members": list(members), "weights": list(weights)}
                                 for kept, members, weights in zip(plan.kept, plan.members, plan.weights,
                                                                    strict=True)]}
                     if not plan.is_identity else {})}
                 for plan in plans],
    }
    if saliency is not None:
        report["calibration"] = {"data": saliency.source, "sequences": saliency.sequences, "tokens": saliency.tokens}
        report["saliency"] = saliency.to_dict()
    return report


def save_saliency_heatmap(scores: torch.Tensor, layers: list[int], plans: list[LayerPlan], path: Path,
                          title: str) -> np.ndarray:
    """Write the (layers, E) `scores` as a PNG, each row divided by its maximum, removed experts marked x; return the
    image as (H, W, 3) uint8."""
    shown = scores / scores.max(-1, keepdim=True).values.clamp(min=1e-30)
    marks = [(row, expert) for row, plan in enumerate(plans) for expert in plan.removed(shown.shape[1])]
    return save_heatmap(shown, layers, path, title, "saliency / layer max", row_label="sparse layer", vmax=1.0,
                        marks=marks, size=(1.6, 0.45, 1.2, 0.3))
