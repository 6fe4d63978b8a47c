"""Merging instead of pruning: HC-SMoE (Chen et al., "Retraining-Free Merging of Sparse Mixture-of-Experts via
Hierarchical Clustering", ICML 2025, arXiv 2410.08589), as its code does it (wazenmai/HC-SMoE,
`hcsmoe/merging/clustering.py`; REAP's reproduction, CerebrasResearch/reap `experiments/hc_smoe.sh`, uses the same
settings).

Per sparse layer, each expert is represented by its mean output over *all* calibration tokens (every expert sees the
same tokens, so the grouping does not depend on the router); average-linkage hierarchical clustering on the Euclidean
distance between those mean outputs groups the experts into N clusters; each cluster becomes one expert, the
routing-frequency-weighted average of its members' weights (the `freq` merge).

The router is where a stock architecture cannot follow the references: they keep all E router rows and let every
member of a cluster call the merged expert (a token routed to two members gets it with both weights). One router row
per expert cannot say that, so the merged expert keeps the router rows of its most frequently routed member (REAP's
"dominant expert", `src/reap/merge.py`), the member its weights lean on most; the other members' rows are dropped
as in pruning.

With routing groups (DeepSeek-V3) clusters never cross a group, and every group keeps N / groups experts.
"""

import torch

from ..moe_layers import RoutingGroups
from .plan import LayerPlan, group_slices, most_salient
from .saliency import ExpertSaliency


def euclidean_distances(vectors: torch.Tensor) -> torch.Tensor:
    """(n, n) Euclidean distances ‖a − b‖₂ between the rows of `vectors`, in float64."""
    vectors = vectors.double()
    return (vectors.unsqueeze(1) - vectors.unsqueeze(0)).norm(dim=-1)


def cosine_distances(vectors: torch.Tensor) -> torch.Tensor:
    """(n, n) 1 - cosine similarity of the rows of `vectors` (a zero row is at distance 1 from every other)."""
    unit = vectors.double() / vectors.double().norm(dim=-1, keepdim=True).clamp(min=1e-30)
    return (1.0 - unit @ unit.T).clamp(min=0.0)


def average_linkage_clusters(distances: torch.Tensor, count: int) -> list[list[int]]:
    """Agglomerative clustering of n items into `count` clusters, joining the two clusters with the smallest mean
    pairwise distance (average linkage, UPGMA) until `count` remain. Ties join the earliest pair. Each cluster is a
    sorted list of item indices; clusters are ordered by their first item."""
    n = distances.shape[0]
    linkage = distances.double().clone()
    linkage.fill_diagonal_(float("inf"))
    clusters: dict[int, list[int]] = {i: [i] for i in range(n)}
    while len(clusters) > count:
        flat = int(torch.argmin(linkage))
        a, b = sorted(divmod(flat, n))
        size_a, size_b = len(clusters[a]), len(clusters[b])
        # Lance-Williams update for average linkage: d(a ∪ b, c) = (|a| d(a, c) + |b| d(b, c)) / (|a| + |b|).
        merged = (size_a * linkage[a] + size_b * linkage[b]) / (size_a + size_b)
        linkage[a], linkage[:, a] = merged, merged
        linkage[a, a] = float("inf")
        linkage[b], linkage[:, b] = float("inf"), float("inf")
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    return sorted(clusters.values())


def merging_plan(saliency: ExpertSaliency, count: int, groups: RoutingGroups) -> list[LayerPlan]:
    """HC-SMoE clusters of every sparse layer, each merged by routing frequency into its most frequently routed
    member (ties: the lower index)."""
    outputs, frequency = saliency.mean_outputs(), saliency.frequency
    plans = []
    for row, layer in enumerate(saliency.layers):
        merged = []
        for group in group_slices(saliency.num_experts, groups):
            experts = list(group)
            local = average_linkage_clusters(euclidean_distances(outputs[row, experts]), count // groups.count)
            for cluster in local:
                members = [experts[i] for i in cluster]
                representative = members[most_salient(frequency[row, members], 1)[0]]
                ordered = [representative, *(m for m in members if m != representative)]
                counts = frequency[row, ordered]
                if counts.sum() > 0:
                    weights = tuple(float(c) for c in counts / counts.sum())
                else:  # no calibration token reached the cluster: keep the representative as it is
                    weights = (1.0,) + (0.0,) * (len(ordered) - 1)
                merged.append((representative, tuple(ordered), weights))
        merged.sort()
        plans.append(LayerPlan(layer, tuple(r for r, _, _ in merged), tuple(m for _, m, _ in merged),
                               tuple(w for _, _, w in merged)))
    return plans


def merge_tensors(tensors: list[torch.Tensor], weights: tuple[float, ...]) -> torch.Tensor:
    """Σ weights[i] · tensors[i], accumulated in float64 and rounded once to the tensors' dtype: a single tensor is
    returned as is, and merging identical tensors returns them bit for bit."""
    if len(tensors) == 1:
        return tensors[0]
    total = sum(weight * tensor.double() for weight, tensor in zip(weights, tensors, strict=True))
    return total.to(tensors[0].dtype)
