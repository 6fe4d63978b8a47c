"""Dense vs upcycled, side by side: max |Δlogit| on sample prompts and greedy-generation agreement."""

from pathlib import Path

import torch

from ..checkpoints.compare import SAMPLE_PROMPTS, chat_prompt_ids, compare_models, pad_token_id
from ..checkpoints.reading import DenseCheckpoint, open_model_folder


@torch.no_grad()
def verify_upcycling(dense: DenseCheckpoint, moe_folder: str | Path, prompts=SAMPLE_PROMPTS,
                     max_new_tokens: int = 24, input_ids: list[torch.Tensor] | None = None) -> dict:
    """Run the dense model and the upcycled folder (float32) side by side.

    The inputs are `prompts` (chat-formatted with the folder's tokenizer) or, for models without a tokenizer,
    `input_ids` (a list of (1, seq) tensors). Returns `max_abs_logit_difference` over all positions, the number of
    inputs whose greedy generations are identical, and per input the difference and both answers (with the user's
    prompt, not the chat template around it).

    When the folder stores lower-precision weights (e.g. bfloat16), the dense weights are rounded to that dtype
    first (`weights_dtype` in the report), so the comparison checks the upcycling itself, not the rounding.
    """
    dense_model = dense.load_dense_model(torch.float32)
    moe = open_model_folder(moe_folder)
    weights_dtype = moe.config_json.get("dtype") or "float32"
    if weights_dtype != "float32":
        with torch.no_grad():
            for parameter in dense_model.parameters():  # new tensors: the source's own storage is left intact
                parameter.data = parameter.data.to(getattr(torch, weights_dtype)).float()
    moe_model = moe.load_model(torch.float32)
    tokenizer = moe.load_tokenizer() if input_ids is None else None
    inputs = input_ids if input_ids is not None else [chat_prompt_ids(tokenizer, prompt) for prompt in prompts]
    comparison = compare_models(dense_model, moe_model, inputs, max_new_tokens,
                                pad_token_id(tokenizer) if tokenizer is not None else 0)
    samples = [dict(max_abs_logit_difference=difference, identical=same) for difference, same in
               zip(comparison["per_input_difference"], comparison["per_input_identical"], strict=True)]
    if tokenizer is not None:
        for sample, prompt, dense_answer, moe_answer in zip(samples, prompts, comparison["reference_generations"],
                                                            comparison["candidate_generations"], strict=True):
            sample.update(prompt=prompt, dense=tokenizer.decode(dense_answer, skip_special_tokens=True),
                          upcycled=tokenizer.decode(moe_answer, skip_special_tokens=True))
    return dict(max_abs_logit_difference=comparison["max_abs_logit_difference"],
                identical_generations=comparison["identical_generations"], inputs=len(inputs),
                weights_dtype=weights_dtype, samples=samples)
