"""Expert saliency from calibration data: how much each routed expert contributes to its sparse layer's output.

A forward hook on every router that `hf_moe.moe_layers` finds reads the router's input (the tokens the block routes,
`(tokens, d)`; MH-MoE: sub-tokens) and its assignment (`token_assignment`: each token's top-k experts and their
combine weights g). Per layer × expert it accumulates, over the calibration tokens:

- `frequency`: routed assignments (tokens with the expert among their top-k), from the router's output alone;
- with `expert_norms=True` (REAP, EAN): `gate_sum` Σ g, `norm_sum` Σ ‖E_j(x)‖₂ and `reap_sum` Σ g · ‖E_j(x)‖₂ over
  them. The hook runs the block's own experts module once more on the tokens routed to each expert, so the expert
  function measured is the family's own (and its experts backend); routing frequency needs none of that;
- with `with_outputs=True` (for merging): `output_sum`, Σ E_j(x) over *every* token: HC-SMoE's expert representation
  (Chen et al., arXiv 2410.08589, Sec. 3.2), which every expert gets on the same tokens whether the router picks it
  or not (the norms then come with it).

g is the weight the block multiplies the expert's output with: renormalised top-k probabilities for hf_moe (default)
and Mixtral, raw softmax probabilities for Qwen2-MoE and OLMoE without `norm_topk_prob`, the normalised and scaled
sigmoid scores of DeepSeek-V3, 0 for an assignment dropped over capacity. So g · ‖E_j(x)‖₂ is the size of expert j's
contribution to the block output. Expert-choice models are refused: their experts pick tokens, so there is no
token's top-k to measure against (REAP's and EAN's definitions assume one).
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..moe_layers import EXPERT_CHOICE_ROUTING, MoeLayer, find_moe_layers, model_type, token_assignment

# method -> what it ranks experts by (higher = keep); the names and definitions are those of REAP's code
# (CerebrasResearch/reap, src/reap/pruning_metrics.py: `reap`, `expert_frequency`, `ean_sum`, `ean_mean`)
METHODS = {
    "reap": "REAP (Lasby et al., arXiv 2510.13999): mean of g · ‖E_j(x)‖₂ over the tokens routed to the expert",
    "frequency": "routing frequency: the share of routed assignments that go to the expert (MC-SMoE's usage "
                 "frequency, arXiv 2310.01334)",
    "ean_sum": "expert activation norm, summed: Σ ‖E_j(x)‖₂ over the tokens routed to the expert (REAP's `ean_sum`)",
    "ean_mean": "expert activation norm, averaged: mean ‖E_j(x)‖₂ over the tokens routed to the expert (REAP's "
                "`ean_mean`)",
}
NORM_METHODS = ("reap", "ean_sum", "ean_mean")  # those that need each expert's output norms


@dataclass
class ExpertSaliency:
    """Routing statistics per sparse layer × expert, from `measure_saliency`. Rows follow `layers`."""

    layers: list[int]  # decoder-layer indices of the sparse blocks
    num_experts: int
    tokens: int = 0  # router rows seen per layer (tokens; MH-MoE: sub-tokens)
    frequency: torch.Tensor = None  # (layers, E) routed assignments (counts)
    expert_norms: bool = True  # whether the sums below were measured (False: routing counts only)
    gate_sum: torch.Tensor = None  # (layers, E) Σ g
    norm_sum: torch.Tensor = None  # (layers, E) Σ ‖E_j(x)‖₂
    reap_sum: torch.Tensor = None  # (layers, E) Σ g · ‖E_j(x)‖₂
    output_sum: torch.Tensor | None = None  # (layers, E, d) Σ E_j(x) over all tokens (with_outputs=True)
    sequences: int = 0
    source: str = field(default="")  # what the calibration data was, for pruning.json and the card

    def __post_init__(self):
        shape = (len(self.layers), self.num_experts)
        for name in ("frequency", "gate_sum", "norm_sum", "reap_sum"):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(shape, dtype=torch.float64))

    def scores(self, method: str) -> torch.Tensor:
        """(layers, E) saliency under `method` (one of `METHODS`); an expert no token reached scores 0."""
        if method not in METHODS:
            raise ValueError(f"`method`={method!r} is invalid: choose one of {tuple(METHODS)}")
        if method in NORM_METHODS and not self.expert_norms:
            raise ValueError(f"`method`={method!r} needs the experts' output norms; these statistics hold routing "
                             "counts only: measure with `expert_norms=True`")
        routed = self.frequency.clamp(min=1)
        if method == "reap":
            return self.reap_sum / routed
        if method == "ean_sum":
            return self.norm_sum.clone()
        if method == "ean_mean":
            return self.norm_sum / routed
        return self.frequency / self.frequency.sum(-1, keepdim=True).clamp(min=1)

    def methods(self) -> list[str]:
        """The methods these statistics can score."""
        return [method for method in METHODS if self.expert_norms or method not in NORM_METHODS]

    def mean_outputs(self) -> torch.Tensor:
        """(layers, E, d) each expert's mean output over all calibration tokens (needs `with_outputs=True`)."""
        if self.output_sum is None:
            raise ValueError("these statistics were measured without expert outputs; measure with "
                             "`with_outputs=True` (merging needs them)")
        return self.output_sum / max(self.tokens, 1)

    def to_dict(self) -> dict:
        """The statistics as JSON-ready lists (for pruning.json): `routing_counts` (routed assignments per layer ×
        expert) and the score of every method measured (`frequency`: the share of those counts); the mean outputs
        are left out."""
        return {"layers": self.layers, "num_experts": self.num_experts, "tokens": self.tokens,
                "sequences": self.sequences, "calibration": self.source,
                "routing_counts": self.frequency.long().tolist(),
                **{method: self.scores(method).tolist() for method in self.methods()}}


