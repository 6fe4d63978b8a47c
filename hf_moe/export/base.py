"""What every export target shares: the blocker type, the decoder fields all three native configs read the same
way, and the per-expert split of hf_moe's fused expert tensors.

A target is one small class (`name`, `blockers(config)`, `config_fields(config)`, tensor names); `supports(config)`
returns the reasons it cannot reproduce a model exactly, so a refusal explains itself.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AutoConfig, PreTrainedConfig

from ..checkpoints.names import EXPERTS_WEIGHT, ROUTER_WEIGHT, SHARED_EXPERTS_WEIGHT
from ..moe_layers import EXPERT_CHOICE_ROUTING


@dataclass(frozen=True)
class Blocker:
    """A feature of the hf_moe model that a target cannot reproduce exactly, and what would make it exportable."""

    feature: str
    fix: str | None = None

    def __str__(self) -> str:
        return f"{self.feature}. Fix: {self.fix}." if self.fix else f"{self.feature}. No option makes it exportable."


class ExportRefusedError(ValueError):
    """No exact native equivalent: the message names every blocking feature. Nothing was written."""


# ------------------------------------------------------------------------------------------------ feature checks
def sliding_window(config) -> int | None:
    """The window of the model's sliding layers, or None when no layer slides."""
    return config.sliding_window if "sliding_attention" in config.layer_types else None


def has_mixed_attention(config) -> bool:
    return len(set(config.layer_types)) > 1


def dense_layers(config) -> list[int]:
    sparse = set(config.sparse_layer_indices)
    return [i for i in range(config.num_hidden_layers) if i not in sparse]


def qwen_moe_fields(config) -> dict:
    """The sparse-block and window fields Qwen2-MoE and Qwen3-MoE share (every layer's block at
    `decoder_sparse_step=1`, the dense ones listed in `mlp_only_layers`)."""
    window = sliding_window(config)
    return dict(
        num_experts=config.num_experts,
        moe_intermediate_size=config.moe_intermediate_size,
        intermediate_size=config.intermediate_size,  # the dense layers'
        decoder_sparse_step=1,
        mlp_only_layers=dense_layers(config),
        norm_topk_prob=config.norm_topk_prob,
        use_sliding_window=window is not None,
        sliding_window=window,
    )


def common_blockers(config) -> list[Blocker]:
    """What no target can reproduce: MH-MoE, token dropping at inference, a selection bias, learned router noise."""
    blockers = []
    if config.model_type == "hf_mh_moe":
        blockers.append(Blocker(
            "MH-MoE (`model_type`='hf_mh_moe': sub-tokens of width d/h routed to experts of width d/h, head and "
            "merge projections): no native architecture routes sub-tokens"))
    capacity = config.eval_capacity_factor
    # An expert receives at most every token once, so capacity ceil(c * tokens * k / E) >= tokens never drops.
    if capacity is not None and capacity * config.num_experts_per_tok < config.num_experts:
        blockers.append(Blocker(
            f"a capacity limit that drops tokens at inference (`eval_capacity_factor`={capacity} < "
            f"`num_experts` / `num_experts_per_tok` = {config.num_experts / config.num_experts_per_tok:g}), "
            "while native MoE layers are dropless",
            "set `eval_capacity_factor=None` (dropless inference) in config.json, which changes the outputs "
            "wherever the limit bound"))
    if getattr(config, "router_bias_update_rate", 0):
        blockers.append(Blocker(
            f"a router selection bias (auxiliary-loss-free balancing, `router_bias_update_rate`="
            f"{config.router_bias_update_rate}, tensors `mlp.gate.e_score_correction_bias`): the native routers choose "
            "experts by probability alone"))
    if config.routing_kind == EXPERT_CHOICE_ROUTING:
        blockers.append(Blocker(
            "expert-choice routing (`router_type`='expert_choice': experts pick tokens, a token gets a variable "
            "number of experts; at inference per-expert thresholds `mlp.gate.expert_choice_threshold`): every native "
            "MoE architecture routes each token to a fixed top-k"))
    if config.router_type == "noisy_topk":
        blockers.append(Blocker(
            "noisy top-k router weights (`router_type`='noisy_topk', tensors `mlp.gate.noise_weight`): the native "
            "routers have no place for them"))
    return blockers


