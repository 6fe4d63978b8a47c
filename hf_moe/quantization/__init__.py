"""Quantised loading (bitsandbytes 4-bit experts) and LoRA on experts (peft `target_parameters`)."""

from .experts import (
    dequantize_experts,
    expert_parameters,
    find_fused_experts,
    quantize_experts,
    unquantized_expert_parameters,
)
from .memory import resident_weight_bytes
from .quantizer import fits_cpu_kernel, keep_cpu_kernel_to_supported_layers, register_experts_quantizers

__all__ = [
    "quantize_experts", "dequantize_experts", "find_fused_experts", "expert_parameters",
    "unquantized_expert_parameters", "resident_weight_bytes", "register_experts_quantizers",
    "fits_cpu_kernel", "keep_cpu_kernel_to_supported_layers",
]
