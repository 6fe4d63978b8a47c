"""`from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` that quantises the experts of hf_moe models.

transformers picks its bitsandbytes quantizer from `AUTO_QUANTIZER_MAPPING` by `quant_method`; `import hf_moe`
replaces the two bitsandbytes entries with subclasses that, after the stock weight loading (attention, shared experts
and MH-MoE projections become `Linear4bit`/`Linear8bitLt`), finish hf_moe model types: their fused experts are
quantised with `quantize_experts`, and their `Linear4bit` layers that bitsandbytes' fused CPU kernel cannot take keep
to the generic CPU path (`keep_cpu_kernel_to_supported_layers`). Models of other types load exactly as with stock
transformers (`tests/test_quantization.py` compares them in fresh processes).

Importing this module does not import bitsandbytes (neither do transformers' quantizer modules it subclasses):
bitsandbytes is imported where a model is quantised, so `import hf_moe` stays quiet and cheap.
"""

import logging

from torch import nn
from transformers.quantizers import auto as quantizers_auto
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

from ..checkpoints.names import HF_MOE_MODEL_TYPES
from .experts import dequantize_experts, quantize_experts

logger = logging.getLogger(__name__)

# bitsandbytes 0.50 `_convert_weight_packed_for_cpu(block_n=32)`: the fused CPU kernel works on tiles of 32 output rows.
CPU_KERNEL_ROW_TILE = 32


def _is_hf_moe(model) -> bool:
    return getattr(model.config, "model_type", None) in HF_MOE_MODEL_TYPES


def fits_cpu_kernel(layer: nn.Module) -> bool:
    """Whether bitsandbytes can repack this quantised `Linear4bit` for its fused CPU kernel (AVX512-BF16).

    On such CPUs bitsandbytes 0.50 repacks every `Linear4bit` at its first eval forward without gradients, and the
    repacking only works when `out_features` is a multiple of 32 and `in_features` a multiple of the quantisation
    block size (64): it reshapes the block scales to (out_features, in_features / blocksize). For other layers it
    raises "shape '[32, 0]' is invalid for input of size 16" (a 32 x 32 layer) or "N must be divisible by block_n".
    """
    quant_state = getattr(layer.weight, "quant_state", None)
    blocksize = quant_state.blocksize if quant_state is not None else layer.weight.blocksize
    return layer.out_features % CPU_KERNEL_ROW_TILE == 0 and layer.in_features % blocksize == 0


def keep_cpu_kernel_to_supported_layers(model: nn.Module) -> list[str]:
    """Send the `Linear4bit` layers of `model` that `fits_cpu_kernel` rejects to bitsandbytes' generic CPU path
    (dequantise, then matmul), so that eval forwards on AVX512-BF16 CPUs do not fail on them; returns their names.

    Only tiny models have such layers (e.g. `hidden_size` 32, or 16 key/value features); layers that fit keep the
    fused kernel. `from_pretrained` runs this for hf_moe models; call it yourself for other models. bitsandbytes has no
    public switch for the path; `Linear4bit.support_avx512bf16_for_cpu` (set from `has_avx512bf16()` in its
    constructor) is the attribute its forward reads.

    Example:
    ```python
    >>> model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    >>> keep_cpu_kernel_to_supported_layers(model)  # e.g. a stock model with hidden_size 32
    ['model.layers.0.self_attn.q_proj', ...]
    ```
    """
    from bitsandbytes.nn import Linear4bit

    unsupported = []
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit) and not fits_cpu_kernel(module):
            module.support_avx512bf16_for_cpu = False
            unsupported.append(name)
    if unsupported:
        logger.info("%d Linear4bit layers use bitsandbytes' generic CPU path (the fused CPU kernel needs "
                    "out_features %% %d == 0 and in_features %% blocksize == 0): %s",
                    len(unsupported), CPU_KERNEL_ROW_TILE, ", ".join(unsupported))
    return unsupported


class _ExpertsQuantizerMixin:
    """The stock bitsandbytes quantizer, plus (for hf_moe model types only) the fused experts and the CPU kernel
    guard. Any other model loads as with the stock quantizer."""

    def _process_model_after_weight_loading(self, model, **kwargs):
        model = super()._process_model_after_weight_loading(model, **kwargs)
        if _is_hf_moe(model):
            if self.quantization_config.load_in_4bit:
                keep_cpu_kernel_to_supported_layers(model)
            if not self.pre_quantized:
                skip_modules = self.modules_to_not_convert or ()
                self._quantized_experts = bool(quantize_experts(model, self.quantization_config, skip_modules))
        return model

    def is_serializable(self):
        # The packed experts would save, but nothing reloads them into a 3-D parameter; save adapters (QLoRA) or
        # reload without quantization_config and save the full-precision model instead.
        if getattr(self, "_quantized_experts", False):
            logger.warning("hf_moe: a model with 4-bit experts cannot be saved (nothing reloads packed 3-D experts); "
                           "save LoRA adapters, or load without quantization_config and save in full precision")
            return False
        return super().is_serializable()

    def _dequantize(self, model, dtype=None):
        dequantize_experts(model, dtype)  # a no-op unless `quantize_experts` ran (on an hf_moe model or by hand)
        return super()._dequantize(model, dtype=dtype)


class Bnb4BitExpertsHfQuantizer(_ExpertsQuantizerMixin, Bnb4BitHfQuantizer):
    pass


class Bnb8BitExpertsHfQuantizer(_ExpertsQuantizerMixin, Bnb8BitHfQuantizer):
    pass


def use_generic_cpu_path_for_training(model: nn.Module) -> list[str]:
    """Keep every `Linear4bit` of a model about to be trained on bitsandbytes' generic CPU path; returns their names.

    On AVX512-BF16 CPUs bitsandbytes 0.50 repacks a `Linear4bit` for its fused kernel at the first eval forward
    without gradients, and later training forwards run that kernel, which has no backward: no gradient would flow
    through the frozen 4-bit layers to the LoRA adapters before them after the Trainer's first evaluation. The generic
    path (dequantise, then matmul) has a backward. No-op on other CPUs (they never take the fused kernel).
    """
    from bitsandbytes.nn import Linear4bit

    names = []
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            names.append(name)
    return names


def register_experts_quantizers() -> None:
    """Make transformers' bitsandbytes configs use the experts-aware quantizers (run by `import hf_moe`).

    transformers' public `register_quantizer` refuses names that are taken, so the two bitsandbytes entries of
    `AUTO_QUANTIZER_MAPPING` (transformers 5.x) are replaced directly. Neither import pulls in bitsandbytes.
    """
    quantizers_auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"] = Bnb4BitExpertsHfQuantizer
    quantizers_auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_8bit"] = Bnb8BitExpertsHfQuantizer
