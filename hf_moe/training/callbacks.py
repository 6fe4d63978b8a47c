"""Trainer callbacks for MoE runs: expert statistics in every logger, a load heatmap, and the non-finite guard."""

import logging
from pathlib import Path

import torch
from transformers import DefaultFlowCallback, PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from ..moe_layers import find_moe_layers
from .heatmap import save_load_heatmap
from .optimizer_step import OptimizerStepCallback, mark_optimizer_step_skipped
from .router_stats import LOSS_TERMS, RouterStatsRecorder, is_per_layer_key
from .zero3 import set_zero3_leaf_sparse_blocks

logger = logging.getLogger(__name__)


def add_moe_callbacks(trainer: Trainer, *callbacks: TrainerCallback) -> Trainer:
    """Add `callbacks` to `trainer` ahead of its reporting integrations (TensorBoard, W&B, ...), so the keys they add
    in `on_log` reach every `report_to` logger, not only `state.log_history`. Returns the trainer.

    The Trainer runs its reporters before the callbacks passed to it (`default_callbacks + callbacks`) and offers no
    public way to insert a callback at a position; so the callbacks after `DefaultFlowCallback` are popped and added
    again behind ours, through the public `pop_callback` / `add_callback` (pinned by a test). The Trainer's console
    printer (`ProgressCallback`, or `PrinterCallback` with `disable_tqdm`) is re-added as [`MoeProgressCallback`] /
    [`MoePrinterCallback`], which print the MoE summary without the per-layer keys. Under DeepSpeed ZeRO-3 the
    sparse blocks also become ZeRO-3 leaf modules (`hf_moe.training.zero3`). (hf_moe's fine-tuned card on
    `trainer.push_to_hub()` is the Hub side's: `hf_moe.hub.use_training_card_on_push(trainer)`.)

    Example:
    ```python
    >>> trainer = add_moe_callbacks(SFTTrainer(model=moe, args=args, train_dataset=ds), ExpertStatsCallback())
    ```
    """
    behind = [cb for cb in trainer.callback_handler.callbacks if not isinstance(cb, DefaultFlowCallback)]
    for callback in behind:
        trainer.pop_callback(callback)
    for callback in (*callbacks, *map(_summary_printer, behind)):
        trainer.add_callback(callback)
    for callback in callbacks:
        if isinstance(callback, _MoeLogCallback):
            callback.peers = trainer.callback_handler.callbacks
            callback.ahead_of_reporters = True
        if isinstance(callback, OptimizerStepCallback):
            callback.trainer = trainer
    set_zero3_leaf_sparse_blocks(trainer)  # a no-op unless DeepSpeed ZeRO-3 is configured
    return trainer


def console_logs(logs: dict | None) -> dict | None:
    """`logs` without the per-layer MoE keys (`moe/layer<i>/...`): what the console shows of a logging step."""
    return logs if logs is None else {key: value for key, value in logs.items() if not is_per_layer_key(key)}


class MoeProgressCallback(ProgressCallback):
    """The Trainer's progress bar; its log lines leave out the per-layer MoE keys (`moe/layer<i>/...`, some 450 for
    30 sparse layers of 8 experts), which still reach `state.log_history` and every `report_to` logger."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=console_logs(logs), **kwargs)


class MoePrinterCallback(PrinterCallback):
    """The Trainer's log printer (`disable_tqdm=True`), without the per-layer MoE keys (see [`MoeProgressCallback`])."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=console_logs(logs), **kwargs)


def _summary_printer(callback: TrainerCallback) -> TrainerCallback:
    """The Trainer's own console printer as its summary-printing subclass; any other callback as it is."""
    if type(callback) is ProgressCallback:
        return MoeProgressCallback(max_str_len=callback.max_str_len)
    if type(callback) is PrinterCallback:
        return MoePrinterCallback()
    return callback


class _MoeLogCallback(TrainerCallback):
    """Adds its keys to the `logs` of `on_log` (seen by every reporter after it, see [`add_moe_callbacks`]) and to
    the `state.log_history` entry the Trainer appended just before.

    Passed to `Trainer(callbacks=[...])` instead, it runs after the `report_to` loggers (the Trainer puts them first):
    `logs` then reaches only the console printer and any callbacks after it, so it gets the summary keys only (no
    per-layer keys on the console), `log_history` every key, and a warning (once per callback) names the loggers
    that miss them. A callback cannot move itself ahead of the loggers: callback events are not handed the Trainer or
    its callback list.
    """

    peers: list = ()  # the trainer's callbacks, set by `add_moe_callbacks` (the heatmap goes to TensorBoard's writer)
    ahead_of_reporters: bool = False  # set by `add_moe_callbacks`
    _warned: bool = False

    def on_train_begin(self, args, state, control, **kwargs):
        if self.ahead_of_reporters or self._warned or not state.is_world_process_zero:
            return
        from transformers.integrations import get_reporting_integration_callbacks

        # The integrations whose callback reads `logs` (CodeCarbon, for one, logs no metrics).
        missing = [name for name in args.report_to or []
                   if get_reporting_integration_callbacks([name])[0].on_log is not TrainerCallback.on_log]
        if missing:
            logger.warning("%s was passed to the Trainer, which runs the report_to loggers (%s) before it: they miss "
                           "its moe/ keys, which reach only state.log_history. Add it with "
                           "`add_moe_callbacks(trainer, callback)` instead.", type(self).__name__, ", ".join(missing))
            self._warned = True

    def _add_to_logs(self, state, logs: dict, values: dict) -> None:
        if state.log_history:
            state.log_history[-1].update(values)
        logs.update(values if self.ahead_of_reporters else console_logs(values))


