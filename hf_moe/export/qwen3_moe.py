"""Qwen3-MoE: q/k norm, optional dense layers (`mlp_only_layers`), `norm_topk_prob`, one bias flag for q/k/v/o."""

from .base import Blocker, ExportTarget, has_mixed_attention, qwen_moe_fields


class Qwen3MoeTarget(ExportTarget):
    name = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"

    def blockers(self, config) -> list[Blocker]:
        blockers = []
        if not config.use_qk_norm:
            blockers.append(Blocker("no q/k norm (`use_qk_norm`=False; Qwen3-MoE always normalises q and k)",
                                    "export to mixtral or qwen2_moe"))
        if config.num_shared_experts:
            blockers.append(Blocker(
                f"shared experts (`num_shared_experts`={config.num_shared_experts}; Qwen3-MoE has none)",
                "export to qwen2_moe (its gated shared expert) when there is no q/k norm; q/k norm together "
                "with shared experts has no exact native target"))
        if config.attention_bias != config.attention_output_bias:
            blockers.append(Blocker(
                f"`attention_bias`={config.attention_bias} with `attention_output_bias`="
                f"{config.attention_output_bias} (Qwen3-MoE's `attention_bias` covers q/k/v/o together)",
                "export to qwen2_moe when only q/k/v have biases and there is no q/k norm"))
        if has_mixed_attention(config):
            blockers.append(Blocker("sliding-window attention on some layers only (`layer_types`; Qwen3-MoE "
                                    "slides on all layers or none)", "export to qwen2_moe (per-layer `layer_types`)"))
        return blockers

    def config_fields(self, config) -> dict:
        return dict(qwen_moe_fields(config), attention_bias=config.attention_bias)
