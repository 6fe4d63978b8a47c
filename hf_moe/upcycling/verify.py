"""Dense vs upcycled, side by side: max |Δlogit| on sample prompts and greedy-generation agreement."""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .sources import DenseCheckpoint

SAMPLE_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "What is 12 times 7?",
    "Name three primary colors.",
    "Explain what a mixture of experts is in one sentence.",
)


def chat_prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """`prompt` as a user turn through the chat template (when the tokenizer has one), as (1, seq) ids."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    return tokenizer(text, return_tensors="pt").input_ids


@torch.no_grad()
def verify_upcycling(dense: DenseCheckpoint, moe_folder: str | Path, prompts=SAMPLE_PROMPTS,
                     max_new_tokens: int = 24, input_ids: list[torch.Tensor] | None = None) -> dict:
    """Run the dense model and the upcycled folder (float32) side by side.

    The inputs are `prompts` (chat-formatted with the folder's tokenizer) or, for models without a tokenizer,
    `input_ids` (a list of (1, seq) tensors). Returns `max_abs_logit_difference` over all positions, the number of
    inputs whose greedy generations are identical, and per input the difference and both answers.

    When the folder stores lower-precision weights (e.g. bfloat16), the dense weights are rounded to that dtype
    first (`weights_dtype` in the report), so the comparison checks the upcycling itself, not the rounding.
    """
    dense_model = dense.load_dense_model(torch.float32)
    weights_dtype = json.loads((Path(moe_folder) / "config.json").read_text()).get("dtype") or "float32"
    if weights_dtype != "float32":
        with torch.no_grad():
            for parameter in dense_model.parameters():  # new tensors: the source's own storage is left intact
                parameter.data = parameter.data.to(getattr(torch, weights_dtype)).float()
    moe_model = AutoModelForCausalLM.from_pretrained(moe_folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(moe_folder) if input_ids is None else None
    inputs = input_ids if input_ids is not None else [chat_prompt_ids(tokenizer, prompt) for prompt in prompts]
    pad_token_id = 0
    if tokenizer is not None:
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    worst, identical, samples = 0.0, 0, []
    for ids in inputs:
        difference = (dense_model(input_ids=ids).logits - moe_model(input_ids=ids).logits).abs().max().item()
        worst = max(worst, difference)
        generate = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
        dense_answer = dense_model.generate(ids, **generate)[0, ids.shape[1]:]
        moe_answer = moe_model.generate(ids, **generate)[0, ids.shape[1]:]
        same = torch.equal(dense_answer, moe_answer)
        identical += same
        sample = dict(max_abs_logit_difference=difference, identical=same)
        if tokenizer is not None:
            sample.update(prompt=tokenizer.decode(ids[0], skip_special_tokens=True),
                          dense=tokenizer.decode(dense_answer, skip_special_tokens=True),
                          upcycled=tokenizer.decode(moe_answer, skip_special_tokens=True))
        samples.append(sample)
    return dict(max_abs_logit_difference=worst, identical_generations=identical, inputs=len(inputs),
                weights_dtype=weights_dtype, samples=samples)


VERIFICATION_COLUMNS = {"prompt": "prompt", "dense": "dense answer", "upcycled": "upcycled answer",
                        "max_abs_logit_difference": "max |Δlogit|", "identical": "identical?"}


def format_verification(report: dict) -> str:
    """`verify_upcycling`'s report for people: one summary line and a table with a row per prompt."""
    from ..cli_output import table

    heading = (f"verification: {report['identical_generations']}/{report['inputs']} greedy generations identical, "
               f"max |Δlogit| {report['max_abs_logit_difference']:.2g}")
    if not report["samples"]:
        return heading
    columns = {key: name for key, name in VERIFICATION_COLUMNS.items() if key in report["samples"][0]}
    return f"{heading}\n{table(report['samples'], columns)}"
