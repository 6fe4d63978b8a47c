"""Training with the non-finite guard's rollback: resume from the last checkpoint with a reshuffled data order."""

import logging

from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from .callbacks import NonFiniteGuardCallback

logger = logging.getLogger(__name__)


def train_with_rollback(trainer: Trainer, resume_from_checkpoint=None, max_rollbacks: int = 3):
    """`trainer.train()`, restarted from the last checkpoint whenever a [`NonFiniteGuardCallback`] asks for it.

    Each restart changes `args.data_seed`, so the resumed run sees the remaining data in a new order (GLaM restarts
    from an earlier checkpoint when training diverges). Returns the last `TrainOutput`; the number of rollbacks is
    in `trainer.state.rollbacks`... and in `guard.rollbacks`.
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
        # The seedable train sampler reads its seed from the accelerator's dataloader config.
        trainer.accelerator.dataloader_config.data_seed = trainer.args.data_seed
        logger.warning("rollback %d: resuming from %s with data_seed %d", rollbacks, checkpoint,
                       trainer.args.data_seed)
        result = trainer.train(resume_from_checkpoint=checkpoint)
        guard.rollbacks = rollbacks
    return result
