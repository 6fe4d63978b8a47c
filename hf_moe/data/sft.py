"""Instruction datasets to chat messages, and tokenisation with the loss on the responses only."""

import json
from pathlib import Path

from datasets import Dataset, load_dataset
from datasets.exceptions import DatasetGenerationError

INSTRUCTION_COLUMNS = (("instruction", "response"), ("instruction", "output"), ("prompt", "completion"),
                       ("question", "answer"))
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _to_messages(row: dict) -> dict:
    if "messages" in row:
        return {"messages": row["messages"]}
    for instruction_key, response_key in INSTRUCTION_COLUMNS:
        if instruction_key in row and response_key in row:
            instruction = row[instruction_key]
            if row.get("input"):
                instruction = f"{instruction}\n\n{row['input']}"
            return {"messages": [{"role": "user", "content": instruction},
                                 {"role": "assistant", "content": row[response_key]}]}
    raise ValueError(f"a row needs a `messages` column or one of the column pairs {INSTRUCTION_COLUMNS}; "
                     f"found {sorted(row)}")


def load_instruction_dataset(name_or_path: str, split: str = "train") -> Dataset:
    """A `datasets` dataset (Hub name or local folder) or a local `.json` / `.jsonl` file, as `messages` rows.

    Accepted layouts: a `messages` column (chat format), or instruction/response columns (`instruction` +
    `response` | `output` with an optional `input`, `prompt` + `completion`, `question` + `answer`).
    """
    path = Path(name_or_path)
    if path.suffix in (".json", ".jsonl"):
        check_json_rows(path)
        try:
            dataset = load_dataset("json", data_files=str(path), split="train")
        except DatasetGenerationError as error:  # valid JSON that is no table, e.g. a column changing type
            raise ValueError(f"{path}: `datasets` cannot read its rows as one table: {error.__cause__ or error}") \
                from error
    else:
        dataset = load_dataset(name_or_path, split=split)
    keep = [column for column in dataset.column_names if column in ("messages", "family", "answer")]
    return dataset.map(_to_messages, remove_columns=[c for c in dataset.column_names if c not in keep])


def check_json_rows(path: Path) -> None:
    """Raise a `ValueError` naming `path` and its first malformed line, unless it is JSON Lines (one JSON object, a
    row, per line; blank lines allowed) or one JSON document (e.g. a list of rows over several lines).

    Run before `datasets` reads the file: its own errors are a long `DatasetGenerationError` traceback whose row
    number counts from the start of a chunk, not of the file. Costs one extra parse of the file.
    """
    rows, first_is_row = 0, False
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip(b"\r\n"))  # columns then count within the line
            except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError
                if rows == 0:  # the first line is no value on its own: one document over several lines?
                    document_error = _json_document_error(path)
                    if document_error is None:
                        return
                    if path.suffix == ".json":  # meant as one document (a .jsonl file is JSON Lines)
                        raise ValueError(document_error) from error
                raise ValueError(f"{path}: line {number} is not valid JSON ({_reason(error)}): "
                                 f"{_excerpt(line)}") from error
            if rows == 0:
                first_is_row = isinstance(value, dict)  # JSON Lines; else e.g. a list of rows on one line
            elif first_is_row and not isinstance(value, dict):
                raise ValueError(f"{path}: line {number} is not a JSON object (a row): {_excerpt(line)}")
            rows += 1
    if rows == 0:
        raise ValueError(f"{path}: empty; write one JSON object per line (a row)")


def _json_document_error(path: Path) -> str | None:
    """None when the whole file is one JSON document, else the message saying where it is not."""
    try:
        json.loads(path.read_bytes())
    except json.JSONDecodeError as error:
        lines = error.doc.splitlines()
        line = lines[error.lineno - 1] if error.lineno <= len(lines) else ""
        return f"{path}: not valid JSON at line {error.lineno}, column {error.colno} ({error.msg}): {_excerpt(line)}"
    except ValueError as error:  # UnicodeDecodeError
        return f"{path}: not valid JSON ({error})"
    return None


def _reason(error: ValueError) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg}: column {error.colno}"
    return str(error)


def _excerpt(line: str | bytes, width: int = 60) -> str:
    """The start of a line of the file, quoted on one line."""
    text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
    text = text.strip()
    return repr(text if len(text) <= width else f"{text[:width]}...")


def ensure_chat_template(tokenizer) -> None:
    """Tokenizers without a chat template get a plain `role: content` one."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def generation_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat-formatted text of every message but the last, ending where the assistant's reply starts."""
    return tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)


def tokenize_for_sft(tokenizer, messages: list[dict], max_length: int) -> dict:
    """Token ids of the whole conversation; labels are -100 on everything before the last assistant reply."""
    prompt = generation_prompt(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    full_ids = tokenizer(full, add_special_tokens=False).input_ids
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template renders the prompt differently inside the full conversation; "
                         "cannot find where the response starts")
    full_ids = full_ids[:max_length]
    labels = [-100] * min(len(prompt_ids), len(full_ids)) + full_ids[len(prompt_ids):]
    return {"input_ids": full_ids, "attention_mask": [1] * len(full_ids), "labels": labels}
