"""Export hf_moe models to native Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints that stock transformers (and the
engines that serve those architectures) load without remote code; refuse, naming the reason, where none is exact."""

from .base import Blocker, ExportRefusedError, ExportTarget
from .export import TARGETS, ExportArguments, choose_target, export, run_export
from .verify import load_natively, verify_export

__all__ = ["export", "run_export", "ExportArguments", "ExportRefusedError", "ExportTarget", "Blocker", "TARGETS",
           "choose_target", "verify_export", "load_natively"]
