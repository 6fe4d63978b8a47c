"""Record the experts every token used, and replay them: forward hooks on the routers that `moe_layers` finds.

Every transformers 5.x MoE block (and hf_moe's) asks its router for `(router_logits, top_k_weights, top_k_index)`
and hands the last two to its experts: reading that output records the routing, replacing it replays one. Which
positions a router call covers comes from a pre-hook on the decoder stack (the module holding `layers`): its input is
`(batch, seq)` tokens starting after the tokens already in its KV cache, so a `generate` (prefill, then one token per
step, static or dynamic cache) lands on the positions of the final sequences.

A forward with gradient checkpointing recomputes its layers during `backward`: keep the hooks attached until the
backward ran (`RoutingReplay` attached for a training step; `replay_routing` around forward *and* backward).
"""

from contextlib import contextmanager

import torch
from torch import nn

from ..modeling.configuration_hf_moe import EXPERT_CHOICE_ROUTING
from ..moe_layers import MoeLayer, find_moe_layers, model_type
from .gates import detect_convention, is_hf_moe_router, replayed_gates
from .trace import NOT_RECORDED, RoutingTrace, RoutingTraceMismatch


class ExpertChoiceNotReplayable(ValueError):
    """Expert-choice routing selects per batch: a token's experts depend on the other tokens, there is no per-token
    routing to record or replay."""


def sparse_layers(model: nn.Module) -> list[MoeLayer]:
    """The sparse layers whose routing can be recorded and replayed (top-k routers); refuses expert choice and a
    model without routers with one line."""
    layers = find_moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} (model_type={model_type(model)!r}) has no recognisable MoE router: "
                         f"nothing to record or replay")
    if any(layer.routing_kind == EXPERT_CHOICE_ROUTING for layer in layers):
        raise ExpertChoiceNotReplayable("routing replay needs token-choice (top-k) routers: this model routes by "
                                        "expert choice, whose selection is per batch by design")
    return layers


def _decoder_stack(model: nn.Module, layers: list[MoeLayer]) -> nn.Module:
    """The module whose forward sees each call's tokens and cache: the parent of the `layers` list."""
    name = layers[0].router_name
    return model.get_submodule(name.split(".layers.")[0]) if ".layers." in name else model


def _padding_mask(mask, batch: int, end: int) -> torch.Tensor | None:
    """(batch, positions) the real tokens up to position `end`, from the mask the decoder stack got: a 2-D padding
    mask as it is; the 4-D mask `(batch, 1, queries, keys)` that `generate` prepares for a static cache (alone or in
    a dict by attention type), whose keys are absolute positions: the keys the call's last query may attend to
    (boolean: True allows; additive: 0 allows). None when there is none (every token is real)."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 2:
        return mask
    if mask.dim() != 4 or mask.shape[-1] < end:
        return None
    allowed = mask[:, 0, -1, :end]
    return (allowed if allowed.dtype == torch.bool else allowed == 0).expand(batch, end)


class _Positions:
    """The token positions of the decoder stack's current call: batch, seq, first position, attention mask; and
    `first_row`, where the call's sequences start in a batch that consecutive calls walk through (a caller scoring a
    batch in chunks: each call that does not continue a cache starts after the previous call's sequences)."""

    def __init__(self):
        self.batch = self.seq = self.start = self.first_row = 0
        self.attention_mask = None
        self.calls = 0

    def __call__(self, module, args, kwargs):
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        previous_batch = self.batch
        self.batch, self.seq = inputs.shape[:2]
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        self.start = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        if self.start == 0 and self.calls:
            self.first_row += previous_batch
        self.calls += 1
        self.attention_mask = _padding_mask(kwargs.get("attention_mask"), self.batch, self.start + self.seq)

    def restart(self):
        """The next call starts at the first sequence again."""
        self.first_row = self.calls = 0

    def rows_per_token(self, rows: int) -> int:
        tokens = self.batch * self.seq
        if tokens == 0 or rows % tokens:
            raise RuntimeError(f"a router call of {rows} rows does not split over the {tokens} tokens of the call")
        return rows // tokens


