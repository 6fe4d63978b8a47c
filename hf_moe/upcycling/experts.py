"""Expert initialisation from one dense SwiGLU MLP (gate/up: (I, H), down: (H, I)).

Each function returns the fused expert tensors of transformers' layout: `gate_up_proj (E, 2I', H)` and
`down_proj (E, H, I')`, with I' = I except for `split_experts`.
"""

import torch

EXPERT_INITS = ("copy", "drop_upcycle", "split")


def fuse_experts(gates: torch.Tensor, ups: torch.Tensor, downs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, I, H), (E, I, H), (E, H, I) -> gate_up (E, 2I, H), down (E, H, I)."""
    return torch.cat([gates, ups], dim=1).contiguous(), downs.contiguous()


def copy_experts(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, num_experts: int,
                 noise_std: float = 0.0, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert is an exact copy of the dense MLP (Komatsuzaki et al., arXiv 2212.05055, Sec. 3).

    `noise_std > 0` adds Gaussian noise of `noise_std * std(matrix)` to each copy (as mergekit's `noise_scale`, but
    relative to each matrix's own spread), which breaks the dense equivalence on purpose.
    """
    copies = [w.unsqueeze(0).repeat(num_experts, *([1] * w.dim())) for w in (gate, up, down)]
    if noise_std > 0:
        for copy, original in zip(copies, (gate, up, down), strict=True):
            noise = torch.randn(copy.shape, generator=generator, dtype=torch.float32)
            copy.add_((noise * noise_std * original.float().std()).to(copy.dtype))
    return fuse_experts(*copies)


def drop_upcycle_experts(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, num_experts: int,
                         ratio: float, generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-Upcycling (Nakamura et al., arXiv 2502.19261): each expert is a copy of the dense MLP in which a random
    fraction `ratio` of the intermediate neurons is re-initialised from N(mean, std) of the matrix being replaced.

    The reference code permutes each expert's neurons and re-initialises a prefix; permuting an MLP's neurons does
    not change its function, so choosing a random subset is the same. One subset per expert is used for gate, up and
    down together, so a dropped neuron is re-initialised as a whole (`round(ratio * I)` neurons per expert).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"`drop_ratio`={ratio} is invalid: must be in [0, 1]")
    intermediate = gate.shape[0]
    num_dropped = round(ratio * intermediate)
    statistics = [(w.float().mean(), w.float().std()) for w in (gate, up, down)]

    def fresh(shape, mean_std):
        mean, std = mean_std
        return (torch.randn(shape, generator=generator) * std + mean)

    gates, ups, downs = [], [], []
    for _ in range(num_experts):
        dropped = torch.randperm(intermediate, generator=generator)[:num_dropped]
        g, u, d = gate.clone(), up.clone(), down.clone()
        g[dropped] = fresh((num_dropped, gate.shape[1]), statistics[0]).to(g.dtype)
        u[dropped] = fresh((num_dropped, up.shape[1]), statistics[1]).to(u.dtype)
        d[:, dropped] = fresh((down.shape[0], num_dropped), statistics[2]).to(d.dtype)
        gates.append(g), ups.append(u), downs.append(d)
    return fuse_experts(torch.stack(gates), torch.stack(ups), torch.stack(downs))


def split_experts(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, num_experts: int, granularity: int,
                  output_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine-grained experts (He et al., arXiv 2410.07524; Megatron-Core `upcycling_utils`).

    The dense intermediate dimension is cut into G shards of I/G neurons; expert `j * G + g` is shard g of virtual
    copy j (E/G copies). The shards of one copy sum to the dense MLP. `output_scale` multiplies each expert's
    `down_proj` to make up for the router weights (see `split_output_scale`); scaling `down` alone keeps the
    function exact where the paper's cube-root split over gate, up and down is only approximate for SwiGLU.
    """
    intermediate = gate.shape[0]
    if granularity < 1 or intermediate % granularity or num_experts % granularity:
        raise ValueError(f"`granularity`={granularity} is invalid: must divide the dense intermediate size "
                         f"({intermediate}) and `num_experts` ({num_experts})")
    shard = intermediate // granularity
    copies = num_experts // granularity
    gates = torch.stack([gate[g * shard:(g + 1) * shard] for g in range(granularity)] * copies)
    ups = torch.stack([up[g * shard:(g + 1) * shard] for g in range(granularity)] * copies)
    downs = torch.stack([down[:, g * shard:(g + 1) * shard] for g in range(granularity)] * copies)
    return fuse_experts(gates, ups, downs * output_scale)


def split_output_scale(num_experts: int, granularity: int, top_k: int, normalized: bool) -> float:
    """Weight scaling for fine-grained upcycling (arXiv 2410.07524).

    With renormalised top-k and a virtual-group router, a token picks whole groups of G shards with weight 1/k each,
    so scaling by G restores the dense output exactly when G divides k. With raw softmax probabilities
    (softmax-then-top-k, near-uniform router) each pick weighs about 1/E, so Megatron's factor E*G/k applies.
    """
    return float(granularity) if normalized else num_experts * granularity / top_k


def virtual_group_router(group_rows: torch.Tensor, granularity: int) -> torch.Tensor:
    """(E/G, d) -> (E, d): each virtual copy's row repeated for its G shards, so they get identical logits (the
    'virtual group' init of arXiv 2410.07524; Megatron takes the first E/G rows of a random router)."""
    return group_rows.repeat_interleave(granularity, dim=0).contiguous()


def mh_moe_experts(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, num_experts: int, num_heads: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """MH-MoE experts from a dense MLP: expert e acts on sub-tokens of width d/h with the dense weights of
    sub-space block `e mod h` (gate/up columns and down rows of that block).

    Exact equivalence is impossible (an expert sees only a d/h slice and the router cannot tell which slice a
    sub-token came from); this keeps each expert a piece of the dense MLP, and verification reports the deviation.
    """
    hidden = gate.shape[1]
    width = hidden // num_heads
    blocks = [e % num_heads for e in range(num_experts)]
    gates = torch.stack([gate[:, b * width:(b + 1) * width] for b in blocks])
    ups = torch.stack([up[:, b * width:(b + 1) * width] for b in blocks])
    downs = torch.stack([down[b * width:(b + 1) * width] for b in blocks])
    return fuse_experts(gates, ups, downs)
