"""Calibration token sequences: the embedded task mixture by default, any `datasets` dataset or JSON / JSONL file
(chat `messages`, instruction/response columns as `hf-moe finetune` reads them, or plain `text`), or token ids."""

import math
from contextlib import contextmanager
from pathlib import Path

import torch

from ..data import HELD_IN_FAMILIES, build_mixture, load_instruction_dataset
from ..data.sft import INSTRUCTION_COLUMNS, check_json_rows, ensure_chat_template, tokenize_for_sft


@contextmanager
def _datasets_quiet():
    """`datasets` without its progress bars: reading a local file and converting its rows takes a moment, and the
    bars would otherwise stand before any error about the rows."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _load_table(name: str, split: str):
    from datasets import load_dataset

    path = Path(name)
    if path.suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path} does not exist")
        check_json_rows(path)
        with _datasets_quiet():
            return load_dataset("json", data_files=str(path), split="train")
    return load_dataset(name, split=split)  # a download's progress bars say something


def _is_text_table(name: str, columns: list[str]) -> bool:
    """Whether the rows are plain `text` (else chat or instruction rows); raise naming the accepted columns when
    they are neither."""
    if "text" in columns and "messages" not in columns:
        return True
    if "messages" in columns or any(set(pair) <= set(columns) for pair in INSTRUCTION_COLUMNS):
        return False
    pairs = ", ".join("/".join(pair) for pair in INSTRUCTION_COLUMNS)
    raise ValueError(f"calibration data {name}: rows need a `text` column, a `messages` column or one of the column "
                     f"pairs {pairs}; found {sorted(columns)}")


def calibration_inputs(tokenizer, calibration=None, samples: int = 64, max_length: int = 256, split: str = "train",
                       seed: int = 0) -> tuple[list[torch.Tensor], str]:
    """((1, seq) token-id tensors, a description of where they come from).

    `calibration`: None (the embedded task mixture's training split, all held-in families), a dataset name / folder /
    `.json` / `.jsonl` path (rows with `text` are tokenised as they are; chat or instruction rows through the
    tokenizer's chat template, the whole conversation), or a list of token-id sequences used as they are. At most
    `samples` rows (shuffled with `seed`), each cut to `max_length` tokens.
    """
    if samples < 1 or max_length < 1:
        raise ValueError(f"`calibration_samples`={samples} and `max_length`={max_length} must be >= 1")
    if calibration is not None and not isinstance(calibration, (str, Path)):
        sequences = [torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)[:, :max_length] for ids in calibration]
        sequences = [ids for ids in sequences if ids.numel()]
        if not sequences:
            raise ValueError("`calibration` holds no token ids")
        return sequences, f"{len(sequences)} given token sequences"
    if tokenizer is None:
        raise ValueError("calibration text needs a tokenizer: pass `tokenizer=` (or token ids as `calibration`)")
    if calibration is None:
        per_family = math.ceil(samples / len(HELD_IN_FAMILIES))
        rows = build_mixture(train_per_family=per_family, eval_per_family=1, seed=seed)["train"]
        description = f"the embedded task mixture (train split, seed {seed})"
    else:
        name = str(calibration)
        table = _load_table(name, split)
        if _is_text_table(name, table.column_names):
            rows = table
        else:
            with _datasets_quiet():
                rows = load_instruction_dataset(name, split)
        rows = rows.shuffle(seed=seed)
        description = Path(name).name if Path(name).exists() else name
    rows = rows.select(range(min(samples, len(rows))))
    if "text" in rows.column_names and "messages" not in rows.column_names:
        sequences = [tokenizer(text, return_tensors="pt").input_ids[:, :max_length] for text in rows["text"]]
    else:
        ensure_chat_template(tokenizer)
        sequences = [torch.tensor([tokenize_for_sft(tokenizer, messages, max_length)["input_ids"]])
                     for messages in rows["messages"]]
    sequences = [ids for ids in sequences if ids.numel()]
    if not sequences:
        raise ValueError(f"calibration data {description} holds no text")
    return sequences, description
