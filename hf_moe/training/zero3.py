"""DeepSpeed ZeRO-3 for MoE: the sparse blocks as ZeRO-3 leaf modules.

ZeRO-3 gathers each submodule's parameters when its forward hook fires and expects the same modules every step.
A sparse block calls only the experts its tokens chose, so inside it the set of modules that run varies from step to
step; marked as a leaf, the whole block (router and every expert tensor) is gathered at once, which is what
DeepSpeed's MoE guidance (and Mixtral's `deepspeed_moe_layer_cls_names` setting in accelerate) asks for.
"""

import logging

from torch import nn
from transformers import Trainer

from ..moe_layers import find_moe_layers

logger = logging.getLogger(__name__)


def sparse_block_classes(model: nn.Module) -> list[type[nn.Module]]:
    """The module classes holding a router (the parent of each router found by `hf_moe.moe_layers`)."""
    classes = []
    for layer in find_moe_layers(model):
        block = model.get_submodule(layer.block_name)
        if type(block) not in classes:
            classes.append(type(block))
    return classes


def set_zero3_leaf_sparse_blocks(trainer: Trainer) -> list[str]:
    """Under DeepSpeed ZeRO-3 (a Trainer whose accelerate plugin has `zero_stage: 3`), make the sparse blocks of
    `trainer.model` ZeRO-3 leaf modules; returns the class names marked (none without ZeRO-3). `add_moe_callbacks`
    calls this, so `hf-moe finetune` and the TRL trainers need no `deepspeed_moe_layer_cls_names` in the config."""
    state = getattr(getattr(trainer, "accelerator", None), "state", None)
    plugin = getattr(state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        return []
    from deepspeed.utils import set_z3_leaf_modules

    classes = sparse_block_classes(trainer.model)
    if classes:
        set_z3_leaf_modules(trainer.model, classes)
        logger.info("ZeRO-3 leaf modules: %s", ", ".join(cls.__name__ for cls in classes))
    return [cls.__name__ for cls in classes]