class _RouterHooks:
    """Attach / detach: a pre-hook on the decoder stack and a forward hook on each router."""

    def __init__(self, model: nn.Module, layers: list[MoeLayer] | None = None):
        self.model = model
        self.layers = sparse_layers(model) if layers is None else layers  # a caller hooking often finds them once
        self.positions = _Positions()
        self._handles = []

    def attach(self):
        if self._handles:
            return self
        stack = _decoder_stack(self.model, self.layers)
        self._handles.append(stack.register_forward_pre_hook(self.positions, with_kwargs=True))
        for position, layer in enumerate(self.layers):
            self._handles.append(layer.router.register_forward_hook(self._router_hook(position, layer),
                                                                    with_kwargs=True))
        return self

    def detach(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _router_hook(self, position: int, layer: MoeLayer):
        raise NotImplementedError


class RoutingRecorder(_RouterHooks):
    """Records each router call's experts at its positions. A call that starts at position 0 (no cache, or an
    empty one) begins a new batch; cached continuations (`generate`'s decoding steps) extend it. `trace` is the
    last batch, `traces` all of them."""

    def __init__(self, model: nn.Module, layers: list[MoeLayer] | None = None):
        super().__init__(model, layers)
        self._batches = []  # per batch: {"calls": [(start, seq, {layer position: (batch, seq, r, k)})], "mask",
        # "length": the final sequences' length when a `generate` made them}

    def attach(self):
        """Also note the length of what `model.generate` returns: its last token was never fed to a forward, and the
        trace covers it (NOT_RECORDED) so that it fits the final sequences."""
        super().attach()
        generate = getattr(self.model, "generate", None)
        if callable(generate) and "generate" not in vars(self.model):
            def generate_and_note_length(*args, **kwargs):
                output = generate(*args, **kwargs)
                sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
                if isinstance(sequences, torch.Tensor) and self._batches:
                    self._batches[-1]["length"] = sequences.shape[-1]
                return output

            self.model.generate = generate_and_note_length
            self._wrapped_generate = True
        return self

    def detach(self):
        super().detach()
        if getattr(self, "_wrapped_generate", False):
            del self.model.generate
            self._wrapped_generate = False

    def _router_hook(self, position, layer):
        def record(router, args, kwargs, output):
            if not (isinstance(output, tuple) and len(output) >= 3):
                raise RuntimeError(f"{layer.router_name} returned no top-k index: its routing cannot be recorded")
            positions = self.positions
            if position == 0:
                if positions.start == 0 or not self._batches:
                    self._batches.append({"calls": [], "mask": None})
                self._batches[-1]["calls"].append((positions.start, positions.seq, {}))
                if positions.attention_mask is not None:
                    self._batches[-1]["mask"] = positions.attention_mask
            index = output[2].detach()
            rows_per_token = positions.rows_per_token(index.shape[0])
            calls = self._batches[-1]["calls"][-1][2]
            # Kept on the device until the trace is built: no host sync per layer.
            calls[position] = index.reshape(positions.batch, positions.seq, rows_per_token, -1)
        return record

    @property
    def traces(self) -> list[RoutingTrace]:
        return [self._trace(batch) for batch in self._batches]

    @property
    def trace(self) -> RoutingTrace:
        if not self._batches:
            raise RuntimeError("no forward ran while recording: there is no routing trace")
        return self._trace(self._batches[-1])

    def _trace(self, batch) -> RoutingTrace:
        calls = batch["calls"]
        length = max([start + seq for start, seq, _ in calls] + [batch.get("length", 0)])
        first = calls[0][2][0]
        experts = torch.full((first.shape[0], len(self.layers), length, *first.shape[2:]), NOT_RECORDED)
        for start, seq, per_layer in calls:
            for position, index in per_layer.items():
                experts[:, position, start:start + seq] = index.to("cpu", torch.long)
        attention_mask = torch.ones(experts.shape[0], length, dtype=torch.bool)
        mask = batch["mask"]
        if mask is not None:  # the last call's mask; tokens after it (generate's last one) are real
            covered = min(mask.shape[1], length)
            attention_mask[:, :covered] = mask[:, :covered].bool().cpu()
        return RoutingTrace(experts, attention_mask, tuple(layer.index for layer in self.layers),
                            self.layers[0].num_experts, model_type(self.model))


class RoutingReplay(_RouterHooks):
    """While attached, every router call routes its rows to the experts `trace` holds for their positions (rows the
    trace did not record keep the live choice); the gate weights are the live router's (`gates.replayed_gates`).
    `trace` may be swapped between forwards; None replays nothing. `replayed_rows` / `routed_rows` count the tokens
    (real ones) since the last `reset_counts()`.

    A forward's batch must be the trace's; with `chunks=True` consecutive forwards walk through the trace's sequences
    instead (a caller scoring the batch in chunks, as TRL does): each forward that does not continue a KV cache takes
    the sequences after the previous forward's, from the first again whenever `trace` is set."""

    def __init__(self, model: nn.Module, trace: RoutingTrace | None = None, chunks: bool = False,
                 layers: list[MoeLayer] | None = None):
        super().__init__(model, layers)
        self._conventions = {}
        self.chunks = chunks
        self.trace = trace
        self.reset_counts()

    @property
    def trace(self) -> RoutingTrace | None:
        return self._trace

    @trace.setter
    def trace(self, trace: RoutingTrace | None):
        if trace is not None:
            trace.check_fits(tuple(layer.index for layer in self.layers), self.layers[0].num_experts,
                             self.layers[0].top_k, model_type=model_type(self.model))
        self._trace = trace
        self._device_experts = None
        self.positions.restart()

    def reset_counts(self):
        self.replayed_rows = self.routed_rows = 0

    @property
    def replayed_share(self) -> float:
        routed = int(self.routed_rows)
        return int(self.replayed_rows) / routed if routed else 0.0

    def _trace_rows(self, position: int, device) -> torch.Tensor:
        """(rows, k) the trace's experts for this call's rows of sparse layer `position`."""
        trace, calls = self._trace, self.positions
        first = calls.first_row if self.chunks else 0
        if (first + calls.batch > trace.batch_size) or (not self.chunks and calls.batch != trace.batch_size):
            raise RoutingTraceMismatch(f"the routing trace holds {trace.batch_size} sequences, the forward "
                                       f"{'reaches sequence ' if self.chunks else ''}{first + calls.batch}")
        if calls.start + calls.seq > trace.length:
            raise RoutingTraceMismatch(f"the routing trace covers {trace.length} positions, the forward reaches "
                                       f"position {calls.start + calls.seq}")
        if self._device_experts is None or self._device_experts.device != torch.device(device):
            self._device_experts = trace.experts.to(device)
        rows = self._device_experts[first:first + calls.batch, position, calls.start:calls.start + calls.seq]
        return rows.reshape(-1, trace.top_k)

    def _router_hook(self, position, layer):
        def replay(router, args, kwargs, output):
            if self._trace is None:
                return None
            logits, weights, index = output[:3]
            if not is_hf_moe_router(router) and router not in self._conventions:
                self._conventions[router] = detect_convention(router, logits.reshape(-1, logits.shape[-1]),
                                                              weights, index)
            rows_per_token = self.positions.rows_per_token(index.shape[0])
            if rows_per_token != self._trace.rows_per_token:
                raise RoutingTraceMismatch(f"the routing trace has {self._trace.rows_per_token} router rows per token,"
                                           f" the model {rows_per_token}")
            traced = self._trace_rows(position, index.device)
            recorded = (traced >= 0).all(-1, keepdim=True)  # (rows, 1)
            chosen = torch.where(recorded, traced, index)
            token_mask = args[1] if len(args) > 1 else kwargs.get("token_mask")
            gates = replayed_gates(router, self._conventions.get(router), logits.reshape(-1, logits.shape[-1]),
                                   chosen, weights.dtype, token_mask)
            if not is_hf_moe_router(router):  # rows the trace does not cover keep the router's own weights
                gates = torch.where(recorded, gates, weights)
            self._count(position, recorded)
            return (logits, gates, chosen, *output[3:])
        return replay

    def _count(self, position: int, recorded: torch.Tensor):
        if position != 0:
            return
        calls = self.positions
        real = torch.ones(calls.batch, calls.seq, dtype=torch.bool, device=recorded.device)
        if calls.attention_mask is not None:
            real = calls.attention_mask[:, -calls.seq:].bool().to(recorded.device)
        rows = recorded.reshape(calls.batch, calls.seq, -1).all(-1)
        # Summed on the device: read (one host sync) only when `replayed_share` is asked for.
        self.replayed_rows = self.replayed_rows + (rows & real).sum()
        self.routed_rows = self.routed_rows + real.sum()


@contextmanager
def record_routing(model: nn.Module, layers: list[MoeLayer] | None = None):
    """Record the experts every token of every forward (or `generate`) inside the block was sent to.

    ```python
    >>> with record_routing(model) as recorder:
    ...     sequences = model.generate(**prompts, max_new_tokens=32)
    >>> recorder.trace.experts.shape  # (batch, sparse layers, final length, rows per token, k)
    ```
    The last generated token is NOT_RECORDED: no forward reads it.
    """
    recorder = RoutingRecorder(model, layers).attach()
    try:
        yield recorder
    finally:
        recorder.detach()


@contextmanager
def replay_routing(model: nn.Module, trace: RoutingTrace):
    """Route every forward inside the block (and its backward's recomputation) as `trace` says.

    ```python
    >>> with replay_routing(model, trace) as replay:
    ...     loss = model(input_ids=sequences, attention_mask=mask, labels=labels).loss
    ...     loss.backward()
    >>> replay.replayed_share  # share of real tokens routed by the trace
    ```
    """
    replay = RoutingReplay(model, trace).attach()
    try:
        yield replay
    finally:
        replay.detach()
