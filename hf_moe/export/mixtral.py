"""Mixtral: renormalised top-k on every layer, no shared experts, no attention biases or q/k norm."""

from .base import Blocker, ExportTarget, dense_layers, has_mixed_attention, sliding_window

QWEN_FOR_DENSE = "export to qwen3_moe (with q/k norm) or qwen2_moe, whose `mlp_only_layers` keep dense layers"


class MixtralTarget(ExportTarget):
    name = "mixtral"
    architecture = "MixtralForCausalLM"
    sparse_block = "block_sparse_moe"
    expert_projections = ("w1", "w3", "w2")

    def blockers(self, config) -> list[Blocker]:
        blockers = []
        if dense := dense_layers(config):
            blockers.append(Blocker(f"dense layers {dense} (Mixtral makes every layer sparse)", QWEN_FOR_DENSE))
        if config.num_shared_experts:
            blockers.append(Blocker(f"shared experts (`num_shared_experts`={config.num_shared_experts})",
                                    "export to qwen2_moe (its gated shared expert)"))
        if not config.norm_topk_prob:
            blockers.append(Blocker("top-k weights without renormalisation (`norm_topk_prob`=False; Mixtral "
                                    "always renormalises)", "export to qwen2_moe or qwen3_moe (`norm_topk_prob`)"))
        if config.attention_bias or config.attention_output_bias:
            blockers.append(Blocker("attention biases (`attention_bias` / `attention_output_bias`)",
                                    "export to qwen2_moe (q/k/v bias) or qwen3_moe (q/k/v/o bias)"))
        if config.use_qk_norm:
            blockers.append(Blocker("q/k norm (`use_qk_norm`=True)", "export to qwen3_moe"))
        if has_mixed_attention(config):
            blockers.append(Blocker("sliding-window attention on some layers only (`layer_types`)",
                                    "export to qwen2_moe (per-layer `layer_types`)"))
        return blockers

    def config_fields(self, config) -> dict:
        return dict(
            num_local_experts=config.num_experts,
            intermediate_size=config.moe_intermediate_size,  # Mixtral's experts use `intermediate_size`
            sliding_window=sliding_window(config),
            router_jitter_noise=0.0,  # hf_moe's jitter is training-only and acts on the router input only
        )
