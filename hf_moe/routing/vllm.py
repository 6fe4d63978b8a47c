"""vLLM's returned routing (`enable_return_routed_experts`) to and from a `RoutingTrace` aligned to TRL's batches.

What vLLM returns, and where it is written down (vLLM has shipped two layouts; both are read here):

**Split layout** (vLLM 0.21). Documented at https://docs.vllm.ai/en/v0.21.0/training/routed_experts_replay/ =
`docs/training/routed_experts_replay.md` of vllm-project/vllm @ 0087e005dec9ed37e5564c4d13b38d350ce61992:

- `RequestOutput.prompt_routed_experts`: `numpy.ndarray` `[prompt_len, num_moe_layers, top_k]`, dtype `int16`, the
  prompt tokens; `prompt_len` matches `usage.prompt_tokens`. Request level, shared by the `n` completions.
- `CompletionOutput.routed_experts`: `numpy.ndarray` `[gen_len, num_moe_layers, top_k]` `int16`, the generated tokens
  only; "`gen_len` matches the number of generated tokens (i.e., `usage.completion_tokens` or fewer)".
- Values are expert ids in `[0, num_experts)`; "Prefix caching: Yes (cached positions marked with `-1` sentinel)".
- OpenAI server (`/v1/completions`, `/v1/chat/completions`): the same arrays as JSON `list[list[list[int]]]`,
  `prompt_routed_experts` on the response, `routed_experts` on each choice; `null` when absent.

  How many generated tokens are covered comes from the code of that design, `vllm/model_executor/layers/fused_moe/
  routed_experts_capturer.py` (the version defining `split_routed_experts` and `_RoutedExpertsHostCache`; the index
  this was read from does not name its commit): the host cache holds one `int16` row per token *position* that went
  through a forward (filled with -1 first in the version with prefix-cache hydration), so its length is
  `prompt_len + completion_len - 1` (the last generated token is never forwarded); `split_routed_experts` cuts it at
  `prompt_len`, clips the generated part to the output token count, and returns `None` for an empty part. So
  `gen_len` is `completion_len - 1` (`None` for a one-token completion). Layers: `num_moe_layers` is
  `_count_moe_layers(hf_text_config)` (sparse layers only, counted in decoder order) and each `FusedMoE` writes row
  `moe_layer_id`; that `moe_layer_id` follows decoder order is inferred, its assignment was not read.

**Full layout** (newer, one array per completion, no prompt array). `vllm/entrypoints/openai/completion/protocol.py`
@ 002032ee2b18e1f7bd924ec47b62504ba3866063, `CompletionResponseChoice.routed_experts`: a base64 string of `.npy`
bytes (`np.load(io.BytesIO(base64.b64decode(s)))`), shape `(num_tokens - 1, num_layers, num_experts_per_tok)`, "dtype
uint8/uint16/int32", "`num_tokens - 1` because the last sampled token has not been forwarded yet", `None` when
aborted before any forward or when the feature is off. `docs/features/routed_experts.md` @
e2059013e37372019b40e70ecb823902968f37c2 says the same (offline, `outputs[0].outputs[0].routed_experts` is that base64
string too), with the layer axis "total number of hidden layers in the model (not just MoE layers)" and dtype "uint8
when the model has <= 256 experts, otherwise uint16". The first implementation (PR #28284, `vllm/outputs.py` @
003d3ee22261b7937258b7531aee00e10393f1d6: `CompletionOutput.routed_experts: np.ndarray  # [seq_len,layer_num,topk]`;
its capturer @ 00bd1493b3e82d6c13c68ee8a0e1c5a96707e190 stores `int32` rows for all `num_hidden_layers`, indexed by
decoder layer) is read the same way. Unsigned dtypes have no sentinel.

Not determinable here: which vLLM releases carry the full layout, and the output section of the current page
https://docs.vllm.ai/en/latest/training/routed_experts/ (aux-output connector; only its opening could be read).

**Reading** (`trace_from_vllm`): a payload carrying a prompt array is read as the split layout, one without as the full
layout. Its layer axis is either the sparse layers in order (`len(layers)` rows) or every decoder layer
(`num_hidden_layers` rows, of which the `layers` rows are kept). Negative ids (vLLM's -1 sentinel) become
NOT_RECORDED; the covered token counts must be the documented ones (prompt: `prompt_len`; generated: `completion_len
- 1`, or `completion_len`; full: `prompt_len + completion_len - 1`, or `+ completion_len`). The trace lays the
sequences out as TRL's GRPO does: each prompt left-padded to the batch's longest prompt, each completion right after
it, right-padded to the longest completion (`padding_side="right"`: prompt and completion from position 0). Padding
and every position vLLM did not route (the last generated token at least) are NOT_RECORDED; `attention_mask` is 1
on prompt and completion tokens. `rows_per_token` is 1 (vLLM routes whole tokens).

**Writing** (`trace_to_vllm`): the split layout, per sequence `{"prompt_routed_experts": int16 [prompt_len, layers,
k], "routed_experts": int16 [completion_len - 1, layers, k] or None}`, sparse layers in order, -1 where the trace
did not record; the full layout cannot carry a sentinel, so it is not written.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .trace import NOT_RECORDED, RoutingTrace, RoutingTraceMismatch

VLLM_DTYPE = np.int16  # the split layout's dtype (docs/training/routed_experts_replay.md, vLLM 0.21)
VLLM_UNROUTED = -1  # vLLM's sentinel for positions it did not route (prefix-cache hits)
PADDING_SIDES = ("left", "right")


@dataclass
class _Sequence:
    """One prompt + completion as read from a payload: token counts and the routed rows (tokens, layers, k)."""

    where: str
    prompt_length: int | None
    completion_length: int | None
    prompt: np.ndarray | None  # split layout: the prompt's rows
    completion: np.ndarray | None  # split layout: the generated rows; full layout: all rows
    split: bool


# ------------------------------------------------------------------------------------------------ payload reading
def _field(source, name):
    if isinstance(source, Mapping):
        return source.get(name)
    return getattr(source, name, None)


def _array(value, where: str) -> np.ndarray | None:
    """A payload's routing as a (tokens, layers, k) integer array: numpy, torch, nested lists, or base64 `.npy`."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        try:
            value = np.load(io.BytesIO(base64.b64decode(value, validate=True)), allow_pickle=False)
        except (ValueError, OSError) as error:
            raise RoutingTraceMismatch(f"{where}: not base64 of .npy bytes ({error})") from None
    elif isinstance(value, torch.Tensor):
        value = value.cpu().numpy()
    elif not isinstance(value, np.ndarray):
        try:
            value = np.asarray(value)
        except ValueError as error:
            raise RoutingTraceMismatch(f"{where}: not a [tokens, layers, top_k] array ({error})") from None
        if value.size == 0:
            return None
    if value.ndim != 3:
        raise RoutingTraceMismatch(f"{where}: expected [tokens, layers, top_k], got shape {tuple(value.shape)}")
    if value.shape[0] and not np.issubdtype(value.dtype, np.integer):
        raise RoutingTraceMismatch(f"{where}: expert ids must be integers, got dtype {value.dtype}")
    return value


