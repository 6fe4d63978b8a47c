"""One comparison of two models on the same inputs, used by every verify and benchmark: max |Δlogit|, next-token
argmax agreement and greedy generations."""

import torch

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


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, else its end-of-sequence token (what `generate` pads finished rows with)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def model_outputs(model, inputs: list[torch.Tensor], max_new_tokens: int, pad_token_id: int) -> dict:
    """`model`'s logits (float32) and greedy continuations (token lists, prompt excluded) on each (1, seq) input."""
    logits, generations = [], []
    for ids in inputs:
        logits.append(model(input_ids=ids).logits.float())
        generated = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
        generations.append(generated[0, ids.shape[1]:].tolist())
    return dict(logits=logits, generations=generations)


def compare_outputs(reference: dict, candidate: dict) -> dict:
    """Two `model_outputs` (the candidate's may come from another process): max |Δlogit| over all inputs and
    positions, next-token argmax agreement, identical greedy continuations and greedy token agreement, overall and
    per input."""
    differences, same_argmax, positions, same_tokens, total_tokens = [], 0, 0, 0, 0
    for a, b in zip(reference["logits"], candidate["logits"], strict=True):
        differences.append((a.float() - b.float()).abs().max().item())
        same_argmax += (a.argmax(-1) == b.argmax(-1)).sum().item()
        positions += a.shape[-2]
    identical = []
    for a, b in zip(reference["generations"], candidate["generations"], strict=True):
        identical.append(a == b)
        same_tokens += sum(x == y for x, y in zip(a, b, strict=False))
        total_tokens += max(len(a), len(b))
    return dict(max_abs_logit_difference=max(differences), identical_generations=sum(identical),
                inputs=len(identical), next_token_argmax_agreement=same_argmax / positions,
                greedy_token_agreement=same_tokens / max(total_tokens, 1),
                per_input_difference=differences, per_input_identical=identical,
                reference_generations=reference["generations"], candidate_generations=candidate["generations"])


def compare_models(reference, candidate, inputs: list[torch.Tensor], max_new_tokens: int, pad_token_id: int) -> dict:
    """`compare_outputs` of two models in this process."""
    return compare_outputs(model_outputs(reference, inputs, max_new_tokens, pad_token_id),
                           model_outputs(candidate, inputs, max_new_tokens, pad_token_id))
