"""Fused 3-D experts in 4-bit with bitsandbytes' parameter-level quantisation.

transformers' bitsandbytes integration swaps only `nn.Linear` layers, so the fused expert tensors
(`experts.gate_up_proj (E, 2I, H)`, `experts.down_proj (E, H, I)`), most of an MoE's parameters, stay in full
precision (bitsandbytes issue 1849). bitsandbytes 0.50 can quantise a bare `nn.Parameter`
(`bitsandbytes.nn.parametrize.replace_parameter_4bit`): the tensor is stored packed (two 4-bit codes per byte plus one
absmax per block) and dequantised on access, so every experts backend (eager, `batched_mm`, `grouped_mm`) and peft's
`target_parameters` keep working unchanged. They are dequantised in the compute dtype on every device: bitsandbytes'
fused CPU kernel (AVX512-BF16) is for `Linear4bit` only and never repacks them. Routers (`nn.Parameter`, not
`nn.Linear`) and norms are never touched: they stay in the load dtype (selective precision, Switch Transformer
Sec. 2.4).
"""

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..moe_layers import find_moe_layers

logger = logging.getLogger(__name__)

EXPERT_PARAMETER_NAMES = ("gate_up_proj", "up_proj", "down_proj")


def find_fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified module name: experts module} for every sparse block (`hf_moe.moe_layers`) whose experts are fused
    3-D tensors: a 3-D `gate_up_proj` (or `up_proj`) and `down_proj`, already quantised or not (transformers' layout:
    Mixtral, Qwen-MoE, OLMoE, ... and hf_moe). Inside a peft model the wrapped module is returned under its name in
    the base model.
    """
    modules = dict(model.named_modules())
    experts = {}
    for layer in find_moe_layers(model):
        module = modules.get(layer.experts_name) if layer.experts_name else None
        while type(module).__name__ == "ParamWrapper":  # peft's wrapper(s) around an experts module
            module = module.base_layer
        if module is None:
            continue
        tensors = [_expert_tensor(module, parameter) for parameter in EXPERT_PARAMETER_NAMES]
        shapes = [tensor.dim() for tensor in tensors if tensor is not None]
        if len(shapes) >= 2 and all(ndim == 3 for ndim in shapes):
            experts[unwrapped_name(layer.experts_name)] = module
    return experts


def _expert_tensor(module: nn.Module, parameter_name: str) -> torch.Tensor | None:
    """The expert tensor as the forward sees it (dequantised if quantised), or None."""
    if parametrize.is_parametrized(module, parameter_name):
        original = module.parametrizations[parameter_name].original
        quant_state = _quant_state(module, parameter_name)
        return torch.empty(quant_state.shape, device="meta") if quant_state is not None else original
    return dict(module.named_parameters(recurse=False)).get(parameter_name)


def unwrapped_name(name: str) -> str:
    """A module's name inside a peft model -> its name in the base model."""
    parts = [part for part in name.split(".") if part != "base_layer"]
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    return ".".join(parts)


def _quant_state(module: nn.Module, parameter_name: str):
    """bitsandbytes' QuantState of a parameter quantised with `replace_parameter_4bit`, or None."""
    if not parametrize.is_parametrized(module, parameter_name):
        return None
    for parametrization in module.parametrizations[parameter_name]:
        if type(parametrization).__name__ == "Bnb4bitParametrization":
            return parametrization.quant_state
    return None


def is_quantized_expert(module: nn.Module, parameter_name: str) -> bool:
    return _quant_state(module, parameter_name) is not None


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(qualified parameter name, experts module, parameter name) for every fused expert tensor of `model`."""
    return [(f"{name}.{parameter}", module, parameter)
            for name, module in find_fused_experts(model).items()
            for parameter in EXPERT_PARAMETER_NAMES if _expert_tensor(module, parameter) is not None]


def unquantized_expert_parameters(model: nn.Module) -> list[str]:
    """Qualified names of the fused expert tensors that are still in full precision."""
    return [name for name, module, parameter in expert_parameters(model) if not is_quantized_expert(module, parameter)]


def quantize_experts(model: nn.Module, quantization_config, skip_modules=()) -> list[str]:
    """Quantise every fused expert tensor of a loaded `model` as `quantization_config` (a `BitsAndBytesConfig`)
    asks, in place; returns the qualified names of the quantised tensors.

    4-bit (`load_in_4bit=True`): NF4 or FP4 (`bnb_4bit_quant_type`), double quantisation of the block scales
    (`bnb_4bit_use_double_quant`). 8-bit: bitsandbytes has no parameter-level 8-bit quantisation, so the experts stay
    in full precision. Any expert tensor left in full precision (8-bit, or a module listed in `skip_modules` /
    `llm_int8_skip_modules`) is named in a warning. `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`
    calls this for hf_moe models (see `hf_moe.quantization.quantizer`); call it yourself for other fused-expert
    models.

    Example:
    ```python
    >>> from transformers import BitsAndBytesConfig
    >>> quantize_experts(model, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    ['model.layers.0.mlp.experts.gate_up_proj', 'model.layers.0.mlp.experts.down_proj', ...]
    ```
    """
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    from .peft_compat import patch_peft_for_parametrized_parameters

    skip_modules = tuple(skip_modules) + tuple(getattr(quantization_config, "llm_int8_skip_modules", None) or ())
    quantized = []
    if quantization_config.load_in_4bit:
        for name, module, parameter in expert_parameters(model):
            if is_quantized_expert(module, parameter) or any(skip in name for skip in skip_modules):
                continue
            replace_parameter_4bit(module, parameter, quant_type=quantization_config.bnb_4bit_quant_type,
                                   compress_statistics=quantization_config.bnb_4bit_use_double_quant)
            quantized.append(name)
        if quantized:
            patch_peft_for_parametrized_parameters()
    left = unquantized_expert_parameters(model)
    if left:
        reason = ("bitsandbytes has no parameter-level 8-bit quantisation (only 4-bit: use load_in_4bit=True)"
                  if quantization_config.load_in_8bit else "skipped by llm_int8_skip_modules")
        logger.warning("%d expert tensors stay in full precision under the quantisation config (%s): %s",
                       len(left), reason, ", ".join(left))
    return quantized


def dequantize_experts(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Undo `quantize_experts`: each quantised expert tensor becomes a plain parameter holding its dequantised
    values (in `dtype` if given); returns how many were dequantised."""
    count = 0
    for _, module, parameter in expert_parameters(model):
        if is_quantized_expert(module, parameter):
            with torch.no_grad():
                values = getattr(module, parameter)
            parametrize.remove_parametrizations(module, parameter, leave_parametrized=False)
            setattr(module, parameter, nn.Parameter(values.to(dtype or values.dtype), requires_grad=False))
            count += 1
    return count
