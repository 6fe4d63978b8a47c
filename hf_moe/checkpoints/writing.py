"""Writing a model folder, the one way every hf_moe output is written (upcycled, mixed, exported).

Staging folder → sharded safetensors streamed in → tensor names checked against the target model → config (and, for
hf_moe types, the code files) → tokenizer and generation config → the card and any extra files (`finish`) →
atomic rename. An existing output raises `OutputExistsError` before anything is read or written.
"""

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from transformers import GenerationConfig

from ..errors import UnsupportedCheckpointError
from .atomic import atomic_output_dir
from .names import CODE_PATHS, HF_MOE_MODEL_TYPES, TOKENIZER_FILES, expected_tensor_names, meta_model
from .safetensors_writer import ShardedSafetensorsWriter, parse_size


def check_complete(names: set[str], model, source_name: str) -> None:
    """Raise if the tensor names `names` differ from those a saved `model` (its meta-device instance) holds."""
    expected = expected_tensor_names(model)
    if names != expected:
        raise UnsupportedCheckpointError(
            f"{source_name}: the checkpoint does not match its config; missing tensors: "
            f"{sorted(expected - names)[:8]}, unexpected tensors: {sorted(names - expected)[:8]}"
        )


def save_config_and_code(config, folder: Path) -> None:
    """config.json; for an hf_moe type also the `auto_map` of every Auto class, `architectures` and the code files
    (`CODE_PATHS`), so the folder loads as remote code."""
    if config.model_type in HF_MOE_MODEL_TYPES:
        from ..modeling import MODEL_CLASSES
        from ..modeling.modeling_hf_moe import auto_map_for

        config.auto_map = auto_map_for(type(config))
        config.architectures = [MODEL_CLASSES[type(config)]["AutoModelForCausalLM"].__name__]
    config.save_pretrained(folder)  # an hf_moe config also copies configuration_hf_moe.py (its _auto_class)
    if config.model_type in HF_MOE_MODEL_TYPES:
        for path in CODE_PATHS:
            shutil.copy2(path, folder / path.name)


def copy_tokenizer_and_generation_config(folder: Path, *, tokenizer_folder: Path | None = None, tokenizer=None,
                                         generation_config_from=None) -> None:
    """The tokenizer (a `tokenizer` object, saved, or the tokenizer files of `tokenizer_folder`, copied) and a
    generation config (copied with the tokenizer files, else made from `generation_config_from`, a model config)."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    elif tokenizer_folder is not None:
        for file_name in TOKENIZER_FILES:
            if (tokenizer_folder / file_name).is_file():
                shutil.copy2(tokenizer_folder / file_name, folder / file_name)
    if generation_config_from is not None and not (folder / "generation_config.json").is_file():
        GenerationConfig.from_model_config(generation_config_from).save_pretrained(folder)


def write_model_folder(output_dir: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], config, *,
                       source_name: str, overwrite: bool = False, max_shard_size: str | int = "2GB",
                       check_names: bool = True, tokenizer_folder: Path | None = None, tokenizer=None,
                       generation_config_from=None,
                       finish: Callable[[Path, torch.nn.Module], None] | None = None) -> Path:
    """Write `tensors` (a stream of `(name, tensor)`, held one shard at a time) as the model folder `output_dir` of
    `config`, atomically.

    `check_names`: the tensors must be exactly those of `config`'s model (off when the names on disk follow another
    layout, e.g. an export's per-expert tensors). `config.dtype` becomes the weights' dtype (the floating-point dtype
    holding most elements). `finish(staging, model)` runs last, before the rename, with the meta-device model (e.g. to
    render the card); anything it raises leaves nothing behind. Returns `output_dir`.

    Example:
    ```python
    >>> write_model_folder("out/x", model.state_dict().items(), model.config, source_name="in memory")
    ```
    """
    output_dir = Path(output_dir)
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        writer = ShardedSafetensorsWriter(staging, parse_size(max_shard_size))
        for name, tensor in tensors:
            writer.add(name, tensor)
        model = meta_model(config)
        if check_names:
            check_complete(writer.names, model, source_name)
        writer.finish()
        if writer.weights_dtype is not None:
            config.dtype = str(writer.weights_dtype).removeprefix("torch.")
        save_config_and_code(config, staging)
        copy_tokenizer_and_generation_config(staging, tokenizer_folder=tokenizer_folder, tokenizer=tokenizer,
                                             generation_config_from=generation_config_from)
        if finish is not None:
            finish(staging, model)
    return output_dir
