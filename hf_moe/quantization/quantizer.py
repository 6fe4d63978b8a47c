"""`from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` that quantises the experts of hf_moe models.

transformers picks its bitsandbytes quantizer from `AUTO_QUANTIZER_MAPPING` by `quant_method`; `import hf_moe`
replaces the two bitsandbytes entries with subclasses that, after the stock weight loading (attention, shared experts
and MH-MoE projections become `Linear4bit`/`Linear8bitLt`), also quantise the fused experts of hf_moe model types
with `quantize_experts`. Models of other types load exactly as with stock transformers.
"""

import logging

from transformers.quantizers import auto as quantizers_auto
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

from .experts import dequantize_experts, quantize_experts

logger = logging.getLogger(__name__)

HF_MOE_MODEL_TYPES = ("hf_moe", "hf_switch", "hf_mh_moe")


def _is_hf_moe(model) -> bool:
    return getattr(model.config, "model_type", None) in HF_MOE_MODEL_TYPES


class _ExpertsQuantizerMixin:
    """The stock bitsandbytes quantizer plus the fused experts of hf_moe models."""

    def _process_model_after_weight_loading(self, model, **kwargs):
        model = super()._process_model_after_weight_loading(model, **kwargs)
        if _is_hf_moe(model) and not self.pre_quantized:
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
        dequantize_experts(model, dtype)
        return super()._dequantize(model, dtype=dtype)


class Bnb4BitExpertsHfQuantizer(_ExpertsQuantizerMixin, Bnb4BitHfQuantizer):
    pass


class Bnb8BitExpertsHfQuantizer(_ExpertsQuantizerMixin, Bnb8BitHfQuantizer):
    pass


def register_experts_quantizers() -> None:
    """Make transformers' bitsandbytes configs use the experts-aware quantizers (run by `import hf_moe`)."""
    quantizers_auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"] = Bnb4BitExpertsHfQuantizer
    quantizers_auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_8bit"] = Bnb8BitExpertsHfQuantizer
