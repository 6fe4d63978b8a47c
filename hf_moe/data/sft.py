"""Instruction datasets to chat messages, and tokenisation with the loss on the responses only."""

from pathlib import Path

from datasets import Dataset, load_dataset

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
        dataset = load_dataset("json", data_files=str(path), split="train")
    else:
        dataset = load_dataset(name_or_path, split=split)
    keep = [column for column in dataset.column_names if column in ("messages", "family", "answer")]
    return dataset.map(_to_messages, remove_columns=[c for c in dataset.column_names if c not in keep])


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
