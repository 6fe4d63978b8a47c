"""The Hub side of hf_moe: model cards for every folder it writes, a folder check, and publishing."""

from ..checkpoints.lineage import Lineage, lineage_of
from .card import render_card, write_card
from .check import FolderCheckError, Problem, check_folder
from .evaluation import merge_eval_results
from .publish import PublishArguments, PublishResult, publish, upload_plan
from .push import install_card_hooks, use_training_card_on_push
from .training import write_training_card
from .upcycled import write_upcycled_card

__all__ = ["render_card", "write_card", "check_folder", "Problem", "FolderCheckError", "merge_eval_results",
           "Lineage", "lineage_of", "publish", "PublishArguments", "PublishResult", "upload_plan",
           "install_card_hooks", "use_training_card_on_push", "write_training_card",
           "write_upcycled_card"]
