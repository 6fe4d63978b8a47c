"""Training with the non-finite guard's rollback: resume from the last checkpoint with a reshuffled data order."""

import logging

import torch
from torch.utils.data import Dataset, Subset
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from .callbacks import NonFiniteGuardCallback

logger = logging.getLogger(__name__)


def train_with_rollback(trainer: Trainer, resume_from_checkpoint=None, max_rollbacks: int = 3):
    """`trainer.train()`, restarted from the last checkpoint whenever a [`NonFiniteGuardCallback`] asks for it.

    Each restart changes `args.data_seed`, so the resumed run sees the remaining data in a new order (GLaM restarts
    from an earlier checkpoint when training diverges). Returns the last `TrainOutput`; the number of rollbacks is
    in `guard.rollbacks`.
    """
    guard = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NonFiniteGuardCallback)), None)
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    rollbacks = 0
    while guard is not None and guard.rollback_requested:
        checkpoint = get_last_checkpoint(trainer.args.output_dir)
        if checkpoint is None:
            raise RuntimeError("training diverged (non-finite gradients) and there is no checkpoint to roll back to")
        if rollbacks == max_rollbacks:
            raise RuntimeError(f"training diverged again after {max_rollbacks} rollbacks; giving up")
        rollbacks += 1
        guard.rollback_requested, guard.consecutive = False, 0
        trainer.args.data_seed = (trainer.args.data_seed or trainer.args.seed) + 1
        # The Trainer's sampler keeps the seed its accelerator was built with (no public way to reseed it), so the
        # dataset itself is permuted: the resumed run skips the batches already seen in this epoch, as positions of
        # the sampler's order, and then reads the remaining positions in a new order.
        trainer.train_dataset = reshuffled(trainer.train_dataset, trainer.args.data_seed)
        logger.warning("rollback %d: resuming from %s with data_seed %d", rollbacks, checkpoint,
                       trainer.args.data_seed)
        result = trainer.train(resume_from_checkpoint=checkpoint)
        guard.rollbacks = rollbacks
    return result


def reshuffled(dataset: Dataset, seed: int) -> Dataset:
    """`dataset` in a new order drawn from `seed` (a `datasets.Dataset` stays one)."""
    if hasattr(dataset, "shuffle") and hasattr(dataset, "column_names"):
        return dataset.shuffle(seed=seed)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order)
