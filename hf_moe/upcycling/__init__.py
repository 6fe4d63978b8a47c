"""Upcycling dense Llama-family checkpoints (llama, mistral, qwen2, qwen3) into hf_moe, hf_switch or hf_mh_moe."""

from .sources import SUPPORTED_ARCHITECTURES, UnsupportedCheckpointError, open_dense_checkpoint
from .upcycle import UpcycleArguments, run_upcycle, upcycle
from .verify import verify_upcycling

__all__ = ["upcycle", "run_upcycle", "UpcycleArguments", "verify_upcycling", "open_dense_checkpoint",
           "UnsupportedCheckpointError", "SUPPORTED_ARCHITECTURES"]
