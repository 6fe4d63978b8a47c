"""Routing replay (`hf_moe.routing`) on hf_moe's decoders (top-k, Switch, MH-MoE) and transformers' MoE families
(Mixtral, Qwen2-MoE with its gated shared expert, Qwen3-MoE, OLMoE, gpt-oss, group-limited DeepSeek-V3 and
GLM-4-MoE), tiny random float32 models with fixed seeds. What this file proves:

1. Replaying the trace of a forward reproduces that forward: logits and the routers' weight gradients (<= 1e-6).
2. After the routers moved (new weights, and a new selection bias where the family has one), a replayed forward
   (a) sends every router row to exactly the traced experts, read from the routers' outputs by a hook of the test;
   (b) gives them the gate weights of the family's own formula on the live router's logits at the traced experts,
   written here from the modeling files (Switch: with its expert capacity applied to the traced assignment);
   (c) makes every sparse block output `experts(block input, traced experts, those weights)` plus the shared
   experts as the family adds them (Qwen2-MoE's sigmoid-gated one untouched);
   (d) gives the routers the gradient of an independent replay written in the test (<= 1e-6), non-zero on the
   router logits of rows whose traced experts the live router would not choose (no zero-gradient trap).
3. DeepSeek-V3 / GLM-4-MoE with n_group=2, topk_group=1 and a large selection bias: rows exist whose live choice lies
   outside the trace (in another expert group), and replay still routes them exactly, weighted by the unbiased
   sigmoid at the traced experts, renormalised, scaled.
4. `generate` (dynamic and static cache, left-padded prompts, greedy) records the routing a full forward of the final
   sequences takes at every real position; the trace covers the final sequences, the last token (which no forward
   reads) NOT_RECORDED; the replayed full forward gives the rollout's log-probs (<= 1e-5). Switch with a capacity
   is the exception, pinned: its drops depend on the tokens of each call, which a full forward does not repeat.
5. Traces survive save/load unchanged; `select` and `resized` slice the trace as the batch and the length.
6. Mismatches are refused with one line: another model type, layer count, k or E when entering `replay_routing`, a
   longer forward, another batch size or another number of rows per token during the forward, and expert-choice
   models in both `record_routing` and `replay_routing`.
"""

import dataclasses
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM

from hf_moe.moe_layers import find_moe_layers
from hf_moe.routing import (
    NOT_RECORDED,
    ExpertChoiceNotReplayable,
    RoutingTrace,
    RoutingTraceMismatch,
    record_routing,
    replay_routing,
    routing_mismatch,
)

from .conftest import tiny_config
from .test_builtin_moe import FAMILIES, SMALL

HF_MOE = ("hf_moe", "hf_switch", "hf_mh_moe")
SIGMOID = ("deepseek_v3", "glm4_moe")


def _grouped_deepseek_v3():
    config = FAMILIES["deepseek_v3"]()
    config.n_routed_experts, config.n_group, config.topk_group = 8, 2, 1
    return config


def _glm4_moe():
    return transformers.Glm4MoeConfig(**SMALL, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                                      first_k_dense_replace=0, moe_intermediate_size=24, n_shared_experts=1,
                                      routed_scaling_factor=1.5)


def _qwen3_moe_renormalised():
    config = FAMILIES["qwen3_moe"]()
    config.norm_topk_prob = True
    return config


CONFIGS = {
    "hf_moe": lambda: tiny_config("hf_moe", num_hidden_layers=2),
    # Tight capacity (ceil(tokens / E) per expert): replayed assignments get dropped.
    "hf_switch": lambda: tiny_config("hf_switch", num_hidden_layers=2, eval_capacity_factor=1.0),
    "hf_mh_moe": lambda: tiny_config("hf_mh_moe", num_hidden_layers=2),
    "mixtral": FAMILIES["mixtral"],
    "qwen2_moe": FAMILIES["qwen2_moe"],  # norm_topk_prob=False: the plain softmax
    "qwen3_moe": _qwen3_moe_renormalised,
    "olmoe": FAMILIES["olmoe"],
    "gpt_oss": FAMILIES["gpt_oss"],
    "deepseek_v3": _grouped_deepseek_v3,
    "glm4_moe": _glm4_moe,
}


