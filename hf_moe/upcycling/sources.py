"""Which dense checkpoints can be upcycled (Llama-family SwiGLU decoders), and opening one for streaming."""

from pathlib import Path

from transformers import PreTrainedConfig

from ..checkpoints.reading import (
    EMBEDDED_NAME,
    DenseCheckpoint,
    embedded_gguf_path,
    open_gguf,
    open_model_folder,
)
from ..errors import UnsupportedCheckpointError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def _check_model_type(model_type: str | None, source: str) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedCheckpointError(
            f"{source}: architecture '{model_type}' is not supported for upcycling; supported dense Llama-family "
            f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def check_supported(config: PreTrainedConfig, source: str) -> None:
    """Raise `UnsupportedCheckpointError` naming what was found and what is supported."""
    _check_model_type(getattr(config, "model_type", None), source)
    if getattr(config, "mlp_bias", False):
        raise UnsupportedCheckpointError(f"{source}: MLPs with bias (`mlp_bias=True`) are not supported")
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish", "gelu", "gelu_pytorch_tanh"):
        raise UnsupportedCheckpointError(f"{source}: activation '{config.hidden_act}' is not a SwiGLU/GeGLU MLP")


def open_dense_checkpoint(source: str | None, gguf_file: str | None = None) -> DenseCheckpoint:
    """Open `source`: a local folder (safetensors, sharded or not), a `.gguf` file, a folder plus `gguf_file`, a Hub
    id (downloaded with `huggingface_hub`), or `None` for the embedded SmolLM2-135M-Instruct GGUF.

    Unsupported architectures and unreadable files raise `UnsupportedCheckpointError` before anything is written.
    """
    if source is None:
        return open_gguf(embedded_gguf_path(), EMBEDDED_NAME, check_supported)
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        return open_gguf(path, path.stem, check_supported)
    if gguf_file is not None:
        return open_gguf(path / gguf_file, str(source), check_supported)
    folder = open_model_folder(source)
    _check_model_type(folder.model_type, str(source))
    check_supported(folder.config, str(source))
    return DenseCheckpoint(config=folder.config, name=str(source), folder=folder.path, weight_files=folder.weight_files)
