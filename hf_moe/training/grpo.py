"""TRL's `GRPOTrainer` for MoE models, with routing replay (`docs/rl.md`).

RL on MoE breaks on routing: the rollout (`generate` with a KV cache, often in bf16) and the training forward (the
full sequence, after optimizer steps) send the same tokens to different experts, and the importance ratios then
measure routing noise, not the policy (R3, arXiv 2510.11370). `MoeGRPOTrainer` records the experts every rollout
token used and replays them:

- `routing_replay="rollout"` (R3): every policy forward on a batch (the old log-probs, the loss) uses the rollout's
  experts, with gate weights from the live router (so the router still learns);
- `routing_replay="first_step"` (R2): the policy's first forward on a batch (TRL's old log-probs, computed when the
  batch is optimised more than once: `num_iterations > 1` or more generation than accumulation steps) is recorded
  and replayed in the later optimisation steps on that batch; with a single pass over each batch there is nothing
  to replay and training is plain GRPO;
- `None`: plain GRPO; the mismatch is measured and logged.

Logged with TRL's metrics: `moe/routing_mismatch` (share of completion tokens whose training forward used another
expert set than the rollout in at least one sparse layer; 0 under R3 by construction, its check) and
`moe/replayed_tokens` (share of real tokens the loss forward routed by a trace). For hf_moe models the loss also
carries the model's own router terms, as `MoeSFTTrainer` (the `_ModelAuxLossMixin`); every other family keeps TRL's.

Rollouts come from `generate` (TRL's default) or from vLLM in colocate mode when the engine returns the experts it
used (`hf_moe.routing.vllm`). TRL's continuous batching, vLLM server mode and tool calling (several generations per
sample) are refused with routing replay on.
"""

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from ..moe_layers import model_type
from ..routing import RoutingReplay, RoutingTrace, record_routing, routing_mismatch, trace_from_vllm
from ..routing.hooks import sparse_layers
from .trl import _ModelAuxLossMixin

ROUTING_REPLAY_MODES = ("rollout", "first_step")
_FROM_ARGS = object()


def _replay_mode(value) -> str | None:
    value = None if value in (None, "none", "None", "") else value
    if value not in (None, *ROUTING_REPLAY_MODES):
        raise ValueError(f"`routing_replay`={value!r} is invalid: choose 'rollout' (R3), 'first_step' (R2) or None")
    return value


@contextmanager
def _vllm_engines_return_routed_experts(enabled: bool):
    """TRL builds its colocated vLLM engine with fixed arguments; while active, the engine it builds also returns
    the experts it routed each token to (`enable_return_routed_experts`)."""
    import trl.generation.vllm_generation as generation

    original = getattr(generation, "LLM", None)
    if not enabled or original is None:  # without vLLM installed TRL refuses `use_vllm` itself
        yield
        return

    def engine(*args, **kwargs):
        return original(*args, **{**kwargs, "enable_return_routed_experts": True})

    generation.LLM = engine
    try:
        yield
    finally:
        generation.LLM = original


@dataclass
class MoeGRPOConfig(GRPOConfig):
    """`trl.GRPOConfig` with `routing_replay`."""

    routing_replay: str | None = field(default=None, metadata={
        "help": "rollout: replay the rollout's experts in every policy forward (R3) | first_step: replay the first "
                "policy forward's experts in later steps on the batch (R2) | none"})

    def __post_init__(self):
        self.routing_replay = _replay_mode(self.routing_replay)
        super().__post_init__()