# ------------------------------------------------------------------------------------------------ helpers
def _randomise_routers(model, seed: int, weight_std: float = 0.3, bias_std: float = 0.1, add: bool = False):
    """Random router weights (some families initialise them to zero) and selection biases / gpt-oss's logit bias;
    `add=True` perturbs the present ones instead. Logits of std ~1.7: distinct top-k without saturated sigmoids."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in find_moe_layers(model):
            for name in ("weight", "bias", "e_score_correction_bias"):
                tensor = getattr(layer.router, name, None)
                if isinstance(tensor, torch.Tensor):
                    noise = torch.randn(tensor.shape, generator=generator) * (weight_std if name == "weight"
                                                                              else bias_std)
                    tensor.copy_(tensor + noise if add else noise)


def _model(family: str, **config_fields):
    torch.manual_seed(0)
    config = CONFIGS[family]()
    for name, value in config_fields.items():
        setattr(config, name, value)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    _randomise_routers(model, seed=1)
    return model


def _ids(batch: int = 2, length: int = 8, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 60, (batch, length), generator=torch.Generator().manual_seed(seed))


def _max_diff(first: torch.Tensor, second: torch.Tensor) -> float:
    return (first.detach().float() - second.detach().float()).abs().max().item()


def _assert_close(got: torch.Tensor, want: torch.Tensor, atol: float):
    """max |got - want| <= atol, and <= 1e-5 of max |want| (some gradients are ~1e-5 themselves)."""
    difference = _max_diff(got, want)
    assert difference <= atol and difference <= 1e-5 * want.abs().max().item(), (difference, want.abs().max())


def _router_grads(model) -> list[torch.Tensor]:
    return [layer.router.weight.grad.clone() for layer in find_moe_layers(model)]


def _same_sets(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(rows,) bool: the rows of two (rows, k) expert indices hold the same experts (order-free)."""
    return (first.sort(-1).values == second.sort(-1).values).all(-1)


def _capacity_keep(index: torch.Tensor, num_experts: int, factor: float) -> torch.Tensor:
    """(rows, k) bool: the assignments within their expert's capacity ceil(factor * rows * k / E), queues filled
    choice slot by slot and in row order (Switch / GShard), by a plain loop."""
    rows, k = index.shape
    capacity = max(1, math.ceil(factor * rows * k / num_experts))
    used = [0] * num_experts
    keep = torch.zeros(rows, k, dtype=torch.bool)
    for slot in range(k):
        for row in range(rows):
            expert = int(index[row, slot])
            keep[row, slot] = used[expert] < capacity
            used[expert] += 1
    return keep


