"""Upcycling dense Llama-family checkpoints (llama, mistral, qwen2, qwen3) into hf_moe, hf_switch or hf_mh_moe."""

from ..errors import UnsupportedCheckpointError
from .arguments import UpcycleArguments
from .sources import SUPPORTED_ARCHITECTURES, open_dense_checkpoint
from .upcycle import run_upcycle, upcycle
from .verify import verify_upcycling

__all__ = ["upcycle", "run_upcycle", "UpcycleArguments", "verify_upcycling", "open_dense_checkpoint",
           "UnsupportedCheckpointError", "SUPPORTED_ARCHITECTURES"]
