"""vLLM's routed-experts payloads <-> RoutingTrace (hf_moe.routing.vllm): the documented layouts and dtypes, TRL's
left-padded alignment position by position, exact round trips, one-line refusals, and a replay of a real generate
through the vLLM form."""

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_moe.routing import (
    NOT_RECORDED,
    RoutingTrace,
    RoutingTraceMismatch,
    record_routing,
    replay_routing,
    trace_from_vllm,
    trace_to_vllm,
)

from .conftest import tiny_config

LAYERS = (0, 2)  # decoder layers 0 and 2 are sparse, layer 1 dense
NUM_HIDDEN_LAYERS = 3
NUM_EXPERTS = 8
TOP_K = 2
PROMPTS = [3, 5]
COMPLETIONS = [4, 2]


def _rows(rng, tokens, layers=None, k=TOP_K, dtype=np.int16):
    layers = len(LAYERS) if layers is None else layers
    return rng.integers(0, NUM_EXPERTS, size=(tokens, layers, k)).astype(dtype)


def _split_payloads(seed=0):
    """Two requests in vLLM 0.21's split layout: int16 prompt rows (the first prompt's first token a prefix-cache hit,
    -1) and int16 rows for all generated tokens but the last."""
    rng = np.random.default_rng(seed)
    prompts = [_rows(rng, count) for count in PROMPTS]
    prompts[0][0] = -1
    generated = [_rows(rng, count - 1) for count in COMPLETIONS]
    return prompts, generated


def _request_output(prompt_rows, generated_rows, prompt_count, completion_count):
    completion = SimpleNamespace(index=0, token_ids=list(range(50, 50 + completion_count)),
                                 routed_experts=generated_rows)
    return SimpleNamespace(prompt_token_ids=list(range(10, 10 + prompt_count)), prompt_routed_experts=prompt_rows,
                           outputs=[completion])


def _request_outputs(seed=0):
    prompts, generated = _split_payloads(seed)
    counts = zip(prompts, generated, PROMPTS, COMPLETIONS, strict=True)
    return [_request_output(prompt, gen, prompt_count, completion_count)
            for prompt, gen, prompt_count, completion_count in counts]


def _read(requests, **kwargs):
    return trace_from_vllm(requests, layers=LAYERS, num_experts=NUM_EXPERTS, model_type="qwen3_moe", **kwargs)