def _reference_gates(model, router, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(rows, k) the combine weights of the experts `index` by the family's formula (transformers 5.x modeling
    files; hf_moe's MoeTopKRouter), from the router's own weights on its input `rows`."""
    config, family = model.config, model.config.model_type
    rows = rows.reshape(-1, router.weight.shape[1]).float()
    if family == "gpt_oss":  # top-k of the logits (with the router bias), softmax over those k
        return F.linear(rows, router.weight.float(), router.bias.float()).gather(-1, index).softmax(-1)
    logits = F.linear(rows, router.weight.float())
    if family in SIGMOID:  # unbiased sigmoid at the chosen, renormalised iff norm_topk_prob, scaled
        chosen = logits.sigmoid().gather(-1, index)
        if config.norm_topk_prob:
            chosen = chosen / (chosen.sum(-1, keepdim=True) + 1e-20)
        return chosen * config.routed_scaling_factor
    chosen = logits.softmax(-1).gather(-1, index)
    if family == "mixtral" or config.norm_topk_prob:
        norm = chosen.sum(-1, keepdim=True)
        chosen = chosen / (norm.detach() if getattr(config, "straight_through_topk", False) else norm)
    if family in HF_MOE:
        factor = config.capacity_factor if model.training else config.eval_capacity_factor
        if factor is not None:
            chosen = chosen * _capacity_keep(index, config.num_experts, factor)
    return chosen


def _compose(model, block, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The sparse block's output from its input, the given experts and weights, and the shared experts as the
    family adds them (from the modeling files)."""
    family, flat = model.config.model_type, hidden.reshape(-1, hidden.shape[-1])
    if family == "hf_mh_moe":
        sub_tokens = block.head_proj(hidden).reshape(-1, block.sub_token_size)
        output = block.merge_proj(block.experts(sub_tokens, index, weights).reshape(hidden.shape))
    else:
        output = block.experts(flat, index, weights).reshape(hidden.shape)
    if family == "qwen2_moe":
        output = output + (torch.sigmoid(block.shared_expert_gate(flat)) * block.shared_expert(flat)).reshape(
            hidden.shape)
    elif getattr(block, "shared_experts", None) is not None:
        output = output + block.shared_experts(hidden)
    return output


class _Capture:
    """Forward hooks of the test on every router (input rows and output; the logits keep their gradient) and sparse
    block (input and output), for the last call; registered after whatever hooks are already there."""

    def __init__(self, model):
        self.layers = find_moe_layers(model)
        self.blocks = [model.get_submodule(layer.block_name) for layer in self.layers]
        self.router_input, self.router_output, self.block_input, self.block_output = {}, {}, {}, {}

    def __enter__(self):
        self._handles = []
        for position, (layer, block) in enumerate(zip(self.layers, self.blocks, strict=True)):
            self._handles.append(layer.router.register_forward_hook(self._router_hook(position)))
            self._handles.append(block.register_forward_hook(self._block_hook(position)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()

    def _router_hook(self, position):
        def hook(router, args, output):
            if output[0].requires_grad:
                output[0].retain_grad()
            self.router_input[position], self.router_output[position] = args[0].detach(), output
        return hook

    def _block_hook(self, position):
        def hook(block, args, output):
            self.block_input[position] = args[0].detach()
            self.block_output[position] = output[0] if isinstance(output, tuple) else output
        return hook


@contextmanager
def _independent_replay(model, trace: RoutingTrace):
    """The test's own replay, no hf_moe.routing code: every router returns the trace's experts weighted by
    `_reference_gates` on its input."""
    def hook_for(position):
        def hook(router, args, output):
            index = trace.experts[:, position].reshape(-1, trace.top_k)
            weights = _reference_gates(model, router, args[0], index).to(output[1].dtype)
            return (output[0], weights, index, *output[3:])
        return hook

    handles = [layer.router.register_forward_hook(hook_for(position))
               for position, layer in enumerate(find_moe_layers(model))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _live_choice(router, rows: torch.Tensor) -> torch.Tensor:
    """(rows, k) the experts the router chooses itself (call it with no replay hook attached)."""
    with torch.no_grad():
        return router(rows.reshape(-1, router.weight.shape[1]))[2]


# ------------------------------------------------------------------------------------------------ 1. same forward
@pytest.mark.parametrize("family", list(CONFIGS))
def test_replaying_the_recorded_forward_reproduces_its_logits_and_router_gradients(family):
    model, ids = _model(family), _ids()
    with record_routing(model) as recorder:
        recorded = model(input_ids=ids, labels=ids)
        recorded.loss.backward()
    expected = _router_grads(model)
    model.zero_grad()
    with replay_routing(model, recorder.trace) as replay:
        replayed = model(input_ids=ids, labels=ids)
        replayed.loss.backward()
    assert replay.replayed_share == 1.0
    _assert_close(replayed.logits, recorded.logits, atol=1e-6)
    for got, want in zip(_router_grads(model), expected, strict=True):
        _assert_close(got, want, atol=1e-6)


# ------------------------------------------------------------------------------------------------ 2. moved routers
@pytest.mark.parametrize("family", list(CONFIGS))
def test_replay_routes_to_the_trace_with_the_family_gates_of_the_live_router(family):
    model, ids = _model(family), _ids(length=12)
    with record_routing(model) as recorder:
        model(input_ids=ids)
    trace = recorder.trace
    _randomise_routers(model, seed=2, weight_std=0.9, bias_std=0.5, add=True)
    projection = torch.randn(*ids.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(4))

    with replay_routing(model, trace), _Capture(model) as seen:  # the test's hooks run after replay's
        (model(input_ids=ids).logits * projection).sum().backward()
    replayed_grads = _router_grads(model)
    model.zero_grad()
    with _independent_replay(model, trace):
        (model(input_ids=ids).logits * projection).sum().backward()
    independent_grads = _router_grads(model)

    moved_rows = disjoint_rows = 0
    for position, (layer, block) in enumerate(zip(seen.layers, seen.blocks, strict=True)):
        logits, weights, index = seen.router_output[position][:3]
        rows = seen.router_input[position]
        traced = trace.experts[:, position].reshape(-1, trace.top_k)
        # (a) every row to exactly its traced experts
        assert _same_sets(index, traced).all()
        # (b) the family's gate weights on the live logits at those experts
        reference = _reference_gates(model, layer.router, rows, index)
        assert _max_diff(weights, reference) <= 1e-6
        if family == "hf_switch":  # the capacity dropped some traced assignments (weight 0)
            assert (reference == 0).any() and (reference != 0).any()
        # (c) the block output is the composition of its experts with those weights
        composed = _compose(model, block, seen.block_input[position], index, reference)
        _assert_close(seen.block_output[position], composed, atol=1e-6)
        # (d) the router gradient of an independent replay; rows whose traced experts the live router would not
        # choose at all still pass the gradient to their logits (gathering from live top-k gates would give 0)
        _assert_close(replayed_grads[position], independent_grads[position], atol=1e-6)
        assert (replayed_grads[position][traced.unique()] != 0).any(-1).all()  # every traced expert's row
        live = _live_choice(layer.router, rows)
        moved_rows += int((~_same_sets(live, traced)).sum())
        disjoint = ~(traced[:, :, None] == live[:, None, :]).any(-1).any(-1) & (weights != 0).all(-1)
        disjoint_rows += int(disjoint.sum())
        assert (logits.grad[disjoint].gather(-1, traced[disjoint]) != 0).all()
    assert moved_rows > 0 and disjoint_rows > 0  # the perturbation changed the live choice: (a)-(d) are not vacuous
    if family == "qwen2_moe":  # the shared expert's gate is no router: replay leaves it alone
        assert all(layer.router_name.endswith(".gate") for layer in seen.layers)


def test_switch_capacity_applies_to_the_replayed_assignment():
    """All tokens traced to expert 0: the first ceil(capacity_factor * tokens / E) tokens keep their weight, the
    rest are dropped (weight 0), whatever the live router would choose."""
    model, ids = _model("hf_switch"), _ids()
    with record_routing(model) as recorder:
        model(input_ids=ids)
    trace = dataclasses.replace(recorder.trace, experts=torch.zeros_like(recorder.trace.experts))
    with replay_routing(model, trace), _Capture(model) as seen:
        model(input_ids=ids)
    _, weights, index = seen.router_output[0][:3]
    capacity = math.ceil(1.0 * ids.numel() / 4)
    assert (index == 0).all() and (weights[:capacity] > 0).all() and (weights[capacity:] == 0).all()


# ------------------------------------------------------------------------------------------------ 3. group limit
@pytest.mark.parametrize("family", SIGMOID)
def test_group_limited_routers_replay_experts_their_live_choice_excludes(family):
    model, ids = _model(family), _ids()
    config = model.config
    assert (config.n_routed_experts, config.num_experts_per_tok, config.n_group, config.topk_group) == (8, 2, 2, 1)
    with record_routing(model) as recorder:
        model(input_ids=ids)
    trace = recorder.trace
    _randomise_routers(model, seed=5, bias_std=1.0, add=True)  # biases of the order of the sigmoid scores

    with replay_routing(model, trace), _Capture(model) as seen:
        model(input_ids=ids)
    group_size = config.n_routed_experts // config.n_group
    outside_rows = other_group_rows = 0
    for position, layer in enumerate(seen.layers):
        _, weights, index = seen.router_output[position][:3]
        rows = seen.router_input[position].reshape(-1, config.hidden_size)
        traced = trace.experts[:, position].reshape(-1, 2)
        assert (traced // group_size == traced[:, :1] // group_size).all()  # recorded under the group limit
        live = _live_choice(layer.router, rows)
        outside = ~_same_sets(live, traced)
        other_group = live[:, 0] // group_size != traced[:, 0] // group_size
        outside_rows, other_group_rows = outside_rows + int(outside.sum()), other_group_rows + int(other_group.sum())
        assert _same_sets(index, traced).all()
        scores = F.linear(rows, layer.router.weight).sigmoid().gather(-1, index)
        expected = scores / scores.sum(-1, keepdim=True) * config.routed_scaling_factor
        assert _max_diff(weights, expected) <= 1e-6  # on every row, those outside the live choice included
    assert outside_rows > 0 and other_group_rows > 0


# ------------------------------------------------------------------------------------------------ 4. generate
def _left_padded_prompts():
    lengths = (7, 4, 5)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)  # pad_token_id 0
    mask = torch.zeros_like(ids)
    generator = torch.Generator().manual_seed(6)
    for row, length in enumerate(lengths):
        ids[row, -length:] = torch.randint(3, 60, (length,), generator=generator)
        mask[row, -length:] = 1
    return ids, mask


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_generate_trace_matches_the_full_forward_and_replays_the_rollout_log_probs(family, cache):
    # Switch's capacity counts the tokens of each call: a decoding step (one token per sequence) and a full forward
    # drop different assignments, which replay cannot undo (it replays experts, and applies the capacity of the
    # forward it is in). Dropless Switch here; capacity under replay is the test above.
    model = _model(family, eval_capacity_factor=None) if family == "hf_switch" else _model(family)
    prompts, prompt_mask = _left_padded_prompts()
    new_tokens = 6
    with record_routing(model) as recorder:
        rollout = model.generate(input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, cache_implementation=cache,
                                 output_logits=True, return_dict_in_generate=True)
    sequences = rollout.sequences
    length, batch = sequences.shape[1], sequences.shape[0]
    mask = torch.cat([prompt_mask, torch.ones(batch, new_tokens, dtype=torch.long)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)

    trace = recorder.trace
    assert trace.length == length and torch.equal(trace.attention_mask, mask.bool())  # left padding 0, static too
    assert (trace.experts[:, :, -1] == NOT_RECORDED).all() and (trace.experts[:, :, :-1] >= 0).all()

    with torch.no_grad(), record_routing(model) as recorder:
        model(input_ids=sequences, attention_mask=mask, position_ids=position_ids)
    mismatch = routing_mismatch(trace, recorder.trace)
    assert mismatch.token_share == 0 and mismatch.tokens == int(mask[:, :-1].sum())

    with torch.no_grad(), replay_routing(model, trace) as replay:
        logits = model(input_ids=sequences, attention_mask=mask, position_ids=position_ids).logits
    assert replay.replayed_rows == int(mask[:, :-1].sum()) and replay.routed_rows == int(mask.sum())
    completion = sequences[:, prompts.shape[1]:, None]
    replayed = logits[:, prompts.shape[1] - 1:-1].log_softmax(-1).gather(-1, completion)
    rolled_out = torch.stack(rollout.logits, dim=1).float().log_softmax(-1).gather(-1, completion)
    assert _max_diff(replayed, rolled_out) <= 1e-5


def test_switch_capacity_counts_the_tokens_of_each_call_so_replay_does_not_reproduce_its_rollout():
    """The limit of replaying experts only: with a capacity (Switch's default eval_capacity_factor=2.0) a decoding
    step drops among the batch's current tokens, the full forward among all of them, so the replayed log-probs
    differ from the rollout's although every token goes to its traced expert."""
    model = _model("hf_switch", eval_capacity_factor=2.0)
    prompts, prompt_mask = _left_padded_prompts()
    with record_routing(model) as recorder:
        rollout = model.generate(input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=6, min_new_tokens=6,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
    sequences = rollout.sequences
    mask = torch.cat([prompt_mask, torch.ones(3, 6, dtype=torch.long)], dim=1)
    with torch.no_grad(), replay_routing(model, recorder.trace) as replay:
        logits = model(input_ids=sequences, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    completion = sequences[:, prompts.shape[1]:, None]
    replayed = logits[:, prompts.shape[1] - 1:-1].log_softmax(-1).gather(-1, completion)
    rolled_out = torch.stack(rollout.logits, dim=1).log_softmax(-1).gather(-1, completion)
    assert replay.replayed_rows == int(mask[:, :-1].sum()) and _max_diff(replayed, rolled_out) > 1e-3


# ------------------------------------------------------------------------------------------------ 5. files, slices
def test_trace_save_load_round_trip_and_batch_and_length_slices(tmp_path):
    model = _model("hf_mh_moe")  # 2 router rows per token
    prompts, prompt_mask = _left_padded_prompts()
    with record_routing(model) as recorder:
        sequences = model.generate(input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=3,
                                   min_new_tokens=3, do_sample=False)
    trace = recorder.trace
    assert trace.length == sequences.shape[1] and (trace.experts[:, :, -1] == NOT_RECORDED).all()  # survives the file
    loaded = RoutingTrace.load(trace.save(tmp_path / "trace.safetensors"))
    assert torch.equal(loaded.experts, trace.experts) and loaded.experts.dtype == torch.long
    assert torch.equal(loaded.attention_mask, trace.attention_mask) and loaded.attention_mask.dtype == torch.bool
    assert (loaded.layers, loaded.num_experts, loaded.model_type, loaded.rows_per_token) == (
        (0, 1), 4, "hf_mh_moe", 2)

    for rows in ([1], 1):
        selected = trace.select(rows)
        assert torch.equal(selected.experts, trace.experts[1:2])
        assert torch.equal(selected.attention_mask, trace.attention_mask[1:2])
    shorter, longer = trace.resized(5), trace.resized(trace.length + 2)
    assert torch.equal(shorter.experts, trace.experts[:, :, :5]) and shorter.attention_mask.shape == (3, 5)
    assert torch.equal(longer.experts[:, :, :trace.length], trace.experts)
    assert (longer.experts[:, :, trace.length:] == NOT_RECORDED).all()
    assert not longer.attention_mask[:, trace.length:].any()

    # Replaying a slice routes the sliced forward as the whole one.
    ids = _ids(length=8)
    with record_routing(model) as recorder:
        whole = model(input_ids=ids).logits
    with replay_routing(model, recorder.trace.select([1])):
        one_row = model(input_ids=ids[1:2]).logits
    with replay_routing(model, recorder.trace.resized(5)):
        prefix = model(input_ids=ids[:, :5]).logits
    assert _max_diff(one_row, whole[1:2]) <= 1e-5 and _max_diff(prefix, whole[:, :5]) <= 1e-5


# ------------------------------------------------------------------------------------------------ 6. refusals
def _qwen3_trace():
    model, ids = _model("qwen3_moe"), _ids()
    with record_routing(model) as recorder:
        model(input_ids=ids)
    return model, recorder.trace


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("kind, altered, message", [
    ("layer count", lambda t: dataclasses.replace(t, experts=t.experts[:, :1], layers=t.layers[:1]),
     r"sparse layers \[0\] vs \[0, 1\]"),
    ("k", lambda t: dataclasses.replace(t, experts=t.experts[..., :1]), "k=1 vs k=2"),
    ("E", lambda t: dataclasses.replace(t, num_experts=8), "8 experts vs 4"),
])
def test_replay_refuses_a_trace_of_another_model_shape(kind, altered, message):
    model, trace = _qwen3_trace()
    with pytest.raises(RoutingTraceMismatch, match=message) as error:
        with replay_routing(model, altered(trace)):
            pass
    _one_line(error)


def test_replay_refuses_a_trace_of_another_model_type():
    mixtral, ids = _model("mixtral"), _ids()  # same layers, E and k as the Qwen3-MoE model
    with record_routing(mixtral) as recorder:
        mixtral(input_ids=ids)
    model, _ = _qwen3_trace()
    with pytest.raises(RoutingTraceMismatch, match="model_type 'mixtral' vs 'qwen3_moe'") as error:
        with replay_routing(model, recorder.trace):
            pass
    _one_line(error)


def test_replay_refuses_a_forward_the_trace_does_not_cover():
    model, trace = _qwen3_trace()  # 2 sequences of 8 tokens
    with replay_routing(model, trace):
        with pytest.raises(RoutingTraceMismatch, match="covers 8 positions, the forward reaches position 9") as error:
            model(input_ids=_ids(length=9))
        _one_line(error)
        with pytest.raises(RoutingTraceMismatch, match="holds 2 sequences, the forward 1") as error:
            model(input_ids=_ids(batch=1))
        _one_line(error)
    mh_moe = _model("hf_mh_moe")
    with record_routing(mh_moe) as recorder:
        mh_moe(input_ids=_ids())
    one_row_per_token = recorder.trace
    one_row_per_token = dataclasses.replace(one_row_per_token, experts=one_row_per_token.experts[:, :, :, :1])
    with replay_routing(mh_moe, one_row_per_token):
        with pytest.raises(RoutingTraceMismatch, match="1 router rows per token, the model 2") as error:
            mh_moe(input_ids=_ids())
    _one_line(error)


def test_expert_choice_models_are_refused_by_record_and_replay():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("hf_moe", router_type="expert_choice", num_hidden_layers=2))
    _, trace = _qwen3_trace()
    for context in (lambda: record_routing(model), lambda: replay_routing(model, trace)):
        with pytest.raises(ExpertChoiceNotReplayable, match="token-choice .* expert choice") as error:
            with context():
                pass
        _one_line(error)
