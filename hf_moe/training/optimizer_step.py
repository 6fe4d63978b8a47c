"""The optimizer step of hf_moe models: global-batch load balancing and the aux terms' share of the step.

Global-batch load balancing (`router_aux_loss_scope="global_batch"`) counts the expert frequencies f_e over all
data-parallel processes (one all-reduce of a (layers, E) tensor per training forward) and over the gradient-accumulation
micro-batches of the step seen so far; the aux and z-loss are weighted by each micro-batch's share of the step's router
tokens. That is state across micro-batches and collectives across processes, which the model files (remote code)
leave to the training loop: a model holds one slot, `optimizer_step_hook`, and this module fills it with an
`OptimizerStepRouting`. `OptimizerStepCallback` does so for the Trainer; plain loops call `begin_optimizer_step` /
`end_optimizer_steps`. The stock Trainer has no callback event that sees a step's batches, so the callback wraps the
one Trainer method that fetches them (`get_batch_samples`, which also counts `num_items_in_batch` there) on the
Trainer instance; pinned by tests/test_training.py.
"""

import logging

import torch
from transformers import Trainer, TrainerCallback

logger = logging.getLogger(__name__)


def _sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all processes of the default group (in place) when torch.distributed runs."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


class OptimizerStepRouting:
    """The optimizer-step hook of one hf_moe model (`model.optimizer_step_hook`, see `MoeForCausalLM`).

    Between `begin` and `end`, the micro-batches of a step share their expert counts: they are forwarded and
    backwarded one after another, so micro-batch j can only use the counts of micro-batches 1..j (on all processes):
    the first balances against its own f_e, the last against the exact global one. Waiting for all of them would mean
    keeping every micro-batch's graph alive (the memory of the whole batch). The cost is one (layers, E) buffer and
    one all-reduce of it per training forward. Outside a step f_e is summed over the processes only.
    """

    def __init__(self):
        self.in_step = False
        self.num_router_tokens: int | float | None = None
        self.dispatch_counts: torch.Tensor | None = None

    def begin(self, num_router_tokens: int | float | None = None) -> None:
        """A new step (before its first micro-batch); `num_router_tokens`: see `begin_optimizer_step`."""
        self.in_step, self.num_router_tokens, self.dispatch_counts = True, num_router_tokens, None

    def end(self) -> None:
        """Back to per-forward behaviour: no shared counts, aux terms weighted by label tokens."""
        self.in_step, self.num_router_tokens, self.dispatch_counts = False, None, None

    def dispatch_fraction(self, counts: torch.Tensor) -> torch.Tensor:
        """f_e (layers, E) from this training forward's expert counts `(layers, E)`: summed over the processes and
        the step so far."""
        counts = _sum_over_processes(counts)
        if self.in_step:
            self.dispatch_counts = counts if self.dispatch_counts is None else self.dispatch_counts + counts
            counts = self.dispatch_counts
        return counts / counts.sum(-1, keepdim=True).clamp(min=1)

    def share_of_step(self, router_tokens: torch.Tensor | int) -> torch.Tensor | float | None:
        """This micro-batch's share of the step's router tokens, or None when the step's count is unknown."""
        if not self.num_router_tokens:
            return None
        return router_tokens / self.num_router_tokens


def count_router_tokens(batches: list[dict]) -> torch.Tensor:
    """Non-padding input tokens over `batches` (what the routers count): the attention mask's sum, else all ids."""
    total = torch.zeros((), dtype=torch.long)
    for batch in batches:
        mask = batch.get("attention_mask")
        total += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return total


