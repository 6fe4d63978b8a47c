"""Router initialisation for upcycled models: zeros, small random, or from calibration prompts."""

import torch

ROUTER_INITS = ("random", "zeros", "calibration")


def random_router(num_experts: int, input_size: int, std: float, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """N(0, std) router rows (Komatsuzaki et al.: the router is the only new, randomly initialised parameter)."""
    return torch.randn(num_experts, input_size, generator=generator) * std


def zeros_router(num_experts: int, input_size: int) -> torch.Tensor:
    """All-zero router: uniform probabilities at step 0 (ties pick the lowest expert indices)."""
    return torch.zeros(num_experts, input_size)


@torch.no_grad()
def calibration_routers(dense_model, tokenizer, prompts_per_expert: list[list[str]], layer_indices: list[int],
                        num_subtokens: int = 1) -> dict[int, torch.Tensor]:
    """One router per sparse layer whose row e is the mean MLP input of expert e's prompts (mergekit `hidden`).

    For every prompt the dense model runs once; a forward hook records the input of each layer's MLP (the output of
    `post_attention_layernorm`), averaged over the prompt's tokens and then over the expert's prompts, centred on the
    mean over all experts (so rows differ by what makes each expert's prompts distinct) and L2-normalised. For MH-MoE
    the width-d/h sub-tokens are averaged instead.
    """
    if not prompts_per_expert or any(not prompts for prompts in prompts_per_expert):
        raise ValueError("calibration needs at least one prompt for every expert")
    layers = dense_model.model.layers
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layers[i].post_attention_layernorm.register_forward_hook(
            lambda module, inputs, output, i=i: captured.__setitem__(i, output.detach().float())
        )
        for i in layer_indices
    ]
    try:
        expert_means = {i: [] for i in layer_indices}
        for prompts in prompts_per_expert:
            sums = {i: 0.0 for i in layer_indices}
            for prompt in prompts:
                ids = tokenizer(prompt, return_tensors="pt").input_ids
                dense_model(input_ids=ids)
                for i in layer_indices:
                    hidden = captured[i][0]  # (seq, d)
                    sums[i] = sums[i] + hidden.reshape(-1, hidden.shape[-1] // num_subtokens).mean(0)
            for i in layer_indices:
                expert_means[i].append(sums[i] / len(prompts))
    finally:
        for hook in hooks:
            hook.remove()
    routers = {}
    for i, rows in expert_means.items():
        rows = torch.stack(rows)  # (E, width)
        rows = rows - rows.mean(0, keepdim=True)
        routers[i] = rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    return routers
