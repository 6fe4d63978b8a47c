"""The routing seam (`hf_moe.moe_layers`): each layer's routing kind and experts per token, and `token_assignment`,
which turns any family's router output into per-row experts and gate weights. Every assignment is checked against
an independent computation from the router's weights on the hidden states the router received."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from hf_moe.moe_layers import EXPERT_CHOICE_ROUTING, TOP_K_ROUTING, find_moe_layers, token_assignment

from .conftest import tiny_config
from .test_builtin_moe import FAMILIES

IDS = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def _dense(index: torch.Tensor, weights: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, E) bool and gates from (rows, k) experts and weights, by a plain loop."""
    chosen = torch.zeros(index.shape[0], num_experts, dtype=torch.bool)
    gates = torch.zeros(index.shape[0], num_experts)
    for row in range(index.shape[0]):
        for slot in range(index.shape[1]):
            chosen[row, index[row, slot]] = True
            gates[row, index[row, slot]] = weights[row, slot]
    return chosen, gates


def _softmax_top_k(rows, weight, top_k, normalise):
    probs = F.linear(rows.float(), weight.float()).softmax(-1)
    values, index = probs.topk(top_k, dim=-1)
    return index, values / values.sum(-1, keepdim=True) if normalise else values


def _deepseek_v3(rows, router):
    """DeepSeek-V3 with one group: top-k of sigmoid scores + selection bias, weighted by the unbiased scores,
    renormalised and scaled."""
    scores = F.linear(rows.float(), router.weight.float()).sigmoid()
    index = (scores + router.e_score_correction_bias).topk(router.top_k, dim=-1).indices
    weights = scores.gather(-1, index)
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * router.routed_scaling_factor
    return index, weights


def _switch_with_capacity(rows, weight, capacity_factor):
    """Top-1 of the softmax; each expert keeps its first ceil(c * tokens / E) tokens, the rest weigh 0."""
    index, weights = _softmax_top_k(rows, weight, 1, normalise=False)
    capacity = math.ceil(capacity_factor * rows.shape[0] / weight.shape[0])
    taken, dropped = [0] * weight.shape[0], 0
    for row in range(rows.shape[0]):
        expert = int(index[row, 0])
        taken[expert] += 1
        if taken[expert] > capacity:
            weights[row, 0] = 0.0
            dropped += 1
    return index, weights, dropped


# Each case: a model, and the reference (router rows, router) -> ((rows, k) index, (rows, k) weights).
TOP_K_CASES = {
    "hf_moe": (lambda: tiny_config("hf_moe"),
               lambda rows, router: _softmax_top_k(rows, router.weight, 2, normalise=True)),
    "hf_mh_moe": (lambda: tiny_config("hf_mh_moe"),
                  lambda rows, router: _softmax_top_k(rows, router.weight, 2, normalise=True)),
    "mixtral": (FAMILIES["mixtral"], lambda rows, router: _softmax_top_k(rows, router.weight, 2, normalise=True)),
    "qwen2_moe": (FAMILIES["qwen2_moe"],  # norm_topk_prob defaults to False: the raw probabilities
                  lambda rows, router: _softmax_top_k(rows, router.weight, 2, normalise=False)),
    "olmoe": (FAMILIES["olmoe"], lambda rows, router: _softmax_top_k(rows, router.weight, 2, normalise=False)),
    "deepseek_v3": (FAMILIES["deepseek_v3"], _deepseek_v3),
}


def _run_with_hooks(model):
    """{layer index: (router input rows, TokenAssignment)} of one eval forward over `IDS`."""
    seen = {}
    handles = []
    for layer in find_moe_layers(model):
        def hook(router, args, output, layer=layer):
            rows = args[0].reshape(-1, args[0].shape[-1])
            seen[layer.index] = (rows.detach(), token_assignment(layer, output))

        handles.append(layer.router.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)
    for handle in handles:
        handle.remove()
    return seen