def _length(token_ids) -> int | None:
    return None if token_ids is None else len(token_ids)


def _from_openai(response: Mapping, where: str) -> list[_Sequence]:
    """An OpenAI-compatible `/v1/completions` or `/v1/chat/completions` response (its JSON, as a dict)."""
    usage = response.get("usage") or {}
    choices = sorted(response["choices"], key=lambda choice: choice.get("index", 0))
    prompt = _array(response.get("prompt_routed_experts"), f"{where}.prompt_routed_experts")
    sequences = []
    for choice in choices:
        at = f"{where}.choices[{choice.get('index', 0)}]"
        prompt_length = _length(choice.get("prompt_token_ids") or response.get("prompt_token_ids"))
        if prompt_length is None:
            prompt_length = usage.get("prompt_tokens")
        completion_length = _length(choice.get("token_ids"))
        if completion_length is None and len(choices) == 1:
            completion_length = usage.get("completion_tokens")
        sequences.append(_Sequence(at, prompt_length, completion_length, prompt,
                                   _array(choice.get("routed_experts"), f"{at}.routed_experts"),
                                   split=prompt is not None))
    return sequences


def _from_request(request, where: str) -> list[_Sequence]:
    """A `RequestOutput` (or a mapping of its fields), or one flat sequence `{prompt_routed_experts, routed_experts,
    [prompt_token_ids, token_ids]}` such as `trace_to_vllm` writes."""
    prompt = _array(_field(request, "prompt_routed_experts"), f"{where}.prompt_routed_experts")
    prompt_length = _length(_field(request, "prompt_token_ids"))
    outputs = _field(request, "outputs")
    completions = list(outputs) if outputs is not None else [request]
    sequences = []
    for number, completion in enumerate(completions):
        at = f"{where}.outputs[{number}]" if outputs is not None else where
        sequences.append(_Sequence(at, prompt_length, _length(_field(completion, "token_ids")), prompt,
                                   _array(_field(completion, "routed_experts"), f"{at}.routed_experts"),
                                   split=prompt is not None))
    return sequences


