"""`publish`: check a model folder, then upload exactly the files a model repo needs (an allow-list)."""

import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..checkpoints.names import CODE_FILES, TOKENIZER_FILES
from .card import with_model_id
from .check import check_folder, raise_for_problems, require_folder

# Root-level files of a model repo; everything else (training_args.bin, optimizer / scheduler / rng states,
# checkpoint-*/, runs/, expert_load/ except the images the card shows) stays local.
ALLOWED_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES, *CODE_FILES,
                 "README.md")
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\((?P<markdown>[^)\s]+)[^)]*\)|<img[^>]*\bsrc=\"(?P<html>[^\"]+)\"")


def referenced_files(card_text: str, folder: Path) -> list[str]:
    """Relative paths of the images the card shows that exist inside `folder`."""
    found = []
    root = folder.resolve()
    for match in IMAGE_LINK.finditer(card_text):
        target = match["markdown"] or match["html"]
        if "://" in target or target.startswith(("/", "#", "data:")):
            continue
        path = (folder / target).resolve()
        if path.is_file() and path.is_relative_to(root):
            found.append(path.relative_to(root).as_posix())
    return list(dict.fromkeys(found))


def upload_plan(folder: str | Path) -> tuple[list[str], list[str]]:
    """(files that would be uploaded, files left out), as paths relative to `folder`, sorted."""
    folder = Path(folder)
    everything = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    allowed = {name for name in everything if "/" not in name and (name in ALLOWED_FILES or SHARD.fullmatch(name))}
    if (folder / "README.md").is_file():
        allowed.update(referenced_files((folder / "README.md").read_text(encoding="utf-8"), folder))
    return sorted(allowed), [name for name in everything if name not in allowed]


def validate_model_repo_id(repo_id: str) -> None:
    """Raise `ValueError` unless `repo_id` is a valid `owner/name`."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"`repo_id`={repo_id!r} is invalid: {error}") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"`repo_id`={repo_id!r} is invalid: use `owner/name` (your user or organisation name, a "
                         "slash, the model name)")


@dataclass
class PublishArguments:
    folder: str = field(metadata={"help": "the model folder to upload"})
    repo_id: str = field(metadata={"help": "the Hub repository, owner/name"})
    private: bool = field(default=False, metadata={"help": "create the repository as private"})
    revision: str | None = field(default=None, metadata={"help": "branch to commit to (created if missing)"})
    commit_message: str | None = field(default=None, metadata={"help": "default: 'Upload <folder name> with hf_moe'"})
    dry_run: bool = field(default=False, metadata={"help": "print the files and the card metadata; upload nothing"})
    skip_load_check: bool = field(default=False, metadata={
        "help": "skip loading the folder as remote code in a fresh process (the slow part of the check)"})


@dataclass
class PublishResult:
    repo_id: str
    files: list[str]
    left_out: list[str]
    metadata: dict
    commit_url: str | None = None  # None for a dry run


def publish(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
            commit_message: str | None = None, dry_run: bool = False, token: str | None = None,
            skip_load_check: bool = False) -> PublishResult:
    """Check `folder` ([`check_folder`]), then create `repo_id` if needed and upload the allow-listed files in one
    commit. The uploaded README.md has its usage snippet pointed at `repo_id`. Nothing is uploaded when the repo id
    is malformed, no token is available (`hf auth login` or `HF_TOKEN`) or the check finds an error.

    Example:
    ```python
    >>> result = publish("out/my-moe", "me/my-moe", dry_run=True)
    >>> result.files
    ['README.md', 'config.json', 'configuration_hf_moe.py', 'model.safetensors', 'modeling_hf_moe.py', ...]
    ```
    """
    folder = Path(folder)
    require_folder(folder)
    validate_model_repo_id(repo_id)
    token = token or get_token()
    if token is None and not dry_run:
        raise PermissionError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (nothing was uploaded)")
    raise_for_problems(folder, check_folder(folder, load=not skip_load_check))
    files, left_out = upload_plan(folder)
    card_text = with_model_id((folder / "README.md").read_text(encoding="utf-8"), repo_id)
    result = PublishResult(repo_id, files, left_out, ModelCard(card_text).data.to_dict())
    if dry_run:
        return result
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
                  for name in files if name != "README.md"]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_text.encode("utf-8")))
    commit = api.create_commit(repo_id, operations=operations, revision=revision,
                               commit_message=commit_message or f"Upload {folder.resolve().name} with hf_moe")
    result.commit_url = commit.commit_url
    return result
