"""Sparse blocks and routers: agreement with transformers' Mixtral block, Switch capacity, MH-MoE sub-tokens, the
auxiliary losses on known inputs."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from hf_moe import load_balancing_loss, router_z_loss
from hf_moe.modeling import EXPERT_CHOICE_ROUTING, TOP_K_ROUTING
from hf_moe.modeling.modeling_hf_moe import (
    MHMoeSparseBlock,
    MoeExpertChoiceRouter,
    MoeSparseBlock,
    MoeTopKRouter,
    drop_over_capacity,
)

from .conftest import tiny_config


def _random_block(block_class, config):
    block = block_class(config)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return block


def test_moe_block_equals_transformers_mixtral_block_on_the_same_weights():
    config = tiny_config("hf_moe", num_experts=8, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    block = _random_block(MoeSparseBlock, config).eval()
    mixtral_config = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    mixtral_config._experts_implementation = "eager"
    mixtral = MixtralSparseMoeBlock(mixtral_config).eval()
    mixtral.load_state_dict(block.state_dict())
    hidden = torch.randn(3, 11, 32)
    difference = (block(hidden) - mixtral(hidden)).abs().max().item()
    assert difference < 1e-5


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_transformers_experts_backends_agree_with_the_default_forward(implementation):
    config = tiny_config("hf_moe", num_experts=8, expert_dropout=0.0)
    config._experts_implementation = "eager"
    block = _random_block(MoeSparseBlock, config).eval()
    hidden = torch.randn(2, 9, 32)
    expected = block(hidden)
    config._experts_implementation = implementation
    assert (block(hidden) - expected).abs().max().item() < 1e-5


def test_drop_over_capacity_keeps_first_come_first_served_per_expert():
    # 6 tokens, top-1, 2 experts, capacity factor 1.0 -> 3 slots per expert.
    index = torch.tensor([[0], [0], [1], [0], [0], [1]])
    weights = torch.full((6, 1), 0.5)
    kept = drop_over_capacity(index, weights, num_experts=2, capacity_factor=1.0)
    assert kept.squeeze(1).tolist() == [0.5, 0.5, 0.5, 0.5, 0.0, 0.5]  # the 4th token for expert 0 is dropped


def test_drop_over_capacity_serves_first_choices_before_second_choices():
    # Token 0's second choice and token 1's first choice both want expert 1, which has 1 slot (cf 0.5, 2 tokens x 2).
    index = torch.tensor([[0, 1], [1, 0]])
    weights = torch.ones(2, 2)
    kept = drop_over_capacity(index, weights, num_experts=2, capacity_factor=0.5)
    assert kept.tolist() == [[1.0, 0.0], [1.0, 0.0]]


def test_switch_drops_exactly_the_tokens_over_capacity_and_outputs_zero_for_them():
    config = tiny_config("hf_switch", num_experts=4, capacity_factor=1.0, router_jitter_noise=0.0)
    config._experts_implementation = "eager"
    block = _random_block(MoeSparseBlock, config).train()
    tokens = torch.randn(40, 32)
    with torch.no_grad():
        logits = block.gate.weight @ tokens.T  # (E, tokens)
        choice = logits.argmax(0)
        capacity = math.ceil(1.0 * 40 / 4)
        expected_dropped = torch.zeros(40, dtype=torch.bool)
        for expert in range(4):
            queue = (choice == expert).nonzero().squeeze(1)
            expected_dropped[queue[capacity:]] = True
        _, weights, index = block.gate(tokens)
        output = block(tokens[None])[0]
    assert expected_dropped.any(), "the test needs an overflowing expert"
    assert torch.equal(index.squeeze(1), choice)
    assert torch.equal(weights.squeeze(1) == 0, expected_dropped)
    assert output[expected_dropped].abs().max().item() == 0.0
    assert output[~expected_dropped].abs().min().item() > 0.0
    probability = logits.T.softmax(-1).gather(1, choice[:, None]).squeeze(1)
    assert torch.allclose(weights.squeeze(1)[~expected_dropped], probability[~expected_dropped])


def test_switch_uses_the_eval_capacity_factor_outside_training():
    config = tiny_config("hf_switch", num_experts=4, capacity_factor=0.5, eval_capacity_factor=None)
    block = _random_block(MoeSparseBlock, config)
    tokens = torch.randn(40, 32)
    _, train_weights, _ = block.train().gate(tokens)
    _, eval_weights, _ = block.eval().gate(tokens)
    assert (train_weights == 0).sum().item() >= 20  # at most half the tokens fit
    assert (eval_weights == 0).sum().item() == 0  # dropless


def test_mh_moe_routes_h_subtokens_per_token():
    config = tiny_config("hf_mh_moe", num_moe_heads=4, num_experts=4, moe_intermediate_size=8)
    config._experts_implementation = "eager"
    block = _random_block(MHMoeSparseBlock, config).eval()
    hidden = torch.randn(2, 5, 32)
    seen = {}
    block.gate.register_forward_hook(lambda module, inputs, outputs: seen.update(inputs=inputs[0], out=outputs))
    output = block(hidden)
    assert seen["inputs"].shape == (2 * 5 * 4, 8)  # (tokens * h, d / h)
    assert seen["out"][0].shape == (40, 4) and seen["out"][2].shape == (40, 2)
    # Sub-token j of token t is columns j*d/h:(j+1)*d/h of the head projection of t.
    projected = block.head_proj(hidden).reshape(10, 32)
    assert torch.equal(seen["inputs"][4 * 3 + 2], projected[3, 16:24])
    # Reference: route every sub-token separately, merge in order, merge projection.
    expert_out = block.experts(seen["inputs"], seen["out"][2], seen["out"][1])
    reference = block.merge_proj(expert_out.reshape(2, 5, 32))
    assert (output - reference).abs().max().item() < 1e-6


def test_shared_experts_add_a_dense_mlp():
    config = tiny_config("hf_moe", num_shared_experts=2, moe_intermediate_size=16)
    config._experts_implementation = "eager"
    block = _random_block(MoeSparseBlock, config).eval()
    assert block.shared_experts.gate_proj.weight.shape == (32, 32)
    tokens = torch.randn(7, 32)
    _, weights, index = block.gate(tokens)
    expected = block.experts(tokens, index, weights) + block.shared_experts(tokens)
    assert (block(tokens[None])[0] - expected).abs().max().item() < 1e-6


def test_noisy_topk_adds_noise_only_while_training():
    config = tiny_config("hf_moe", router_type="noisy_topk")
    block = _random_block(MoeSparseBlock, config)
    tokens = torch.randn(64, 32)
    clean = tiny_config("hf_moe")
    clean_block = MoeSparseBlock(clean)
    clean_block.gate.weight.data.copy_(block.gate.weight.data)
    eval_out = block.eval().gate(tokens)
    assert torch.equal(eval_out[2], clean_block.eval().gate(tokens)[2])
    first, second = block.train().gate(tokens)[2], block.train().gate(tokens)[2]
    assert not torch.equal(first, second)
    assert torch.equal(eval_out[0], block.train().gate(tokens)[0])  # returned logits stay the clean ones


def test_jitter_changes_router_input_only_while_training():
    config = tiny_config("hf_switch", router_jitter_noise=0.5, capacity_factor=None, eval_capacity_factor=None)
    block = _random_block(MoeSparseBlock, config)
    tokens = torch.randn(16, 32)
    assert torch.equal(block.eval().gate(tokens)[0], block.eval().gate(tokens)[0])
    assert not torch.equal(block.train().gate(tokens)[0], block.train().gate(tokens)[0])


def test_expert_dropout_applies_only_while_training():
    config = tiny_config("hf_moe", expert_dropout=0.5)
    config._experts_implementation = "eager"
    block = _random_block(MoeSparseBlock, config)
    tokens = torch.randn(1, 16, 32)
    assert torch.equal(block.eval()(tokens), block.eval()(tokens))
    assert not torch.equal(block.train()(tokens), block.train()(tokens))


def test_load_balancing_loss_is_one_for_uniform_routing():
    # Each expert gets the same number of first choices and equal mean probability.
    logits = torch.eye(4).repeat(8, 1) * 3.0  # (32, 4): tokens cycle through the experts
    assert load_balancing_loss((logits,), top_k=1).item() == pytest.approx(1.0, abs=1e-6)


def test_load_balancing_loss_is_num_experts_when_all_tokens_pick_one_expert_with_certainty():
    logits = torch.tensor([[100.0, 0.0, 0.0, 0.0]]).repeat(10, 1)
    assert load_balancing_loss((logits,), top_k=1).item() == pytest.approx(4.0, abs=1e-4)


def test_load_balancing_loss_matches_the_formula_and_averages_layers():
    torch.manual_seed(1)
    layers = (torch.randn(12, 4), torch.randn(12, 4))
    expected = []
    for logits in layers:
        probs = logits.softmax(-1)
        chosen = torch.zeros(12, 4).scatter_(1, probs.topk(2, -1).indices, 1.0)
        expected.append(4 * ((chosen.mean(0) / 2) * probs.mean(0)).sum())
    assert load_balancing_loss(layers, top_k=2).item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)


def test_losses_ignore_padding_and_use_the_last_columns_of_a_cached_mask():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [50.0, 0.0]])  # third row belongs to a padding token
    # Batch 3, cached decode step: the mask covers 4 past + 1 current columns; only the last applies.
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    balanced = load_balancing_loss((logits[:2],), top_k=1)
    assert load_balancing_loss((logits,), top_k=1, attention_mask=mask).item() == pytest.approx(balanced.item())
    z_two_rows = router_z_loss((logits[:2],))
    assert router_z_loss((logits,), attention_mask=mask).item() == pytest.approx(z_two_rows.item())


def test_losses_repeat_the_padding_mask_per_mh_moe_head():
    logits = torch.randn(2 * 3 * 2, 4)  # batch 2, seq 3, h = 2 sub-tokens
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    keep = mask.reshape(-1).repeat_interleave(2).bool()
    expected = load_balancing_loss((logits[keep],), top_k=1)
    assert load_balancing_loss((logits,), 1, mask, num_subtokens=2).item() == pytest.approx(expected.item())


def _two_documents(model_type):
    """Two documents (7 and 4 tokens) packed padding-free into one row, and the same two as right-padded rows."""
    first, second = torch.randint(3, 97, (7,)), torch.randint(3, 97, (4,))
    packed = dict(input_ids=torch.cat([first, second])[None],
                  position_ids=torch.cat([torch.arange(7), torch.arange(4)])[None])  # as DataCollatorWithFlattening
    padded_ids = torch.zeros(2, 7, dtype=torch.long)
    padded_ids[0], padded_ids[1, :4] = first, second
    padded = dict(input_ids=padded_ids, attention_mask=(torch.arange(7) < torch.tensor([[7], [4]])).long())
    return packed, padded


@pytest.mark.parametrize("model_type", ["hf_moe", "hf_mh_moe"])
def test_sequence_balance_loss_counts_each_packed_document_as_a_sequence(model_type):
    """DeepSeek-V3 balances within each sequence: a padding-free row of two documents is two sequences."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, router_sequence_aux_loss_coef=0.1, router_jitter_noise=0.0,
                         initializer_range=0.2)  # peaked routing: per-document loads differ clearly
    model = AutoModelForCausalLM.from_config(config).train()
    packed, padded = _two_documents(model_type)
    # use_cache=False: the attention separates packed documents only without a cache (transformers' masking rule)
    in_one_row = model(**packed, labels=packed["input_ids"], use_cache=False)
    in_two_rows = model(**padded, labels=padded["input_ids"], use_cache=False)
    assert (in_one_row.logits[0, 7:] - in_two_rows.logits[1, :4]).abs().max().item() < 1e-5  # the same routing
    assert in_one_row.sequence_aux_loss.item() == pytest.approx(in_two_rows.sequence_aux_loss.item(), abs=1e-6)
    as_one_sequence = model(input_ids=packed["input_ids"], labels=packed["input_ids"], use_cache=False)
    assert abs(as_one_sequence.sequence_aux_loss.item() - in_two_rows.sequence_aux_loss.item()) > 1e-3