def _npy_base64(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _one_line(error):
    return "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------ alignment
def test_split_layout_lands_on_left_padded_prompts_and_right_padded_completions_position_by_position():
    prompts, generated = _split_payloads()
    trace = _read(_request_outputs())
    # width 5 prompts + 4 completion positions; sequence 0: 2 pads, prompt 2..4, completion 5..8; sequence 1: prompt
    # 0..4, completion 5..6, padding 7..8. vLLM routes all generated tokens but the last (8 and 6 stay unrouted).
    expected_sources = {
        (0, 2): prompts[0][0], (0, 3): prompts[0][1], (0, 4): prompts[0][2],
        (0, 5): generated[0][0], (0, 6): generated[0][1], (0, 7): generated[0][2],
        (1, 0): prompts[1][0], (1, 1): prompts[1][1], (1, 2): prompts[1][2], (1, 3): prompts[1][3],
        (1, 4): prompts[1][4], (1, 5): generated[1][0],
    }
    expected_real = {0: [2, 3, 4, 5, 6, 7, 8], 1: [0, 1, 2, 3, 4, 5, 6]}
    assert trace.experts.shape == (2, 2, 9, 1, TOP_K) and trace.experts.dtype == torch.long
    assert trace.layers == LAYERS and trace.num_experts == NUM_EXPERTS and trace.model_type == "qwen3_moe"
    for row in range(2):
        assert trace.attention_mask[row].nonzero().flatten().tolist() == expected_real[row]
        for position in range(9):
            source = expected_sources.get((row, position))
            got = trace.experts[row, :, position, 0].numpy()  # (layers, k)
            if source is None:  # padding, the last generated token, beyond a completion
                assert (got == NOT_RECORDED).all(), (row, position)
            else:
                assert (got == source.astype(np.int64)).all(), (row, position)
    assert (trace.experts[0, :, 2] == NOT_RECORDED).all()  # vLLM's -1 (a prefix-cache hit) is NOT_RECORDED
    assert trace.recorded.tolist() == [[False, False, False, True, True, True, True, True, False],
                                       [True, True, True, True, True, True, False, False, False]]


def test_right_padding_and_pad_to():
    prompts, generated = _split_payloads()
    trace = _read(_request_outputs(), padding_side="right", pad_to=12)
    assert trace.length == 12
    assert trace.attention_mask.sum(1).tolist() == [7, 7]
    assert (trace.experts[0, :, 3:6, 0].permute(1, 0, 2).numpy() == generated[0]).all()  # right after the prompt
    assert (trace.experts[1, :, :5, 0].permute(1, 0, 2).numpy() == prompts[1]).all()
    assert (trace.experts[:, :, 7:] == NOT_RECORDED).all()


def test_openai_json_split_layout_reads_like_the_request_outputs():
    prompts, generated = _split_payloads()
    responses = []
    for prompt, gen, prompt_count, completion_count in zip(prompts, generated, PROMPTS, COMPLETIONS, strict=True):
        responses.append({  # /v1/completions with return_token_ids: prompt_routed_experts on the response
            "object": "text_completion",
            "prompt_routed_experts": prompt.tolist(),
            "choices": [{"index": 0, "text": "...", "prompt_token_ids": list(range(prompt_count)),
                         "token_ids": list(range(completion_count)), "routed_experts": gen.tolist()}],
            "usage": {"prompt_tokens": prompt_count, "completion_tokens": completion_count},
        })
    expected = _read(_request_outputs())
    for payloads in (responses, [{**response, "choices": [{key: value for key, value in choice.items()
                                                           if not key.endswith("token_ids")}
                                                          for choice in response["choices"]]}
                                 for response in responses]):  # counts from usage alone
        trace = _read(payloads)
        assert torch.equal(trace.experts, expected.experts)
        assert torch.equal(trace.attention_mask, expected.attention_mask)


def test_full_layout_base64_npy_with_sparse_or_all_decoder_layers():
    """The newer layout: one base64 `.npy` array per choice over prompt + completion minus the last token, uint8, no
    prompt array; its layer axis is the sparse layers or every decoder layer."""
    prompts, generated = _split_payloads()
    prompts[0][0] = [[1, 2], [3, 4]]  # the unsigned layout has no sentinel
    expected = _read([_request_output(p, g, pc, cc) for p, g, pc, cc in zip(prompts, generated, PROMPTS,
                                                                            COMPLETIONS, strict=True)])
    sparse_only, every_layer = [], []
    for prompt, gen, prompt_count, completion_count in zip(prompts, generated, PROMPTS, COMPLETIONS, strict=True):
        rows = np.concatenate([prompt, gen]).astype(np.uint8)
        all_layers = np.zeros((len(rows), NUM_HIDDEN_LAYERS, TOP_K), np.uint8)
        all_layers[:, list(LAYERS)] = rows
        for out, array in ((sparse_only, rows), (every_layer, all_layers)):
            out.append({"choices": [{"index": 0, "prompt_token_ids": list(range(prompt_count)),
                                     "token_ids": list(range(completion_count)),
                                     "routed_experts": _npy_base64(array)}]})
    assert torch.equal(_read(sparse_only).experts, expected.experts)
    assert torch.equal(_read(every_layer, num_hidden_layers=NUM_HIDDEN_LAYERS).experts, expected.experts)
    offline = SimpleNamespace(prompt_token_ids=[1, 2, 3], outputs=[SimpleNamespace(  # a RequestOutput of that layout
        token_ids=[4, 5, 6, 7], routed_experts=np.concatenate([prompts[0], generated[0]]).astype(np.int32))])
    alone = _read([_request_output(prompts[0], generated[0], PROMPTS[0], COMPLETIONS[0])])
    assert torch.equal(_read([offline]).experts, alone.experts)


def test_every_completion_of_a_request_is_one_sequence_sharing_the_prompt_routing():
    rng = np.random.default_rng(1)
    prompt = _rows(rng, 3)
    completions = [SimpleNamespace(token_ids=[7, 8, 9], routed_experts=_rows(rng, 2)),
                   SimpleNamespace(token_ids=[5], routed_experts=None)]  # one token: vLLM's empty part is None
    trace = _read([SimpleNamespace(prompt_token_ids=[1, 2, 3], prompt_routed_experts=prompt, outputs=completions)])
    assert trace.batch_size == 2 and trace.length == 6
    for row in range(2):
        assert (trace.experts[row, :, :3, 0].permute(1, 0, 2).numpy() == prompt).all()
    assert trace.attention_mask.tolist() == [[True] * 6, [True] * 4 + [False] * 2]
    assert (trace.experts[1, :, 3:] == NOT_RECORDED).all()


# ------------------------------------------------------------------------------------------------ round trips
def _hand_built_trace(seed=0):
    generator = torch.Generator().manual_seed(seed)
    experts = torch.randint(0, NUM_EXPERTS, (2, len(LAYERS), 9, 1, TOP_K), generator=generator)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 2:9] = True
    mask[1, 0:7] = True
    experts[0, :, :2] = NOT_RECORDED  # left padding
    experts[0, :, 8] = NOT_RECORDED  # the last generated token
    experts[0, :, 3] = NOT_RECORDED  # a prompt token no forward routed (a prefix-cache hit in vLLM)
    experts[1, :, 6:] = NOT_RECORDED  # the last generated token, then right padding
    return RoutingTrace(experts, mask, LAYERS, NUM_EXPERTS, "qwen3_moe")