def _sequences(requests, prompt_lengths, completion_lengths) -> list[_Sequence]:
    if isinstance(requests, (Mapping, str, bytes)) or not isinstance(requests, Sequence):
        requests = [requests]
    sequences = []
    for number, request in enumerate(requests):
        where = f"requests[{number}]"
        if isinstance(request, Mapping) and "choices" in request:
            sequences.extend(_from_openai(request, where))
        else:
            sequences.extend(_from_request(request, where))
    for name, lengths, field in (("prompt_lengths", prompt_lengths, "prompt_length"),
                                 ("completion_lengths", completion_lengths, "completion_length")):
        if lengths is None:
            continue
        lengths = [int(length) for length in lengths]
        if len(lengths) != len(sequences):
            raise RoutingTraceMismatch(f"{name} has {len(lengths)} entries, the payloads hold {len(sequences)} "
                                       f"sequences")
        for sequence, length in zip(sequences, lengths, strict=True):
            setattr(sequence, field, length)
    return sequences


# ------------------------------------------------------------------------------------------------ checks
def _rows(sequence: _Sequence) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(prompt rows, generated rows) of a sequence, their counts checked against its token counts."""
    where, prompt_length, completion_length = sequence.where, sequence.prompt_length, sequence.completion_length
    if prompt_length is None and sequence.split:  # the split layout's prompt array covers the prompt, documented
        prompt_length = sequence.prompt_length = sequence.prompt.shape[0]
    if prompt_length is None or completion_length is None:
        missing = "prompt" if prompt_length is None else "completion"
        raise RoutingTraceMismatch(f"{where}: the {missing} token count is unknown (no token ids, no usage): pass "
                                   f"{missing}_lengths=")
    if sequence.split:
        prompt, generated = sequence.prompt, sequence.completion
        if prompt.shape[0] != prompt_length:
            raise RoutingTraceMismatch(f"{where}: prompt_routed_experts covers {prompt.shape[0]} tokens, the prompt "
                                       f"has {prompt_length}")
        routed = 0 if generated is None else generated.shape[0]
        if routed not in (max(completion_length - 1, 0), completion_length):
            raise RoutingTraceMismatch(f"{where}: routed_experts covers {routed} generated tokens, the completion "
                                       f"has {completion_length} (vLLM routes all but the last: "
                                       f"{max(completion_length - 1, 0)})")
        return prompt, generated
    rows = sequence.completion
    if rows is None:
        raise RoutingTraceMismatch(f"{where}: no routed_experts (the engine runs without "
                                   f"enable_return_routed_experts, or the request was aborted or preempted)")
    total = prompt_length + completion_length
    if rows.shape[0] not in (total - 1, total):
        raise RoutingTraceMismatch(f"{where}: routed_experts covers {rows.shape[0]} tokens, prompt + completion "
                                   f"have {total} (vLLM routes all but the last: {total - 1})")
    return rows[:prompt_length], rows[prompt_length:]


def _select_layers(rows: np.ndarray, where: str, layers: tuple[int, ...], num_hidden_layers: int | None):
    """The sparse layers' rows: the payload numbers either the sparse layers only, in order, or every decoder
    layer."""
    count = rows.shape[1]
    if count == len(layers):
        return rows
    if num_hidden_layers is not None and count == num_hidden_layers and max(layers) < count:
        return rows[:, list(layers)]
    every = f" or all {num_hidden_layers} decoder layers" if num_hidden_layers is not None else ""
    raise RoutingTraceMismatch(f"{where}: the payload has {count} layers, the model {len(layers)} sparse layers "
                               f"(decoder layers {list(layers)}){every}")


def _checked(rows: np.ndarray | None, where: str, layers, num_hidden_layers, top_k, num_experts):
    if rows is None or rows.shape[0] == 0:
        return None
    rows = _select_layers(rows, where, layers, num_hidden_layers)
    if rows.shape[2] != top_k:
        raise RoutingTraceMismatch(f"{where}: the payload routes each token to k={rows.shape[2]} experts, the model "
                                   f"to k={top_k}")
    rows = rows.astype(np.int64)
    if rows.size and rows.max() >= num_experts:
        raise RoutingTraceMismatch(f"{where}: expert id {int(rows.max())} is out of range for {num_experts} "
                                   f"experts")
    return np.where(rows < 0, NOT_RECORDED, rows)


def _model_fields(model) -> dict:
    from ..moe_layers import model_type as model_type_of
    from .hooks import sparse_layers

    sparse = sparse_layers(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {"layers": tuple(layer.index for layer in sparse), "num_experts": sparse[0].num_experts,
            "top_k": sparse[0].top_k, "model_type": model_type_of(model),
            "num_hidden_layers": getattr(config, "num_hidden_layers", None)}


def _check_padding_side(padding_side: str):
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side={padding_side!r} is invalid: choose one of {PADDING_SIDES}")


# ------------------------------------------------------------------------------------------------ public API
def trace_from_vllm(requests, *, layers: Sequence[int] | None = None, num_experts: int | None = None,
                    model_type: str | None = None, pad_to: int | None = None, padding_side: str = "left",
                    model=None, top_k: int | None = None, num_hidden_layers: int | None = None,
                    prompt_lengths: Sequence[int] | None = None,
                    completion_lengths: Sequence[int] | None = None) -> RoutingTrace:
    """One `RoutingTrace` of the sequences prompt + completion of vLLM's payloads (layout: the module docstring).

    `requests`: a list of vLLM `RequestOutput`s (duck typed: `prompt_token_ids`, `prompt_routed_experts`,
    `outputs[i].token_ids`, `outputs[i].routed_experts`; every completion of a request is one sequence, in order),
    OpenAI-server responses (their JSON as dicts: one sequence per choice), or flat per-sequence dicts as
    `trace_to_vllm` writes (then give `prompt_lengths` / `completion_lengths`, which also override the counts taken
    from token ids). `layers`: the decoder index of each sparse layer (`[layer.index for layer in
    find_moe_layers(model)]`); `top_k` (optional) and `num_hidden_layers` (to read payloads numbering every decoder
    layer) complete it; `model=` derives all of them. `pad_to`: the trace's length when longer than the batch's
    longest prompt + completion (e.g. TRL's padded completion width).
    """
    _check_padding_side(padding_side)
    if model is not None:
        if layers is not None or num_experts is not None:
            raise ValueError("pass either model= or layers=/num_experts=, not both")
        fields = _model_fields(model)
        layers, num_experts = fields["layers"], fields["num_experts"]
        top_k = fields["top_k"] if top_k is None else top_k
        model_type = fields["model_type"] if model_type is None else model_type
        num_hidden_layers = fields["num_hidden_layers"] if num_hidden_layers is None else num_hidden_layers
    if layers is None or num_experts is None:
        raise ValueError("trace_from_vllm needs layers= and num_experts= (or model=)")
    layers = tuple(int(index) for index in layers)
    if not layers:
        raise ValueError("layers= is empty: the model has no sparse layer")

    sequences = _sequences(requests, prompt_lengths, completion_lengths)
    if not sequences:
        raise ValueError("no vLLM payload to read")
    rows = []
    for sequence in sequences:
        prompt, generated = _rows(sequence)
        if top_k is None:  # the first payload sets k for the others
            top_k = next((part.shape[2] for part in (prompt, generated) if part is not None and part.shape[0]),
                         None)
        rows.append((_checked(prompt, f"{sequence.where} (prompt)", layers, num_hidden_layers, top_k, num_experts),
                     _checked(generated, f"{sequence.where} (completion)", layers, num_hidden_layers, top_k,
                              num_experts)))

    if top_k is None:
        raise RoutingTraceMismatch("the payloads route no token: pass top_k= (or model=)")
    prompt_counts = [sequence.prompt_length for sequence in sequences]
    completion_counts = [sequence.completion_length for sequence in sequences]
    width = max(prompt_counts)
    if padding_side == "left":
        starts = [width - count for count in prompt_counts]
        length = width + max(completion_counts)
    else:
        starts = [0] * len(sequences)
        length = max(p + c for p, c in zip(prompt_counts, completion_counts, strict=True))
    if pad_to is not None:
        if pad_to < length:
            raise RoutingTraceMismatch(f"pad_to={pad_to} is shorter than the batch's {length} positions")
        length = pad_to

    experts = torch.full((len(sequences), len(layers), length, 1, top_k), NOT_RECORDED, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for row, (start, prompt_count, completion_count, (prompt, generated)) in enumerate(
            zip(starts, prompt_counts, completion_counts, rows, strict=True)):
        completion_start = start + prompt_count
        attention_mask[row, start:completion_start + completion_count] = True
        for first, part in ((start, prompt), (completion_start, generated)):
            if part is not None:
                experts[row, :, first:first + part.shape[0], 0] = torch.from_numpy(part.transpose(1, 0, 2))
    return RoutingTrace(experts, attention_mask, layers, int(num_experts), model_type)


def trace_to_vllm(trace: RoutingTrace, prompt_lengths: Sequence[int], completion_lengths: Sequence[int], *,
                  padding_side: str = "left", prompt_width: int | None = None) -> list[dict]:
    """Per sequence, vLLM's split-layout arrays: `{"prompt_routed_experts": int16 [prompt_len, layers, k],
    "routed_experts": int16 [completion_len - 1, layers, k] or None}` (-1 where the trace did not record).

    The trace lays the sequences out as `trace_from_vllm` does; `prompt_width` is the width of the left-padded prompt
    block when it is wider than the longest prompt (a `generate` on prompts padded further).
    """
    _check_padding_side(padding_side)
    prompt_lengths = [int(length) for length in prompt_lengths]
    completion_lengths = [int(length) for length in completion_lengths]
    if not len(prompt_lengths) == len(completion_lengths) == trace.batch_size:
        raise RoutingTraceMismatch(f"the trace holds {trace.batch_size} sequences, prompt_lengths "
                                   f"{len(prompt_lengths)} and completion_lengths {len(completion_lengths)}")
    if trace.rows_per_token != 1:
        raise RoutingTraceMismatch(f"vLLM routes whole tokens: the trace has {trace.rows_per_token} router rows per "
                                   f"token")
    if trace.num_experts > np.iinfo(VLLM_DTYPE).max + 1:
        raise RoutingTraceMismatch(f"{trace.num_experts} experts do not fit vLLM's int16 expert ids")
    width = max(prompt_lengths) if prompt_width is None else int(prompt_width)
    if width < max(prompt_lengths):
        raise RoutingTraceMismatch(f"prompt_width={width} is narrower than the longest prompt "
                                   f"({max(prompt_lengths)} tokens)")
    if min(prompt_lengths) < 1 or min(completion_lengths) < 1:
        raise RoutingTraceMismatch("vLLM requests have at least one prompt and one generated token: got prompt "
                                   f"lengths {prompt_lengths}, completion lengths {completion_lengths}")
    payloads = []
    for row, (prompt_count, completion_count) in enumerate(zip(prompt_lengths, completion_lengths, strict=True)):
        start = width - prompt_count if padding_side == "left" else 0
        routed_end = start + prompt_count + completion_count - 1  # vLLM never routes the last generated token
        if start + prompt_count + completion_count > trace.length + 1:
            raise RoutingTraceMismatch(f"sequence {row}: prompt + completion reach position "
                                       f"{start + prompt_count + completion_count}, the trace covers {trace.length}")
        real = trace.attention_mask[row, start:routed_end]
        if not bool(real.all()):
            position = start + int((~real).nonzero()[0, 0])
            raise RoutingTraceMismatch(f"sequence {row}: the trace marks position {position} as padding, "
                                       f"prompt_lengths/completion_lengths say it is a token")
        rows = trace.experts[row, :, start:routed_end, 0].permute(1, 0, 2).cpu().numpy().astype(VLLM_DTYPE)
        rows[rows < 0] = VLLM_UNROUTED
        generated = rows[prompt_count:]
        payloads.append({"prompt_routed_experts": rows[:prompt_count],
                         "routed_experts": generated if generated.shape[0] else None})
    return payloads