def test_sequence_balance_loss_splits_rows_where_the_position_ids_restart():
    """The loss function itself: documents start where `position_ids` do not continue by 1 (transformers' packed-
    sequence rule), within rows; padding rows count for no document."""
    from hf_moe import sequence_balance_loss

    logits = torch.randn(11, 4) * 2  # documents of 7 and 4 tokens
    position_ids = torch.cat([torch.arange(7), torch.arange(4)])[None]
    packed = sequence_balance_loss((logits,), 2, 1, position_ids=position_ids)
    padded_logits = torch.cat([logits[:7], logits[7:], torch.randn(3, 4) * 5])  # (2 * 7, 4), 3 padding rows
    mask = (torch.arange(7) < torch.tensor([[7], [4]])).long()
    padded = sequence_balance_loss((padded_logits,), 2, 2, mask)
    each = [sequence_balance_loss((logits[:7],), 2, 1), sequence_balance_loss((logits[7:],), 2, 1)]
    assert packed.item() == pytest.approx(padded.item(), abs=1e-6)
    assert packed.item() == pytest.approx((each[0] + each[1]).item() / 2, abs=1e-6)


def test_router_z_loss_value():
    logits = torch.zeros(5, 8)
    assert router_z_loss((logits,)).item() == pytest.approx(math.log(8) ** 2)
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert router_z_loss((logits,)).item() == pytest.approx(torch.logsumexp(logits, -1).item() ** 2)