def test_trace_to_vllm_to_trace_is_exact():
    trace = _hand_built_trace()
    payloads = trace_to_vllm(trace, PROMPTS, COMPLETIONS)
    for payload, prompt_count, completion_count in zip(payloads, PROMPTS, COMPLETIONS, strict=True):
        assert payload["prompt_routed_experts"].dtype == np.int16
        assert payload["prompt_routed_experts"].shape == (prompt_count, len(LAYERS), TOP_K)
        assert payload["routed_experts"].dtype == np.int16
        assert payload["routed_experts"].shape == (completion_count - 1, len(LAYERS), TOP_K)
    assert (payloads[0]["prompt_routed_experts"][1] == -1).all()
    back = _read(payloads, prompt_lengths=PROMPTS, completion_lengths=COMPLETIONS)
    assert torch.equal(back.experts, trace.experts)
    assert torch.equal(back.attention_mask, trace.attention_mask)


def test_vllm_to_trace_to_vllm_is_exact():
    prompts, generated = _split_payloads()
    requests = _request_outputs()
    requests.append(_request_output(_rows(np.random.default_rng(2), 2), None, 2, 1))  # one generated token
    payloads = trace_to_vllm(_read(requests), PROMPTS + [2], COMPLETIONS + [1])
    for payload, request in zip(payloads, requests, strict=True):
        assert payload["prompt_routed_experts"].dtype == np.int16
        assert np.array_equal(payload["prompt_routed_experts"], request.prompt_routed_experts)
        if request.outputs[0].routed_experts is None:
            assert payload["routed_experts"] is None
        else:
            assert payload["routed_experts"].dtype == np.int16
            assert np.array_equal(payload["routed_experts"], request.outputs[0].routed_experts)


# ------------------------------------------------------------------------------------------------ refusals
def _split_with(prompt=None, generated=None, prompt_count=3, completion_count=4):
    rng = np.random.default_rng(3)
    prompt = _rows(rng, prompt_count) if prompt is None else prompt
    generated = _rows(rng, completion_count - 1) if generated is None else generated
    return [_request_output(prompt, generated, prompt_count, completion_count)]


@pytest.mark.parametrize("requests, message", [
    (_split_with(prompt=_rows(np.random.default_rng(0), 3, layers=3),
                 generated=_rows(np.random.default_rng(0), 3, layers=3)),
     "the payload has 3 layers, the model 2 sparse layers (decoder layers [0, 2])"),
    (_split_with(prompt=_rows(np.random.default_rng(0), 3, k=3), generated=_rows(np.random.default_rng(0), 3, k=3)),
     "k=3 experts, the model to k=2"),
    (_split_with(prompt=_rows(np.random.default_rng(0), 4)), "prompt_routed_experts covers 4 tokens, the prompt has 3"),
    (_split_with(generated=_rows(np.random.default_rng(0), 5)),
     "routed_experts covers 5 generated tokens, the completion has 4 (vLLM routes all but the last: 3)"),
    ([SimpleNamespace(prompt_token_ids=[1, 2], outputs=[SimpleNamespace(
        token_ids=[3, 4], routed_experts=_rows(np.random.default_rng(0), 5))])],
     "routed_experts covers 5 tokens, prompt + completion have 4 (vLLM routes all but the last: 3)"),
    ([SimpleNamespace(prompt_token_ids=[1, 2], outputs=[SimpleNamespace(token_ids=[3, 4], routed_experts=None)])],
     "no routed_experts"),
    (_split_with(prompt=np.full((3, 2, 2), NUM_EXPERTS, np.int16)), "expert id 8 is out of range for 8 experts"),
    ([{"choices": [{"index": 0, "routed_experts": "not base64 .npy"}], "usage": {}}], "not base64 of .npy bytes"),
])
def test_payloads_that_do_not_fit_are_refused_in_one_line(requests, message):
    with pytest.raises(RoutingTraceMismatch) as error:
        trace_from_vllm(requests, layers=LAYERS, num_experts=NUM_EXPERTS, top_k=TOP_K)
    assert message in str(error.value) and _one_line(error)


