"""The train/inference gap of expert-choice routers: how far the causal threshold rule used outside training is from
the batch selection the model was trained with.

Expert choice (arXiv 2202.09368) selects tokens per expert over a group of tokens, which is not causal; hf_moe's
routers therefore route by a per-expert threshold outside training (`MoeConfig.expert_choice_eval_rule`). This
recorder hooks the routers of a model running the threshold rule and, on the very hidden states each router sees,
also computes the batch selection it would have made, counting per layer where the two agree.
"""

from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn

from .modeling.modeling_hf_moe import expert_choice_selection
from .moe_layers import EXPERT_CHOICE_ROUTING, MoeLayer, find_moe_layers, token_assignment


def expert_choice_layers(model: nn.Module) -> list[MoeLayer]:
    """The sparse layers of `model` that route by expert choice (empty for top-k models)."""
    return [layer for layer in find_moe_layers(model) if layer.routing_kind == EXPERT_CHOICE_ROUTING]


def expert_choice_routers(model: nn.Module) -> dict[int, nn.Module]:
    """{decoder layer: router} of the expert-choice routers of `model` (empty for top-k models)."""
    return {layer.index: layer.router for layer in expert_choice_layers(model)}


class ExpertChoiceGapRecorder:
    """Counts, per layer, the (token, expert) decisions of the causal rule against the batch selection.

    Per router call: `selected` is what the router did (threshold rule), `batch` the expert-choice selection over the
    call's real tokens (per sequence when the model was trained per sequence). Padding rows count for neither.
    `summary()` gives per layer and averaged: `agreement` (share of all decisions made alike), `recall` (share of the
    batch selection the causal rule also made), `precision` (share of the causal choices the batch selection also
    made) and the experts per token (MH-MoE: per sub-token) under both rules, mean and standard deviation.
    """

    def __init__(self, model: nn.Module):
        layers = expert_choice_layers(model)
        self.routers = {layer.index: layer.router for layer in layers}
        self.totals = defaultdict(lambda: defaultdict(float))
        self.enabled = True  # off while generating: a decoding step's one-token "batch" is no selection group
        self.handles = [layer.router.register_forward_hook(self._hook(layer)) for layer in layers]

    @contextmanager
    def paused(self):
        """Record nothing inside (generation, or forwards under the batch rule)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, layer: MoeLayer):
        def record(router, inputs, outputs):
            if not self.enabled or router.training or router.eval_rule != "threshold":
                return
            assignment = token_assignment(layer, outputs)
            token_mask = inputs[1] if len(inputs) > 1 else None
            group_size = inputs[2] if len(inputs) > 2 and router.group_by_sequence else None
            with torch.no_grad():
                batch, _ = expert_choice_selection(assignment.logits.float().softmax(-1), layer.experts_per_token,
                                                   group_size, token_mask)
                self._count(layer.index, assignment.chosen, batch, token_mask)

        return record

    def _count(self, layer: int, causal: torch.Tensor, batch: torch.Tensor, token_mask) -> None:
        if token_mask is not None:
            real = token_mask.bool()
            causal, batch = causal[real], batch[real]
        totals = self.totals[layer]
        totals["decisions"] += causal.numel()
        totals["agree"] += (causal == batch).sum().item()
        totals["both"] += (causal & batch).sum().item()
        totals["causal"] += causal.sum().item()
        totals["batch"] += batch.sum().item()
        totals["rows"] += causal.shape[0]
        for name, chosen in (("causal", causal), ("batch", batch)):
            per_row = chosen.sum(-1).double()
            totals[f"{name}_squares"] += per_row.square().sum().item()

    def summary(self) -> dict:
        per_layer = {}
        for layer, totals in sorted(self.totals.items()):
            rows = max(totals["rows"], 1)
            values = {
                "agreement": totals["agree"] / max(totals["decisions"], 1),
                "recall": totals["both"] / max(totals["batch"], 1),
                "precision": totals["both"] / max(totals["causal"], 1),
            }
            for name in ("causal", "batch"):
                mean = totals[name] / rows
                values[f"experts_per_token_{name}"] = mean
                values[f"experts_per_token_{name}_std"] = max(totals[f"{name}_squares"] / rows - mean * mean, 0) ** .5
            per_layer[layer] = values
        if not per_layer:
            return {}
        keys = next(iter(per_layer.values()))
        averaged = {key: sum(values[key] for values in per_layer.values()) / len(per_layer) for key in keys}
        return {**averaged, "per_layer": per_layer}
