"""Instruction data: the embedded FLAN-style task mixture and conversion of user datasets to chat messages."""

from .mixture import HELD_IN_FAMILIES, HELD_OUT_FAMILIES, build_mixture
from .sft import load_instruction_dataset, tokenize_for_sft

__all__ = ["build_mixture", "HELD_IN_FAMILIES", "HELD_OUT_FAMILIES", "load_instruction_dataset", "tokenize_for_sft"]