# ------------------------------------------------------------------------------------------------ config fields
def native_decoder_fields(config) -> dict:
    """The decoder fields every target reads with the same meaning, all written explicitly (the targets' defaults
    differ from hf_moe's: Mixtral's `rope_theta` is 1e6, its `rms_norm_eps` 1e-5, Qwen's vocabulary 151936...)."""
    rope_parameters = dict(config.rope_parameters)
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim or config.hidden_size // config.num_attention_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=rope_parameters,
        rms_norm_eps=config.rms_norm_eps,
        attention_dropout=config.attention_dropout,
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        use_cache=config.use_cache,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        num_experts_per_tok=config.num_experts_per_tok,
        router_aux_loss_coef=config.router_aux_loss_coef,
        output_router_logits=config.output_router_logits,
    )


TRAINING_ONLY_FIELDS = {
    # field: (value that means "off", what it does) -- none of these changes an inference forward pass.
    "capacity_factor": (None, "training-time capacity limit"),
    "router_jitter_noise": (0.0, "router input jitter while training"),
    "expert_dropout": (0.0, "dropout inside the experts while training"),
    "router_z_loss_coef": (0.0, "router z-loss weight"),
    "router_sequence_aux_loss_coef": (0.0, "sequence-wise balance loss weight"),
    "straight_through_topk": (False, "straight-through gradient of renormalised top-k weights"),
    "initializer_scale": (None, "Switch-style initialisation"),
}


def dropped_training_settings(config) -> list[str]:
    """hf_moe training settings the native configs have no field for (they do not change inference outputs)."""
    return [f"`{field}`={getattr(config, field)!r} ({meaning})"
            for field, (off, meaning) in TRAINING_ONLY_FIELDS.items() if getattr(config, field) != off]


# ------------------------------------------------------------------------------------------------ targets
class ExportTarget:
    """One native architecture. Subclasses set the names and implement `blockers` and `config_fields`."""

    name: str  # the target's model_type
    architecture: str  # its causal-LM class, written to config.json `architectures`
    sparse_block: str = "mlp"  # module name of the sparse block on disk
    expert_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert gate, up, down

    def blockers(self, config) -> list[Blocker]:
        raise NotImplementedError

    def config_fields(self, config) -> dict:
        raise NotImplementedError

    def supports(self, config) -> list[Blocker]:
        """Everything that stops an exact export of `config` to this target (empty: exportable)."""
        return common_blockers(config) + self.blockers(config)

    def target_config(self, config) -> PreTrainedConfig:
        target = AutoConfig.for_model(self.name, **native_decoder_fields(config), **self.config_fields(config))
        target.architectures = [self.architecture]
        return target

    def map_tensor(self, name: str, tensor: torch.Tensor, config) -> Iterator[tuple[str, torch.Tensor]]:
        """The target's tensors for one hf_moe tensor: routers renamed, fused experts split per expert (the
        layout of the Mixtral / Qwen-MoE checkpoints on the Hub), everything else unchanged."""
        if match := ROUTER_WEIGHT.fullmatch(name):
            yield f"{match['layer']}.{self.sparse_block}.gate.weight", tensor
            yield from self.extra_sparse_block_tensors(match["layer"], tensor, config)
        elif match := EXPERTS_WEIGHT.fullmatch(name):
            gate, up, down = self.expert_projections
            prefix = f"{match['layer']}.{self.sparse_block}.experts"
            if match["proj"] == "gate_up_proj":  # (E, 2I, H): rows [0, I) gate, [I, 2I) up (hf_moe's chunk order)
                intermediate = tensor.shape[1] // 2
                for expert in range(tensor.shape[0]):
                    yield f"{prefix}.{expert}.{gate}.weight", tensor[expert, :intermediate]
                    yield f"{prefix}.{expert}.{up}.weight", tensor[expert, intermediate:]
            else:  # (E, H, I): each expert's down projection is already an nn.Linear weight
                for expert in range(tensor.shape[0]):
                    yield f"{prefix}.{expert}.{down}.weight", tensor[expert]
        elif match := SHARED_EXPERTS_WEIGHT.fullmatch(name):
            yield from self.map_shared_experts(match["layer"], match["proj"], tensor)
        else:
            yield name, tensor

    def extra_sparse_block_tensors(self, layer: str, router: torch.Tensor, config
                                   ) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors the target's sparse block needs that hf_moe has no counterpart for (none by default)."""
        return iter(())

    def map_shared_experts(self, layer: str, projection: str, tensor: torch.Tensor
                           ) -> Iterator[tuple[str, torch.Tensor]]:
        raise ExportRefusedError(f"{self.name} has no shared experts ({layer}.mlp.shared_experts)")