class ExpertStatsCallback(_MoeLogCallback):
    """Logs MoE statistics at every logging step into `state.log_history` and every `report_to` logger.

    The model's LM loss, load-balancing loss and z-loss (`moe/model_lm_loss`, `moe/model_aux_loss`, `moe/model_z_loss`,
    and `moe/model_sequence_aux_loss` when the model has that term) and `moe/aux_loss`, the model's load-balancing loss
    (see `RouterStatsRecorder`). Per sparse layer and averaged over layers (`moe/...` and `moe/layer<i>/...`): the
    z-loss, the fraction of assignments per expert, imbalance (max/mean and coefficient of variation), MaxVio
    (`max_vio`: max load / mean load - 1 of each optimizer step's global batch, averaged over the steps since the last
    log), router entropy, dropped fraction (capacity), expert activation rate and, for MH-MoE, distinct experts per
    token. Only forwards that train count; loads, entropy and z-loss count real tokens, not padding. At every save and
    evaluation a per-layer x per-expert load heatmap (PNG) is written to the output folder and, with TensorBoard,
    logged as an image.

    Example:
    ```python
    >>> trainer = add_moe_callbacks(Trainer(model=moe, args=args, train_dataset=ds), ExpertStatsCallback())
    ```

    Passed as `Trainer(callbacks=[ExpertStatsCallback()])` instead, its keys reach `log_history` only, not the
    `report_to` loggers (the Trainer runs them first), and it warns once saying so.
    """

    def __init__(self, per_expert: bool = True, heatmap: bool = True):
        self.per_expert = per_expert
        self.heatmap = heatmap
        self.recorder: RouterStatsRecorder | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.recorder is None:
            self.recorder = RouterStatsRecorder(model, only_training=True)
            if not self.recorder.routers:
                logger.warning("ExpertStatsCallback: no MoE router recognised; nothing will be logged")

    def on_train_end(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self._write_heatmap(args, state)  # the whole run, for the model card
            self.recorder.remove()
            self.recorder = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.recorder.end_step()  # the step's load, for its MaxVio

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.recorder is None or logs is None or "loss" not in logs:  # training logs only
            return
        sum_router_stats_over_processes(self.recorder)
        self._add_to_logs(state, logs, self.recorder.summary(per_expert=self.per_expert))
        self.recorder.reset()

    def on_save(self, args, state, control, **kwargs):
        self._write_heatmap(args, state)

    def on_evaluate(self, args, state, control, **kwargs):
        self._write_heatmap(args, state)

    def _write_heatmap(self, args, state) -> Path | None:
        if not self.heatmap or self.recorder is None or not self.recorder.routers or not state.is_world_process_zero:
            return None
        layers, matrix = self.recorder.load_matrix(cumulative=True)
        if matrix.sum() == 0:
            return None
        path = Path(args.output_dir) / "expert_load" / f"expert_load_step{state.global_step}.png"
        image = save_load_heatmap(matrix, layers, path, title=f"expert load up to step {state.global_step}")
        for callback in self.peers:
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:
                writer.add_image("moe/expert_load", image, state.global_step, dataformats="HWC")
                writer.flush()
        return path


_SUMMED_TOTALS = ("calls", "rows", "assignments", "dropped", "entropy", "z_loss", "distinct_experts", "tokens")


def sum_router_stats_over_processes(recorder: RouterStatsRecorder) -> None:
    """Make the recorder's counts since its last reset global: sums over all processes of the default group.

    Under data parallelism each process routes its own shard of the batch; the logged load must be the global one.
    A collective: every process calls it at the same logging step (the Trainer runs `on_log` on all processes; only
    the main process's reporters write). Costs one all-reduce per sparse layer per logging step, and one for the loads
    of the optimizer steps since the last log (each step's MaxVio is that of its global batch).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return
    device = torch.device("cpu")
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    for layer in sorted(recorder.routers):
        totals = recorder.totals[layer]
        loss_terms = [(sum(recorder.loss_terms.get(key, [])), len(recorder.loss_terms.get(key, [])))
                      for key in LOSS_TERMS] if layer == min(recorder.routers) else []
        packed = torch.tensor([*recorder.loads[layer].tolist(), *(totals[key] for key in _SUMMED_TOTALS),
                               *(value for pair in loss_terms for value in pair)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(packed)
        packed = packed.cpu()
        num_experts = recorder.loads[layer].numel()
        global_load = packed[:num_experts].float()
        recorder.cumulative_load[layer] += global_load - recorder.loads[layer]
        recorder.loads[layer] = global_load
        for index, key in enumerate(_SUMMED_TOTALS):
            totals[key] = packed[num_experts + index].item()
        for index, key in enumerate(LOSS_TERMS if loss_terms else ()):
            total, count = packed[num_experts + len(_SUMMED_TOTALS) + 2 * index:][:2].tolist()
            recorder.loss_terms.pop(key, None)
            if count:
                recorder.loss_terms[key] = [total / count]
    _sum_step_loads_over_processes(recorder, device)


def _sum_step_loads_over_processes(recorder: RouterStatsRecorder, device: torch.device) -> None:
    """The per-step loads since the last log, summed over processes in one all-reduce (every process ran the same
    optimizer steps, so the histories line up)."""
    layers = sorted(recorder.routers)
    if not recorder.step_history:
        return
    flat = torch.cat([step.get(layer, torch.zeros(recorder.num_experts[layer])).float()
                      for step in recorder.step_history for layer in layers]).to(device, torch.float64)
    torch.distributed.all_reduce(flat)
    chunks = iter(flat.cpu().float().split([recorder.num_experts[layer] for _ in recorder.step_history
                                            for layer in layers]))
    recorder.step_history = [{layer: next(chunks) for layer in layers} for _ in recorder.step_history]


class NonFiniteGuardCallback(_MoeLogCallback):
    """Skips optimizer steps whose gradients contain NaN or Inf (GLaM: skip such batches) and asks for a rollback
    after `max_consecutive` of them in a row (GLaM: restart from an earlier checkpoint).

    A skipped step changes no weight and no optimizer state: the optimizer's `step` is not run for it. The routers'
    buffers that training forwards update (the expert-choice thresholds and their update counts) are put back to
    their values at the step's start. The other callbacks learn of it through [`optimizer_step_skipped`]
    (`AuxLossFreeBalancingCallback` then moves no selection bias). Skips are counted and logged
    (`moe/nonfinite_skipped_steps`). On the N-th consecutive skip the callback sets `rollback_requested` and stops
    training; [`train_with_rollback`] then resumes from the last checkpoint with a
    reshuffled data order.
    """

    def __init__(self, max_consecutive: int = 3):
        if max_consecutive < 1:
            raise ValueError(f"`max_consecutive`={max_consecutive} is invalid: must be >= 1")
        self.max_consecutive = max_consecutive
        self.skipped_steps = 0
        self.consecutive = 0
        self.rollback_requested = False
        self.rollbacks = 0
        self.router_buffers: list[torch.Tensor] = []
        self.router_buffers_at_step_start: list[torch.Tensor] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # The routers' buffers that training forwards update, found once (the model does not change during training).
        self.router_buffers = [buffer for layer in find_moe_layers(model, warn=False)
                               for buffer in layer.router.buffers()]
        return super().on_train_begin(args, state, control, model=model, **kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        # Once per optimizer step, before its first micro-batch: a handful of (E,) tensors per sparse layer.
        self.router_buffers_at_step_start = [buffer.detach().clone() for buffer in self.router_buffers]

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        finite = all_gradients_finite(model)  # the same on every process: DDP has all-reduced the gradients
        mark_optimizer_step_skipped(state, not finite)
        if finite:
            self.consecutive = 0
            return
        with torch.no_grad():
            for buffer, value in zip(self.router_buffers, self.router_buffers_at_step_start, strict=True):
                buffer.copy_(value)
        self.skipped_steps += 1
        self.consecutive += 1
        logger.warning("non-finite gradients at step %d: optimizer step skipped (%d in a row)",
                       state.global_step + 1, self.consecutive)
        if not args.fp16:  # fp16's GradScaler skips non-finite steps itself (and needs the gradients to do so)
            # The Trainer has no public way to skip its `optimizer.step()`. Torch optimizers leave every parameter
            # whose `.grad` is None alone (no update, no state, no step count), so dropping the gradients makes the
            # coming step a no-op; the learning-rate schedule still advances.
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None
        if self.consecutive >= self.max_consecutive:
            self.rollback_requested = True
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            self._add_to_logs(state, logs, {"moe/nonfinite_skipped_steps": float(self.skipped_steps)})


@torch.no_grad()
def all_gradients_finite(model: torch.nn.Module) -> bool:
    """True when every parameter gradient is finite (one fused norm per device, one host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)).item())