class MoeGRPOTrainer(_ModelAuxLossMixin, GRPOTrainer):
    """`trl.GRPOTrainer` with routing replay and, for hf_moe models, the model's own router loss terms.

    Example:
    ```python
    >>> trainer = MoeGRPOTrainer(model=moe, reward_funcs=reward, train_dataset=prompts,
    ...                          args=MoeGRPOConfig(output_dir="grpo", routing_replay="rollout"))
    >>> trainer.train()
    ```
    `routing_replay` (here or in `MoeGRPOConfig`): 'rollout' (R3), 'first_step' (R2) or None.
    """

    def __init__(self, model, *args, routing_replay=_FROM_ARGS, **kwargs):
        config = kwargs.get("args", args[1] if len(args) > 1 else None)
        mode = getattr(config, "routing_replay", None) if routing_replay is _FROM_ARGS else routing_replay
        self.routing_replay = _replay_mode(mode)
        vllm_rollouts = bool(getattr(config, "use_vllm", False)) and getattr(config, "vllm_mode", None) == "colocate"
        with _vllm_engines_return_routed_experts(vllm_rollouts and self.routing_replay == "rollout"):
            super().__init__(model, *args, **kwargs)
        self._policy = self.accelerator.unwrap_model(self.model)
        try:
            self._layers = sparse_layers(self._policy)
        except ValueError:  # no router, or expert choice: nothing to record
            if self.routing_replay:
                raise
            self._layers = None
        if self.routing_replay:
            if self.tools:
                raise ValueError("routing replay records single-turn rollouts: it does not support tool calling")
            if self.use_transformers_continuous_batching:
                raise ValueError("routing replay needs `generate` or vLLM rollouts: TRL's continuous batching "
                                 "interleaves sequences it cannot follow")
            if self.use_vllm and self.vllm_mode != "colocate":
                raise ValueError("routing replay reads the experts vLLM used in colocate mode; the vLLM server's "
                                 "TRL client does not return them (use vllm_mode='colocate')")
            if self.use_vllm and (self.pad_to_multiple_of is not None or self.vllm_tensor_parallel_size > 1):
                raise ValueError("routing replay of vLLM rollouts lays prompts out as TRL does without "
                                 "`pad_to_multiple_of` and with `vllm_tensor_parallel_size=1`")
        self._replay = None
        if self.routing_replay:
            self._replay = RoutingReplay(self._policy, chunks=True, layers=self._layers).attach()
        self._ref_replay = None
        if self.routing_replay and self.ref_model is not None:  # a separate reference model (not peft's)
            self._ref_replay = RoutingReplay(self.accelerator.unwrap_model(self.ref_model), chunks=True).attach()
        self._rollout_trace = None  # the current generation batch's, as recorded
        self._first_step_trace = None
        self._scoring_new_batch = False
        self._vllm_outputs = None
        if self.use_vllm and self._layers is not None:
            self.keep_vllm_outputs()

    def keep_vllm_outputs(self):
        """Keep what the colocated vLLM engine returns for each rollout (TRL reads only the tokens and log-probs):
        its `routed_experts` become the rollout's routing trace."""
        engine = self.vllm_generation.llm
        generate = engine.generate

        def generate_and_keep(*args, **kwargs):
            self._vllm_outputs = generate(*args, **kwargs)
            return self._vllm_outputs

        engine.generate = generate_and_keep

    # ------------------------------------------------------------------------------------ rollouts
    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        if self._layers is None:
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
        if self.use_vllm:
            self._vllm_outputs = None
            result = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            self._rollout_trace = self._vllm_trace()
            return result
        with record_routing(self._policy, self._layers) as recorder:
            result = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        self._rollout_trace = recorder.trace if recorder.traces else None
        return result

    def _vllm_trace(self) -> RoutingTrace | None:
        """The rollout's routing from the engine's outputs, laid out as TRL lays out the batch (None when the engine
        returned none: an engine built without `enable_return_routed_experts`)."""
        outputs = self._vllm_outputs or []
        routed = any(getattr(output, "prompt_routed_experts", None) is not None
                     or any(getattr(choice, "routed_experts", None) is not None for choice in output.outputs)
                     for output in outputs)
        if not routed:
            if self.routing_replay == "rollout":
                raise RuntimeError("the vLLM engine returned no routed experts: build it with "
                                   "enable_return_routed_experts=True to replay its routing")
            return None
        return trace_from_vllm(outputs, model=self._policy)

    def _generate_and_score_completions(self, inputs):
        self._rollout_trace = self._first_step_trace = None
        self._scoring_new_batch = True
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._scoring_new_batch = False
        length = output["prompt_ids"].shape[1] + output["completion_ids"].shape[1]
        for key, trace in (("rollout_routing", self._rollout_trace), ("replay_routing", self._replay_source())):
            if trace is not None:  # batch-first tensors: TRL shuffles and splits them with the batch
                output[key] = trace.resized(length).experts.to(torch.int16 if trace.num_experts < 2 ** 15
                                                              else torch.int32)
        self._rollout_trace = self._first_step_trace = None
        return output

    def _replay_source(self) -> RoutingTrace | None:
        return {"rollout": self._rollout_trace, "first_step": self._first_step_trace}.get(self.routing_replay)

    def _old_log_probs_scored(self) -> bool:
        """Whether TRL scores each new batch's old log-probs with the policy (before its reference log-probs), as
        `_generate_and_score_completions` decides: the batch is optimised more than once, or vLLM's importance
        sampling correction needs them."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return (self.args.gradient_accumulation_steps % generate_every != 0
                or (self.use_vllm and self.vllm_importance_sampling_correction))

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """While a new batch is scored (TRL's old and reference log-probs, before any step on it): the policy's and
        the reference's forwards replay the batch's trace; R2 first records it, from the policy's old log-probs."""
        score = super()._get_per_token_logps_and_entropies
        if not (self._scoring_new_batch and self.routing_replay):
            return score(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        policy = model is self.model
        if (policy and self.routing_replay == "first_step" and self._first_step_trace is None
                and self._old_log_probs_scored()):  # the first policy forward on the batch: TRL's old log-probs
            with record_routing(self._policy, self._layers) as recorder:
                result = score(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
            self._first_step_trace = RoutingTrace.concatenate(recorder.traces)  # one per chunk TRL scored
            return result
        replay = self._replay if policy else self._ref_replay if model is self.ref_model else None
        trace = self._replay_source()
        if replay is None or trace is None:
            return score(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        # The reference routes as the policy's forwards do (R3: the rollout), so that the KL term measures the
        # policies, not routing noise (with peft the reference is the policy with its adapters off: `policy`).
        replay.trace = trace.resized(input_ids.shape[1])
        try:
            return score(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        finally:
            replay.trace = None

    # ------------------------------------------------------------------------------------ the loss
    def _trace(self, inputs, key: str, attention_mask: torch.Tensor) -> RoutingTrace | None:
        experts = inputs.get(key)
        if experts is None:
            return None
        return RoutingTrace(experts.long(), attention_mask.bool(), tuple(layer.index for layer in self._layers),
                            self._layers[0].num_experts, model_type(self._policy))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._layers is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        prompt_mask, completion_mask = inputs["prompt_mask"], inputs["completion_mask"]
        replayed = self._trace(inputs, "replay_routing", torch.cat([prompt_mask, completion_mask], dim=1))
        # The rollout's routing of the completion tokens: what the training forward is compared with.
        rollout = self._trace(inputs, "rollout_routing",
                              torch.cat([torch.zeros_like(prompt_mask), completion_mask], dim=1))
        if self._replay is not None:
            self._replay.trace = replayed  # kept until the step's backward ran (`training_step`)
            self._replay.reset_counts()
        with record_routing(self._policy, self._layers) if rollout is not None else nullcontext() as recorder:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        if rollout is not None:
            mismatch = routing_mismatch(rollout, recorder.trace)
            self._log_mean(mode, "moe/routing_mismatch", mismatch.token_share)
            self._log_mean(mode, "moe/routing_mismatch_per_layer", mismatch.mean_layer_share)
        if self._replay is not None:
            self._log_mean(mode, "moe/replayed_tokens", self._replay.replayed_share)
        return loss

    def _log_mean(self, mode: str, key: str, value: float):
        value = torch.tensor(value, device=self.accelerator.device)
        self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value).mean().item())

    def training_step(self, model, inputs, num_items_in_batch=None):
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:  # after the backward: a gradient-checkpointed recomputation replays too
            if self._replay is not None:
                self._replay.trace = None

    def _router_terms_weight(self, inputs, num_items_in_batch):
        # GRPO scales its loss for gradient accumulation itself (TRL adds its own aux loss the same way).
        return 1.0 / self.current_gradient_accumulation_steps if self.model.training else 1.0