def test_unknown_token_counts_and_mismatched_lengths_are_refused_in_one_line():
    prompts, generated = _split_payloads()
    flat = [{"prompt_routed_experts": p, "routed_experts": g} for p, g in zip(prompts, generated, strict=True)]
    with pytest.raises(RoutingTraceMismatch) as error:
        _read(flat)
    assert "completion token count is unknown" in str(error.value) and _one_line(error)
    with pytest.raises(RoutingTraceMismatch) as error:
        _read(flat, prompt_lengths=PROMPTS, completion_lengths=[4])
    assert "completion_lengths has 1 entries, the payloads hold 2 sequences" in str(error.value) and _one_line(error)
    trace = _hand_built_trace()
    with pytest.raises(RoutingTraceMismatch) as error:
        trace_to_vllm(trace, [4, 5], COMPLETIONS)  # sequence 0's prompt starts at 2, not 1
    assert "sequence 0: the trace marks position 1 as padding" in str(error.value) and _one_line(error)
    with pytest.raises(RoutingTraceMismatch) as error:
        trace_to_vllm(trace, PROMPTS, [4, 6])
    assert "sequence 1: prompt + completion reach position 11, the trace covers 9" in str(error.value)
    assert _one_line(error)
    with pytest.raises(RoutingTraceMismatch) as error:
        trace_to_vllm(trace, PROMPTS, COMPLETIONS[:1])
    assert "the trace holds 2 sequences" in str(error.value) and _one_line(error)


# ------------------------------------------------------------------------------------------------ a real replay
def test_the_vllm_form_of_a_recorded_generate_replays_its_log_probs():
    model = AutoModelForCausalLM.from_config(tiny_config("hf_moe")).eval()
    input_ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])  # left-padded to the longest prompt
    attention_mask = (torch.arange(5) >= torch.tensor([[2], [0]])).long()
    prompt_lengths, completion_lengths, new_tokens = [3, 5], [4, 2], 4  # the second completion stopped after 2
    with torch.no_grad(), record_routing(model) as recorder:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    generated_log_probs = torch.stack(out.logits, 1).log_softmax(-1)  # (batch, new tokens, vocab)

    payloads = trace_to_vllm(recorder.trace, prompt_lengths, completion_lengths)
    back = trace_from_vllm(payloads, model=model, prompt_lengths=prompt_lengths, completion_lengths=completion_lengths)
    assert back.layers == (0, 1, 2) and back.num_experts == 4 and back.top_k == 2 and back.model_type == "hf_moe"
    routed = back.recorded & back.attention_mask
    assert torch.equal(back.experts.permute(0, 2, 1, 3, 4)[routed],
                       recorder.trace.resized(back.length).experts.permute(0, 2, 1, 3, 4)[routed])

    sequences = out.sequences.clone()  # as TRL builds them: completions right-padded after their end
    sequences[~back.attention_mask] = 0
    with torch.no_grad(), replay_routing(model, back) as replay:
        logits = model(input_ids=sequences, attention_mask=back.attention_mask.long()).logits
    assert replay.replayed_share > 0.5
    width = input_ids.shape[1]
    for row, count in enumerate(completion_lengths):
        tokens = sequences[row, width:width + count]
        replayed = logits[row, width - 1:width - 1 + count].log_softmax(-1).gather(-1, tokens[:, None])
        generated = generated_log_probs[row, :count].gather(-1, tokens[:, None])
        assert (replayed - generated).abs().max().item() <= 1e-5
