"""Qwen2-MoE: q/k/v bias, optional dense layers (`mlp_only_layers`), per-layer sliding window, `norm_topk_prob`,
and a sigmoid-gated shared expert.

The shared expert's output is `sigmoid(x . g) * E_shared(x)`. A zero gate row gives sigmoid(0) = 0.5 and a doubled
`down_proj` gives 2 * E_shared(x), so the product is hf_moe's ungated shared experts bit for bit (both factors are
powers of two). Without shared experts the block gets a shared expert of width 0, whose output is exactly 0.
"""

from collections.abc import Iterator

import torch

from .base import Blocker, ExportTarget, qwen_moe_fields


class Qwen2MoeTarget(ExportTarget):
    name = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"

    def blockers(self, config) -> list[Blocker]:
        blockers = []
        if config.use_qk_norm:
            blockers.append(Blocker("q/k norm (`use_qk_norm`=True; Qwen2-MoE has none)", "export to qwen3_moe"))
        if config.attention_output_bias:
            blockers.append(Blocker("a bias on the attention output projection (`attention_output_bias`=True; "
                                    "Qwen2-MoE biases q/k/v only)", "export to qwen3_moe (q/k/v/o bias)"))
        return blockers

    def config_fields(self, config) -> dict:
        return dict(
            qwen_moe_fields(config),
            shared_expert_intermediate_size=config.num_shared_experts * config.moe_intermediate_size,
            qkv_bias=config.attention_bias,
            max_window_layers=config.num_hidden_layers,
            layer_types=list(config.layer_types),
        )

    def extra_sparse_block_tensors(self, layer: str, router: torch.Tensor, config
                                   ) -> Iterator[tuple[str, torch.Tensor]]:
        hidden = router.shape[1]
        yield f"{layer}.mlp.shared_expert_gate.weight", torch.zeros(1, hidden, dtype=router.dtype)
        if not config.num_shared_experts:
            empty = torch.zeros(0, hidden, dtype=router.dtype)
            yield f"{layer}.mlp.shared_expert.gate_proj.weight", empty
            yield f"{layer}.mlp.shared_expert.up_proj.weight", empty.clone()
            yield f"{layer}.mlp.shared_expert.down_proj.weight", torch.zeros(hidden, 0, dtype=router.dtype)

    def map_shared_experts(self, layer: str, projection: str, tensor: torch.Tensor
                           ) -> Iterator[tuple[str, torch.Tensor]]:
        if projection == "down_proj":
            tensor = tensor * 2  # undoes the sigmoid(0) = 0.5 of the zero gate row, exactly
        yield f"{layer}.mlp.shared_expert.{projection}.weight", tensor