@pytest.mark.parametrize("intermediate", [13, 24])
def test_experts_handle_sizes_the_grouped_kernel_cannot_align(intermediate):
    config = tiny_config("hf_moe", num_experts=4, moe_intermediate_size=intermediate)
    config._experts_implementation = "eager"
    block = _random_block(MoeSparseBlock, config)
    hidden = torch.randn(2, 9, 32, requires_grad=True)
    output = block(hidden)
    config._experts_implementation = "batched_mm"
    assert (output - block(hidden)).abs().max().item() < 1e-5
    output.sum().backward()
    assert block.experts.down_proj.grad.abs().sum().item() > 0


def test_straight_through_top1_has_weight_one_and_still_trains_the_router():
    config = tiny_config("hf_switch", norm_topk_prob=True, straight_through_topk=True, capacity_factor=None)
    block = _random_block(MoeSparseBlock, config)
    tokens = torch.randn(16, 32)
    _, weights, _ = block.gate(tokens)
    assert torch.equal(weights, torch.ones_like(weights))
    block(tokens[None]).sum().backward()
    straight_through = block.gate.weight.grad.abs().sum().item()
    assert straight_through > 0
    plain = tiny_config("hf_switch", norm_topk_prob=True, capacity_factor=None)
    plain_block = MoeSparseBlock(plain)
    plain_block.load_state_dict(block.state_dict())
    plain_block(tokens[None]).sum().backward()
    # p / p has no gradient (up to float rounding): why the option exists.
    assert plain_block.gate.weight.grad.abs().sum().item() < 1e-3 * straight_through


