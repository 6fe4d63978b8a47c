"""Source vs pruned, side by side: max |Δlogit| on sample prompts, greedy-generation agreement, and how many routing
choices changed."""

import json
from pathlib import Path

import torch

from ..checkpoints.compare import SAMPLE_PROMPTS, chat_prompt_ids, compare_models, pad_token_id
from ..checkpoints.reading import open_model_folder
from ..moe_layers import find_moe_layers


@torch.no_grad()
def routing_choices(model, inputs: list[torch.Tensor]) -> list[dict[int, torch.Tensor]]:
    """Per input, per sparse layer (decoder-layer index): the (rows, k) experts its router chose (rows: tokens;
    MH-MoE: sub-tokens), read from the router's output `(router_logits, top_k_weights, top_k_index)`."""
    choices, current = [], {}
    hooks = [layer.router.register_forward_hook(
        lambda module, args, output, index=layer.index: current.__setitem__(index, output[2].detach().cpu()))
        for layer in find_moe_layers(model)]
    try:
        for ids in inputs:
            current = {}
            model(input_ids=ids, use_cache=False)
            choices.append(current)
    finally:
        for hook in hooks:
            hook.remove()
    return choices


def source_to_pruned(plan: list[dict]) -> dict[int, dict[int, int]]:
    """Per sparse layer, each source expert's new index: kept expert `kept[i]` (merging: every member of its
    cluster) is new expert i; a removed expert has none. `plan`: pruning.json's plan."""
    mapping = {}
    for entry in plan:
        clusters = entry.get("merged") or [{"members": [expert]} for expert in entry["kept"]]
        mapping[entry["layer"]] = {member: new for new, cluster in enumerate(clusters) for member in cluster["members"]}
    return mapping


def count_routing_flips(source_choices, pruned_choices, mapping: dict[int, dict[int, int]]) -> dict:
    """(row, sparse layer) routing decisions whose chosen experts changed: the source's choice, each expert mapped to
    its new index, against the pruned model's. `routed_to_removed`: those where the source chose an expert that is
    gone (each of them changes)."""
    flips = decisions = to_removed = 0
    for before_per_layer, after_per_layer in zip(source_choices, pruned_choices, strict=True):
        for layer, before in before_per_layer.items():
            new_index = mapping[layer]
            for source_row, pruned_row in zip(before.tolist(), after_per_layer[layer].tolist(), strict=True):
                decisions += 1
                to_removed += any(expert not in new_index for expert in source_row)
                flips += {new_index.get(expert, -1) for expert in source_row} != set(pruned_row)
    return dict(routing_flips=flips, routing_decisions=decisions, routed_to_removed=to_removed)


@torch.no_grad()
def verify_pruning(source: str | Path, pruned_folder: str | Path, prompts=SAMPLE_PROMPTS,
                   max_new_tokens: int = 24) -> dict:
    """Run the source and the pruned folder (float32) on `prompts` (chat-formatted with the pruned folder's
    tokenizer): max |Δlogit| over all positions, next-token argmax agreement, identical greedy generations, per prompt
    both answers, and the routing flips: how many (token, sparse layer) choices of experts changed on the prompts
    (`routing_flips` of `routing_decisions`; `routed_to_removed` of them had chosen an expert that is gone). Pruning
    changes the function on purpose: this says by how much on these prompts."""
    reference = open_model_folder(source).load_model(torch.float32)
    candidate = open_model_folder(pruned_folder)
    pruned = candidate.load_model(torch.float32)
    tokenizer = candidate.load_tokenizer()
    plan = json.loads((candidate.path / "pruning.json").read_text())["plan"]
    inputs = [chat_prompt_ids(tokenizer, prompt) for prompt in prompts]
    comparison = compare_models(reference, pruned, inputs, max_new_tokens, pad_token_id(tokenizer))
    routing = count_routing_flips(routing_choices(reference, inputs), routing_choices(pruned, inputs),
                                  source_to_pruned(plan))
    samples = [dict(prompt=prompt, source=tokenizer.decode(source_answer, skip_special_tokens=True),
                    pruned=tokenizer.decode(pruned_answer, skip_special_tokens=True),
                    max_abs_logit_difference=difference, identical=same)
               for prompt, source_answer, pruned_answer, difference, same in zip(
                   prompts, comparison["reference_generations"], comparison["candidate_generations"],
                   comparison["per_input_difference"], comparison["per_input_identical"], strict=True)]
    return dict(max_abs_logit_difference=comparison["max_abs_logit_difference"],
                identical_generations=comparison["identical_generations"], inputs=len(inputs),
                next_token_argmax_agreement=comparison["next_token_argmax_agreement"], **routing, samples=samples)


def format_routing_flips(verification: dict) -> str:
    """The routing line of a `verify_pruning` report, for people."""
    return (f"routing: {verification['routing_flips']} of {verification['routing_decisions']} (token, sparse layer) "
            f"choices of experts changed on the prompts, {verification['routed_to_removed']} of them because the "
            "source chose an expert that is gone")
