"""Freezing parts of the sparse blocks (FLAN-MoE's ablations: Freeze-Gate, Freeze-Expert, Freeze-MoE)."""

from torch import nn

FREEZE_TARGETS = ("router", "experts", "moe")


def freeze_moe(model: nn.Module, target: str) -> int:
    """Set `requires_grad=False` on the routers (`mlp.gate`), the experts (`mlp.experts` and shared experts), or
    both (`"moe"`); returns the number of frozen parameters (elements). The Trainer's optimizer then leaves them out.

    Example:
    ```python
    >>> freeze_moe(model, "router")   # FLAN-MoE's Freeze-Gate: slightly better instruction tuning
    ```
    """
    if target not in FREEZE_TARGETS:
        raise ValueError(f"`target`={target!r} is invalid: choose one of {FREEZE_TARGETS}")
    patterns = {"router": (".mlp.gate.",), "experts": (".mlp.experts.", ".mlp.shared_experts.")}
    wanted = patterns["router"] + patterns["experts"] if target == "moe" else patterns[target]
    frozen = 0
    for name, parameter in model.named_parameters():
        if any(pattern in f".{name}" for pattern in wanted):
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    if frozen == 0:
        raise ValueError(f"freeze_moe({target!r}) matched no parameter: is this an hf_moe model?")
    return frozen
