"""`check_folder`: is a model folder ready for the Hub? One clear line per problem."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from transformers.dynamic_module_utils import get_relative_imports

from ..checkpoints.names import CODE_PATHS, CONFIG_CLASSES

# Pickle / TF / Flax model weights (training state such as training_args.bin or optimizer.pt is not weights: publish
# leaves it out by its allow-list).
FOREIGN_WEIGHTS = ("pytorch_model*.bin", "model*.bin", "model*.pt", "model*.pth", "consolidated*.pth", "*.ckpt",
                   "*.h5", "*.msgpack")


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" blocks publishing; "warning" does not
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"


@dataclass
class CheckArguments:
    folder: str = field(metadata={"help": "the model folder to check"})
    skip_load_check: bool = field(default=False, metadata={
        "help": "skip loading the folder as remote code in a fresh process (the slow part)"})


class FolderCheckError(ValueError):
    """A folder failed `check_folder`; the message lists every problem."""


def _absolute_paths(value, where: str) -> list[str]:
    """`where.key` for every string in a JSON-like value that is an absolute local path."""
    if isinstance(value, dict):
        return [hit for key, item in value.items() for hit in _absolute_paths(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [hit for index, item in enumerate(value) for hit in _absolute_paths(item, f"{where}[{index}]")]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~/")):
        return [f"{where} = {value!r}"]
    return []


def _check_config(folder: Path) -> tuple[dict | None, list[Problem]]:
    path = folder / "config.json"
    if not path.is_file():
        return None, [Problem("error", f"{path}: missing (not a model folder)")]
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        return None, [Problem("error", f"{path}: not valid JSON ({error})")]
    config_class = CONFIG_CLASSES.get(config.get("model_type"))
    if config_class is None:
        return config, [Problem("error", f"config.json: model_type {config.get('model_type')!r} is not an hf_moe "
                                         f"type ({', '.join(CONFIG_CLASSES)})")]
    from ..modeling.modeling_hf_moe import auto_map_for

    expected = auto_map_for(config_class)
    auto_map = config.get("auto_map")
    if not auto_map:
        return config, [Problem("error", "config.json: `auto_map` is missing; the folder cannot load as remote "
                                         f"code (expected {sorted(expected)})")]
    wrong = {auto: reference for auto, reference in expected.items() if auto_map.get(auto) != reference}
    if wrong:
        return config, [Problem("error", f"config.json: `auto_map` does not cover every class; expected "
                                         f"{', '.join(f'{a}={r}' for a, r in wrong.items())}")]
    return config, []


def _needed_code_files(folder: Path) -> list[str]:
    """The code files the folder's remote code needs: the modeling file `auto_map` names and, followed from it, every
    file it imports relatively (as transformers' remote-code loader does). A folder saved by an older hf_moe ships
    fewer files than the current one, and loads with them."""
    needed, pending = [], ["modeling_hf_moe.py"]
    while pending:
        name = pending.pop()
        if name in needed:
            continue
        needed.append(name)
        if (folder / name).is_file():
            pending += [f"{module}.py" for module in get_relative_imports(str(folder / name))]
    return needed


def _check_code_files(folder: Path) -> list[Problem]:
    problems = []
    installed_paths = {path.name: path for path in CODE_PATHS}
    for name in _needed_code_files(folder):
        shipped, installed = folder / name, installed_paths.get(name)
        if not shipped.is_file():
            problems.append(Problem("error", f"{name}: missing (the remote code `auto_map` refers to)"))
        elif installed is not None and shipped.read_bytes() != installed.read_bytes():
            problems.append(Problem("warning", f"{installed.name}: differs from the installed hf_moe's copy "
                                               f"({installed}); re-save the model to ship the current code"))
    return problems


def _check_weights(folder: Path) -> list[Problem]:
    found = sorted({path for pattern in FOREIGN_WEIGHTS for path in folder.glob(pattern)})
    problems = [Problem("error", f"{path.relative_to(folder)}: non-safetensors weights; save as safetensors "
                                 "(`save_pretrained` does by default) and delete this file") for path in found]
    if not list(folder.glob("*.safetensors")):
        problems.append(Problem("error", "no *.safetensors weights in the folder"))
    return problems


def _check_paths(folder: Path, config: dict | None) -> list[Problem]:
    hits = _absolute_paths(config, "config.json") if config is not None else []
    generation = folder / "generation_config.json"
    if generation.is_file():
        try:
            hits += _absolute_paths(json.loads(generation.read_text()), "generation_config.json")
        except json.JSONDecodeError as error:
            return [Problem("error", f"generation_config.json: not valid JSON ({error})")]
    return [Problem("error", f"{hit}: an absolute local path would be published") for hit in hits]


def _check_card(folder: Path) -> list[Problem]:
    path = folder / "README.md"
    if not path.is_file():
        return [Problem("error", "README.md: missing; `model.save_pretrained(folder)` with hf_moe imported writes "
                                 "one")]
    try:
        card = ModelCard.load(path)
    except Exception as error:  # noqa: BLE001  (yaml, model-index and type errors all mean: does not parse)
        return [Problem("error", f"README.md: the card metadata does not parse ({type(error).__name__}: {error})")]
    hits = _absolute_paths(card.data.to_dict(), "README.md metadata")
    return [Problem("error", f"{hit}: an absolute local path would be published") for hit in hits]


def _check_remote_load(folder: Path, config: dict) -> list[Problem]:
    from ..remote_check import load_as_remote_code

    ids = torch.arange(1, 5).unsqueeze(0) % config.get("vocab_size", 2)
    try:
        load_as_remote_code(folder, ids, max_new_tokens=1)
    except RuntimeError as error:
        last_line = str(error).strip().splitlines()[-1]
        return [Problem("error", f"the folder does not load as remote code in a fresh process without hf_moe: "
                                 f"{last_line}")]
    return []


def check_folder(folder: str | Path, load: bool = True) -> list[Problem]:
    """Every problem that would make `folder` a bad Hub upload: `auto_map` missing or incomplete, code files missing
    (or differing from the installed hf_moe: a warning), non-safetensors weights, absolute local paths in
    config.json / generation_config.json / the card metadata, card metadata that does not parse, and (with `load`,
    when nothing structural failed) the folder not loading with `trust_remote_code=True` in a fresh process
    without hf_moe. An empty list means ready.

    Example:
    ```python
    >>> for problem in check_folder("out/my-moe"):
    ...     print(problem)
    ```
    """
    folder = Path(folder)
    try:
        require_folder(folder)
    except OSError as error:
        return [Problem("error", str(error))]
    config, problems = _check_config(folder)
    problems += _check_code_files(folder) + _check_weights(folder) + _check_paths(folder, config)
    problems += _check_card(folder)
    if load and config is not None and not any(p.severity == "error" for p in problems):
        problems += _check_remote_load(folder, config)
    return problems


def require_folder(folder: str | Path) -> None:
    """Raise `FileNotFoundError` / `NotADirectoryError` unless `folder` is an existing folder."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder; expected a model folder written by hf_moe")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder; expected a model folder written by hf_moe")


def raise_for_problems(folder: str | Path, problems: list[Problem]) -> None:
    """Raise `FolderCheckError` listing the errors among `problems` (warnings pass) on one line."""
    errors = [problem.message for problem in problems if problem.severity == "error"]
    if errors:
        raise FolderCheckError(f"{folder} is not ready to publish: " + "; ".join(errors))
