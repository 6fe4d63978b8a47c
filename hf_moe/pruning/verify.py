"""Source vs pruned, side by side: max |Δlogit| on sample prompts and greedy-generation agreement."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..checkpoints.compare import SAMPLE_PROMPTS, chat_prompt_ids, compare_models, pad_token_id
from ..checkpoints.reading import resolve_folder


@torch.no_grad()
def verify_pruning(source: str | Path, pruned_folder: str | Path, prompts=SAMPLE_PROMPTS,
                   max_new_tokens: int = 24) -> dict:
    """Run the source and the pruned folder (float32) on `prompts` (chat-formatted with the pruned folder's
    tokenizer): max |Δlogit| over all positions, next-token argmax agreement, identical greedy generations, and per
    prompt both answers. Pruning changes the function on purpose: this says by how much on these prompts."""
    source_folder, _ = resolve_folder(str(source))
    reference = AutoModelForCausalLM.from_pretrained(source_folder, dtype=torch.float32).eval()
    pruned = AutoModelForCausalLM.from_pretrained(pruned_folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(pruned_folder)
    inputs = [chat_prompt_ids(tokenizer, prompt) for prompt in prompts]
    comparison = compare_models(reference, pruned, inputs, max_new_tokens, pad_token_id(tokenizer))
    samples = [dict(prompt=prompt, source=tokenizer.decode(source_answer, skip_special_tokens=True),
                    pruned=tokenizer.decode(pruned_answer, skip_special_tokens=True),
                    max_abs_logit_difference=difference, identical=same)
               for prompt, source_answer, pruned_answer, difference, same in zip(
                   prompts, comparison["reference_generations"], comparison["candidate_generations"],
                   comparison["per_input_difference"], comparison["per_input_identical"], strict=True)]
    return dict(max_abs_logit_difference=comparison["max_abs_logit_difference"],
                identical_generations=comparison["identical_generations"], inputs=len(inputs),
                next_token_argmax_agreement=comparison["next_token_argmax_agreement"], samples=samples)
