"""Freezing parts of the sparse blocks (FLAN-MoE's ablations: Freeze-Gate, Freeze-Expert, Freeze-MoE)."""

from torch import nn

from ..moe_layers import MOE_PARTS, model_type, moe_module_names

FREEZE_TARGETS = MOE_PARTS


def freeze_moe(model: nn.Module, target: str) -> int:
    """Set `requires_grad=False` on the routers, the experts (routed and shared), or both (`"moe"`) of every sparse
    block of any MoE model [`find_moe_layers`] recognises; returns the number of frozen parameters (elements). The
    Trainer's optimizer then leaves them out.

    Example:
    ```python
    >>> freeze_moe(model, "router")   # FLAN-MoE's Freeze-Gate: slightly better instruction tuning
    ```
    """
    if target not in FREEZE_TARGETS:
        raise ValueError(f"`target`={target!r} is invalid: choose one of {FREEZE_TARGETS}")
    frozen = 0
    for name in moe_module_names(model, target):
        for parameter in model.get_submodule(name).parameters():
            if parameter.requires_grad:
                parameter.requires_grad_(False)
                frozen += parameter.numel()
    if frozen == 0:
        raise ValueError(f"freeze_moe({target!r}) matched no parameter: {type(model).__name__} "
                         f"(model_type={model_type(model)!r}) has no recognisable MoE router")
    return frozen