def step_models(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `model` (hf_moe causal LMs, also inside peft wrappers) that take an optimizer-step hook."""
    return [module for module in model.modules() if hasattr(module, "optimizer_step_hook")]


def install_optimizer_step_routing(model: torch.nn.Module) -> list[OptimizerStepRouting]:
    """Give every hf_moe causal LM in `model` an `OptimizerStepRouting` (keeping one it has); returns them."""
    hooks = []
    for module in step_models(model):
        if module.optimizer_step_hook is None:
            module.optimizer_step_hook = OptimizerStepRouting()
        hooks.append(module.optimizer_step_hook)
    return hooks


def begin_optimizer_step(model: torch.nn.Module, num_router_tokens: int | float | None = None) -> None:
    """Mark the start of an optimizer step (before its first micro-batch) on the hf_moe models in `model`.

    - With `router_aux_loss_scope="global_batch"`, the micro-batches of the step share their expert counts.
    - `num_router_tokens`: the step's non-padding input tokens over all micro-batches and data-parallel processes.
      With it, each micro-batch weights its aux and z-loss by its share of these tokens, so the accumulated z-loss is
      the per-router-token mean of the whole step however it is split. Without it, the share of `num_items_in_batch`
      label tokens is used (equal only when label and input tokens are).

    Example:
    ```python
    >>> begin_optimizer_step(model, num_router_tokens=step_tokens)
    ```
    """
    for hook in install_optimizer_step_routing(model):
        hook.begin(num_router_tokens)


def end_optimizer_steps(model: torch.nn.Module) -> None:
    """Back to per-forward behaviour on the hf_moe models in `model` (e.g. after training); global-batch balancing
    still sums f_e over the processes."""
    for hook in install_optimizer_step_routing(model):
        hook.end()


class OptimizerStepCallback(TrainerCallback):
    """Marks each optimizer step's start on hf_moe models, with the step's router-token count over all processes
    (`begin_optimizer_step`).

    Needed for `router_aux_loss_scope="global_batch"` (the counts over processes and micro-batches), and for the
    z-loss to be the per-router-token mean of the step however it is split into micro-batches and processes. Without
    it a model balances over each forward call's tokens and weights its aux terms by label tokens.

    Example:
    ```python
    >>> trainer = add_moe_callbacks(Trainer(model=moe, args=args, train_dataset=ds), OptimizerStepCallback())
    ```
    """

    trainer: Trainer | None = None  # set by `add_moe_callbacks` (callback events are not handed the Trainer)

    def __init__(self):
        self._restore = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        hooks = install_optimizer_step_routing(model)
        trainer = self.trainer
        if not hooks or trainer is None:
            if hooks:
                logger.warning("OptimizerStepCallback was not added with `add_moe_callbacks(trainer, ...)`: it does "
                               "not know the Trainer, so optimizer steps are not marked")
            return
        fetch = trainer.get_batch_samples

        def get_batch_samples(epoch_iterator, num_batches, device):
            batch_samples, num_items_in_batch = fetch(epoch_iterator, num_batches, device)
            tokens = count_router_tokens(batch_samples).to(device)
            if args.world_size > 1:
                tokens = trainer.accelerator.gather(tokens).sum()
            # Tensor-parallel ranks see the same batch: count it once, as the Trainer does for num_items_in_batch.
            tp_size = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
            for hook in hooks:
                hook.begin(tokens.item() / tp_size)
            return batch_samples, num_items_in_batch

        trainer.get_batch_samples = get_batch_samples
        self._restore = (trainer, hooks)

    def on_train_end(self, args, state, control, **kwargs):
        if self._restore is not None:
            trainer, hooks = self._restore
            del trainer.get_batch_samples  # the instance attribute; the class method shows again
            for hook in hooks:
                hook.end()
            self._restore = None


# The TrainerState attribute in which NonFiniteGuardCallback marks whether it skipped the current optimizer step. The
# state is the one object every callback event gets (callbacks are not handed each other); it is not a dataclass
# field, so it is not saved with the checkpoint's trainer_state.json.
_STEP_SKIPPED = "moe_optimizer_step_skipped"


def optimizer_step_skipped(state) -> bool:
    """Whether [`NonFiniteGuardCallback`] skipped the current optimizer step (non-finite gradients): a callback that
    moves training state at the end of a step (the selection biases, ...) must leave it alone then.

    The guard decides in `on_pre_optimizer_step`, which the Trainer runs for every callback before any callback's
    `on_optimizer_step` or `on_step_end`: read it there, and the order of the callbacks does not matter. False
    without a guard.
    """
    return getattr(state, _STEP_SKIPPED, False)


def mark_optimizer_step_skipped(state, skipped: bool) -> None:
    """Set what [`optimizer_step_skipped`] reads (NonFiniteGuardCallback, in `on_pre_optimizer_step`)."""
    setattr(state, _STEP_SKIPPED, skipped)
