"""Where a model comes from: the Hub id a source stands for (an `owner/name`, or a folder of the Hub cache), and the
lineage a derived folder records — the nearest ancestor on the Hub (`base_model`), the license carried over, how the
direct parent is named (never an absolute path)."""

import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

# A folder inside the huggingface_hub cache: .../models--owner--name/snapshots/<revision>
HUB_CACHE_SNAPSHOT = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/")


def is_hub_id_shaped(source: str) -> bool:
    """Whether a path that does not exist could be a Hub id (`owner/name`), rather than a mistyped local path."""
    return source.count("/") == 1 and not source.startswith((".", "/"))


def hub_id(source: str | Path | None) -> str | None:
    """The Hub id `source` stands for: an `owner/name` that is not a local path, or a folder of the Hub cache."""
    if source is None:
        return None
    cached = HUB_CACHE_SNAPSHOT.search(Path(source).absolute().as_posix())
    if cached:
        return f"{cached['owner']}/{cached['name']}"
    text = str(source)
    if Path(text).exists() or text.count("/") != 1:
        return None
    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


@dataclass
class Lineage:
    """`base_model`: the Hub id of the nearest ancestor on the Hub (None when unknown); `license`: carried from the
    source; `parent`: how the body names the direct parent (a Hub id or a folder name, never an absolute path)."""

    base_model: str | None = None
    license: str | None = None
    parent: str | None = None


def local_card(folder: str | Path) -> ModelCard | None:
    """The parsed README.md of a local folder, or None (absent or unparsable metadata)."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        return None
    try:
        return ModelCard.load(path)
    except Exception:  # noqa: BLE001  (yaml / model-index errors: a foreign card we cannot read is no lineage)
        return None


def display_name(source: str | Path) -> str:
    """A Hub id as is; a local path by its folder or file name (the card must not leak local paths)."""
    return hub_id(source) or Path(source).name


def lineage_of(parent: str | Path | None, license: str | None = None) -> Lineage:
    """The lineage of a model made from `parent` (a Hub id or a local folder).

    `base_model` is the parent's Hub id; for a local parent, the `base_model` its own card records (the nearest
    ancestor that is on the Hub), else None. The license comes from the parent's card, else `license`.
    """
    if parent is None:
        return Lineage(license=license)
    card = local_card(parent) if Path(parent).is_dir() else None
    card_license = card.data.license if card is not None else None
    base_model = hub_id(parent) or (card.data.base_model if card is not None else None)
    if isinstance(base_model, list):
        base_model = base_model[0] if base_model else None
    if base_model is not None and hub_id(base_model) is None:  # a foreign card that recorded a local path
        base_model = None
    return Lineage(base_model=base_model, license=card_license or license, parent=display_name(parent))


def gguf_license(path: str | Path) -> str | None:
    """`general.license` of a GGUF file (llama.cpp writes the source model's license there)."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("general.license")
    return None if field is None else str(field.contents())


def source_lineage(dense) -> Lineage:
    """Lineage of a dense source (`hf_moe.checkpoints.reading.DenseCheckpoint`): its Hub id (given, embedded, or a
    Hub-cache folder) and its license (card metadata, else config, else GGUF `general.license`)."""
    if dense.gguf_file is not None:
        lineage = Lineage(parent=dense.gguf_file.name)
    else:
        lineage = lineage_of(dense.folder)
    source_id = hub_id(dense.name) or hub_id(dense.folder)
    if source_id:
        lineage.base_model = lineage.parent = source_id
    lineage.license = (lineage.license or getattr(dense.config, "license", None)
                       or (gguf_license(dense.gguf_file) if dense.gguf_file is not None else None))
    return lineage
