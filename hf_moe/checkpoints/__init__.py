"""How any model folder is read and written: sources (local, Hub cache, GGUF), the atomic folder writer, the names
on disk, and the one model comparison. Used by upcycling, export and the recipes; imports none of them."""

from .atomic import atomic_output_dir
from .compare import SAMPLE_PROMPTS, chat_prompt_ids, compare_models, compare_outputs, model_outputs
from .lineage import hub_id
from .names import HF_MOE_MODEL_TYPES, meta_model
from .reading import DenseCheckpoint, read_weight_map, resolve_folder, stream_tensors
from .safetensors_writer import ShardedSafetensorsWriter, parse_size
from .writing import check_complete, write_model_folder

__all__ = ["atomic_output_dir", "write_model_folder", "check_complete", "ShardedSafetensorsWriter", "parse_size",
           "DenseCheckpoint", "resolve_folder", "read_weight_map", "stream_tensors", "HF_MOE_MODEL_TYPES",
           "hub_id", "meta_model", "SAMPLE_PROMPTS", "chat_prompt_ids", "compare_models", "compare_outputs",
           "model_outputs"]
