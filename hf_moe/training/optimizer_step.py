"""Tell hf_moe models where each optimizer step of the Trainer starts and how many router tokens it holds.

Global-batch load balancing (`router_aux_loss_scope="global_batch"`) shares the expert counts f_e over the
gradient-accumulation micro-batches of a step, and the aux and z-loss are weighted by each micro-batch's share of the
step's router tokens. The model learns both from `begin_optimizer_step(num_router_tokens)`. The stock Trainer has no
callback event that sees a step's batches, so this callback wraps the one Trainer method that fetches them
(`get_batch_samples`, which also counts `num_items_in_batch` there) on the Trainer instance; pinned by
tests/test_training.py.
"""

import logging

import torch
from transformers import Trainer, TrainerCallback

logger = logging.getLogger(__name__)


def count_router_tokens(batches: list[dict]) -> torch.Tensor:
    """Non-padding input tokens over `batches` (what the routers count): the attention mask's sum, else all ids."""
    total = torch.zeros((), dtype=torch.long)
    for batch in batches:
        mask = batch.get("attention_mask")
        total += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return total


def step_models(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `model` (hf_moe causal LMs, also inside peft wrappers) that take `begin_optimizer_step`."""
    return [module for module in model.modules() if hasattr(module, "begin_optimizer_step")]


class OptimizerStepCallback(TrainerCallback):
    """Marks each optimizer step's start on hf_moe models, with the step's router-token count over all processes.

    Needed for `router_aux_loss_scope="global_batch"` under gradient accumulation, and for the z-loss to be the
    per-router-token mean of the step however it is split into micro-batches and processes. Without it a model
    balances per forward call (still over all data-parallel processes for `global_batch`) and weights its aux terms
    by label tokens.

    Example:
    ```python
    >>> trainer = add_moe_callbacks(Trainer(model=moe, args=args, train_dataset=ds), OptimizerStepCallback())
    ```
    """

    trainer: Trainer | None = None  # set by `add_moe_callbacks` (callback events are not handed the Trainer)

    def __init__(self):
        self._restore = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        models = step_models(model)
        trainer = self.trainer
        if not models or trainer is None:
            if models:
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
            for module in models:
                module.begin_optimizer_step(tokens.item() / tp_size)
            return batch_samples, num_items_in_batch

        trainer.get_batch_samples = get_batch_samples
        self._restore = (trainer, models)

    def on_train_end(self, args, state, control, **kwargs):
        if self._restore is not None:
            trainer, models = self._restore
            del trainer.get_batch_samples  # the instance attribute; the class method shows again
            for module in models:
                module.end_optimizer_steps()
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
