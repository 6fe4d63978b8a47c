"""Resident weight memory, counting what quantised tensors really hold."""

import torch
from torch import nn


def _quant_state_tensors(quant_state) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes QuantState (block scales, code book, nested statistics)."""
    if quant_state is None:
        return []
    tensors = [getattr(quant_state, name, None) for name in ("absmax", "code", "offset")]
    tensors += _quant_state_tensors(getattr(quant_state, "state2", None))
    return [tensor for tensor in tensors if isinstance(tensor, torch.Tensor)]


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (tied tensors once) plus bitsandbytes' quantisation statistics.

    `PreTrainedModel.get_memory_footprint` counts parameters and buffers only, so it misses the block scales that
    bitsandbytes keeps beside each 4-bit tensor (in `Params4bit.quant_state` and in the experts' parametrizations).
    """
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            tensors += _quant_state_tensors(getattr(parameter, "quant_state", None))
        for parametrizations in getattr(module, "parametrizations", {}).values():
            for parametrization in parametrizations:
                tensors += _quant_state_tensors(getattr(parametrization, "quant_state", None))
    seen, total = set(), 0
    for tensor in tensors:
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total