def _randomise_routers(model):
    """Routers some families initialise to zeros get random weights (and DeepSeek-V3 a selection bias that matters),
    so that every row routes differently."""
    generator = torch.Generator().manual_seed(2)
    for layer in find_moe_layers(model):
        with torch.no_grad():
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=generator))
            bias = getattr(layer.router, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("case", list(TOP_K_CASES))
def test_top_k_assignment_equals_the_routers_own_top_k(case):
    make_config, reference = TOP_K_CASES[case]
    model = AutoModelForCausalLM.from_config(make_config())
    _randomise_routers(model)
    layers = find_moe_layers(model)
    assert layers and all((layer.routing_kind, layer.experts_per_token) == (TOP_K_ROUTING, 2) for layer in layers)
    seen = _run_with_hooks(model)
    assert sorted(seen) == [layer.index for layer in layers]
    subtokens = getattr(model.config, "num_subtokens", 1)
    for layer in layers:
        rows, assignment = seen[layer.index]
        assert rows.shape[0] == IDS.numel() * subtokens  # MH-MoE: one row per sub-token
        index, weights = reference(rows, layer.router)
        chosen, gates = _dense(index, weights, layer.num_experts)
        assert torch.equal(assignment.chosen, chosen)
        assert (assignment.gates.float() - gates).abs().max().item() <= 1e-6
        assert assignment.chosen.sum(-1).eq(2).all() and not assignment.dropped.any()
        assert assignment.index.shape == assignment.weights.shape == (rows.shape[0], 2)
        assert assignment.logits.shape == (rows.shape[0], layer.num_experts)


def test_switch_assignment_keeps_the_dropped_choice_with_gate_zero():
    model = AutoModelForCausalLM.from_config(tiny_config("hf_switch", eval_capacity_factor=0.5))
    layers = find_moe_layers(model)
    assert all((layer.routing_kind, layer.experts_per_token) == (TOP_K_ROUTING, 1) for layer in layers)
    seen = _run_with_hooks(model)
    total_dropped = 0
    for layer in layers:
        rows, assignment = seen[layer.index]
        index, weights, dropped = _switch_with_capacity(rows, layer.router.weight, 0.5)
        chosen, gates = _dense(index, weights, layer.num_experts)
        assert torch.equal(assignment.chosen, chosen)  # every row keeps its choice, dropped or not
        assert (assignment.gates.float() - gates).abs().max().item() <= 1e-6
        assert assignment.dropped.sum().item() == dropped
        total_dropped += dropped
    assert total_dropped > 0  # capacity 0.5 x 20 / 4 = 3 tokens per expert: some rows are dropped


@pytest.mark.parametrize("model_type", ["hf_moe", "hf_mh_moe"])
def test_expert_choice_assignment_is_the_threshold_selection(model_type):
    config = tiny_config(model_type, router_type="expert_choice", expert_capacity_factor=1.5,
                         initializer_range=0.2)
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    for _ in range(4):  # training forwards estimate the thresholds the eval forward routes by
        model(input_ids=torch.randint(3, 97, (2, 16)))
    layers = find_moe_layers(model)
    assert all((layer.routing_kind, layer.experts_per_token) == (EXPERT_CHOICE_ROUTING, 1.5) for layer in layers)
    seen = _run_with_hooks(model)
    for layer in layers:
        rows, assignment = seen[layer.index]
        probs = F.linear(rows.float(), layer.router.weight.float()).softmax(-1)
        chosen = probs >= layer.router.expert_choice_threshold
        assert chosen.sum(-1).unique().numel() > 1  # a varying number of experts per row
        assert torch.equal(assignment.chosen, chosen)
        assert (assignment.gates - probs * chosen).abs().max().item() <= 1e-6
        assert assignment.index is None and assignment.weights is None and not assignment.dropped.any()


class _LogitsOnlyRouter(nn.Module):
    def __init__(self, hidden_size=8, num_experts=4, top_k=2):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.randn(num_experts, hidden_size))

    def forward(self, hidden_states):
        return hidden_states @ self.weight.t()


@pytest.mark.parametrize("as_tuple", [False, True])
def test_a_router_returning_only_logits_is_read_as_top_k_of_its_softmax(as_tuple):
    block = nn.Module()
    block.gate = _LogitsOnlyRouter()
    (layer,) = find_moe_layers(block)
    assert (layer.routing_kind, layer.experts_per_token) == (TOP_K_ROUTING, 2)
    rows = torch.randn(6, 8)
    logits = block.gate(rows)
    assignment = token_assignment(layer, (logits,) if as_tuple else logits)
    chosen, gates = _dense(*_softmax_top_k(rows, block.gate.weight, 2, normalise=False), 4)
    assert assignment.from_logits_only
    assert torch.equal(assignment.chosen, chosen)
    assert (assignment.gates - gates).abs().max().item() <= 1e-6


def test_router_output_with_batch_dimensions_is_read_per_row():
    (layer,) = find_moe_layers(_mixtral_block())
    logits = torch.randn(2, 5, 4)
    weights, index = logits.softmax(-1).topk(2, dim=-1)
    assignment = token_assignment(layer, (logits, weights, index))
    assert assignment.chosen.shape == assignment.gates.shape == (10, 4)
    assert torch.equal(assignment.index, index.reshape(10, 2))


def _mixtral_block():
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    return MixtralSparseMoeBlock(transformers.MixtralConfig(hidden_size=8, intermediate_size=8, num_local_experts=4,
                                                            num_experts_per_tok=2))


def test_a_bare_expert_choice_block_is_found_with_its_kind():
    """Without a model's declared routers, the router is found by its shape and `routing_kind` (it has no k)."""
    from hf_moe.modeling.modeling_hf_moe import MoeSparseBlock

    block = MoeSparseBlock(tiny_config("hf_moe", router_type="expert_choice", expert_capacity_factor=1.5))
    (layer,) = find_moe_layers(block)
    assert (layer.router_name, layer.routing_kind, layer.experts_per_token) == ("gate", EXPERT_CHOICE_ROUTING, 1.5)