@pytest.mark.parametrize(("model_type", "overrides", "router_class", "kind"), [
    ("hf_moe", {}, MoeTopKRouter, TOP_K_ROUTING),
    ("hf_moe", dict(router_type="noisy_topk"), MoeTopKRouter, TOP_K_ROUTING),
    ("hf_switch", {}, MoeTopKRouter, TOP_K_ROUTING),
    ("hf_mh_moe", {}, MoeTopKRouter, TOP_K_ROUTING),
    ("hf_moe", dict(router_type="expert_choice"), MoeExpertChoiceRouter, EXPERT_CHOICE_ROUTING),
    ("hf_mh_moe", dict(router_type="expert_choice"), MoeExpertChoiceRouter, EXPERT_CHOICE_ROUTING),
])
def test_each_sparse_block_builds_the_router_of_its_config_routing_kind(model_type, overrides, router_class, kind):
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    routers = [layer.mlp.gate for layer in model.model.layers if layer.is_sparse]
    assert config.routing_kind == kind
    assert {type(router) for router in routers} == {router_class}
    assert {router.routing_kind for router in routers} == {kind}
    # Both kinds are declared as transformers' router-logits recorders: the logits of every sparse layer come out.
    recorded = [recorder.target_class for recorder in model._can_record_outputs["router_logits"]]
    assert recorded == [MoeTopKRouter, MoeExpertChoiceRouter]
    out = model(input_ids=torch.randint(3, 97, (2, 5)), output_router_logits=True)
    assert len(out.router_logits) == len(routers)
    assert all(logits.shape == (10 * config.num_subtokens, config.num_experts) for logits in out.router_logits)