class _RouterHook:
    """Reads one router's input and output and accumulates that layer's rows of an `ExpertSaliency`."""

    def __init__(self, saliency: ExpertSaliency, row: int, layer: MoeLayer, experts: nn.Module, with_outputs: bool):
        self.saliency, self.row, self.layer, self.experts = saliency, row, layer, experts
        self.with_outputs, self.expert_norms = with_outputs, saliency.expert_norms

    def expert_outputs(self, tokens: torch.Tensor, expert: int) -> torch.Tensor:
        """E_expert(tokens) through the block's experts module: every token routed to `expert` with weight 1."""
        index = torch.full((tokens.shape[0], 1), expert, dtype=torch.long, device=tokens.device)
        return self.experts(tokens, index, torch.ones(index.shape, dtype=tokens.dtype, device=tokens.device))

    @torch.no_grad()
    def __call__(self, router: nn.Module, args: tuple, output) -> None:
        assignment = token_assignment(self.layer, output)
        if assignment.from_logits_only:
            raise TypeError(f"{type(router).__name__} returns {type(output).__name__}, not (router_logits, "
                            "top_k_weights, top_k_index): its block cannot be measured")
        tokens = args[0].reshape(-1, args[0].shape[-1])  # (tokens, d): what the block's experts receive too
        stats, row = self.saliency, self.row
        if row == 0:  # every sparse layer routes the same number of rows: count them once
            stats.tokens += tokens.shape[0]
        for expert in range(stats.num_experts):
            routed = assignment.chosen[:, expert]  # (tokens,), with assignments dropped over capacity (g = 0)
            stats.frequency[row, expert] += routed.sum()
            if not self.expert_norms:  # routing counts only: no expert runs beyond the model's own forward
                continue
            if self.with_outputs:
                every_output = self.expert_outputs(tokens, expert).double()  # (tokens, d)
                stats.output_sum[row, expert] += every_output.sum(0)
                outputs = every_output[routed]
            elif routed.any():
                outputs = self.expert_outputs(tokens[routed], expert).double()
            else:
                continue
            gates = assignment.gates[routed, expert].double()  # (routed,)
            norms = outputs.norm(dim=-1)  # (routed,)
            stats.gate_sum[row, expert] += gates.sum()
            stats.norm_sum[row, expert] += norms.sum()
            stats.reap_sum[row, expert] += (gates * norms).sum()


@torch.no_grad()
def measure_saliency(model: nn.Module, inputs: Iterable[torch.Tensor], with_outputs: bool = False,
                     source: str = "", progress: bool = True, expert_norms: bool = True) -> ExpertSaliency:
    """Routing statistics of every sparse block of `model` over `inputs` ((1, seq) token ids, run one at a time: no
    padding enters the statistics). `expert_norms=False` counts the routing only (enough for `frequency`): the
    calibration then costs the model's forward passes and nothing more. `with_outputs=True` (merging) runs every
    expert on every token and measures the norms with it.

    Example:
    ```python
    >>> saliency = measure_saliency(model, [tokenizer("Experts route tokens.", return_tensors="pt").input_ids])
    >>> saliency.scores("reap").shape  # (sparse layers, experts)
    ```
    """
    layers = find_moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no sparse (MoE) layer to measure")
    expert_choice = [layer.index for layer in layers if layer.routing_kind == EXPERT_CHOICE_ROUTING]
    if expert_choice:
        raise ValueError(f"{type(model).__name__} (model_type={model_type(model)!r}) routes by expert choice (sparse "
                         f"layers {expert_choice}): saliency is defined for top-k routing, where each token has its k "
                         "experts and their combine weights; measure a top-k model")
    counts = {layer.num_experts for layer in layers}
    if len(counts) != 1:
        raise ValueError(f"the sparse layers have different expert counts {sorted(counts)}")
    num_experts = counts.pop()
    modules = dict(model.named_modules())
    saliency = ExpertSaliency(layers=[layer.index for layer in layers], num_experts=num_experts, source=source,
                              expert_norms=expert_norms or with_outputs)
    if with_outputs:
        width = modules[layers[0].router_name].weight.shape[-1]
        saliency.output_sum = torch.zeros(len(layers), num_experts, width, dtype=torch.float64)
    handles = []
    was_training = model.training
    model.eval()
    try:
        for row, layer in enumerate(layers):
            hook = _RouterHook(saliency, row, layer, modules[layer.experts_name], with_outputs)
            handles.append(layer.router.register_forward_hook(hook))
        for ids in tqdm(list(inputs), desc="calibration", unit="sequence", disable=not progress):
            model(input_ids=ids.reshape(1, -1).to(model.device), use_cache=False)
            saliency.sequences += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return saliency
