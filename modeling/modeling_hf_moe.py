"""The hf_moe decoders: top-k MoE (`hf_moe`), Switch (`hf_switch`) and Multi-Head MoE (`hf_mh_moe`).

One Llama-family decoder (RMSNorm, RoPE, grouped-query attention with optional q/k norm, biases and sliding window,
SwiGLU) is written once; the three architectures differ only in the sparse block that replaces the MLP of the sparse
layers. Read top to bottom: norm -> rotary -> attention -> dense MLP -> experts -> sparse blocks -> decoder layer ->
pretrained base -> model -> heads. The routers and their losses are in `routing_hf_moe.py`, the experts' matmul
kernels in `experts_kernels_hf_moe.py`.

This file is copied next to the weights by `save_pretrained` and loaded as remote code with those two and the
configuration file, so it imports only torch, transformers and them. It holds no training-loop state: the optimizer
step of global-batch balancing is a hook that hf_moe's training add-ons install (`MoeForCausalLM.optimizer_step_hook`).
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_hf_moe import EXPERT_CHOICE_ROUTING, MHMoeConfig, MoeConfig, SwitchConfig
from .experts_kernels_hf_moe import cpu_swiglu_experts, grouped_matmul
from .routing_hf_moe import (
    ROUTERS,
    MoeExpertChoiceRouter,
    MoeRouter,
    MoeTopKRouter,
    RouterLosses,
    chosen_experts,
    drop_over_capacity,
    expert_choice_selection,
    expert_dispatch_counts,
    forward_trains,
    load_balancing_loss,
    router_losses,
    router_z_loss,
    sequence_balance_loss,
    share_of_accumulated_batch,
)

logger = logging.get_logger(__name__)

# ------------------------------------------------------------------------------------------------ norm and rotary
# RMSNorm, RoPE (`rope_parameters`, rope scaling through `ROPE_INIT_FUNCTIONS`), `repeat_kv` and eager attention are
# Llama's, the same math in every supported transformers (5.23 to 5.25): imported, not copied. Subclasses keep the
# hf_moe module names in the model's repr and parameter names unchanged (`weight`).
class MoeRMSNorm(LlamaRMSNorm):
    pass


class MoeRotaryEmbedding(LlamaRotaryEmbedding):
    pass


# ------------------------------------------------------------------------------------------------ attention
class MoeAttention(nn.Module):
    """Grouped-query attention with the options of the Llama family: q/k/v bias (Qwen2), q/k norm (Qwen3), sliding
    window (Mistral)."""

    def __init__(self, config: MoeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_output_bias)
        if config.use_qk_norm:
            self.q_norm = MoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = MoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if is_sliding else None

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape)  # (batch, seq, heads, head_dim)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        if self.config.use_qk_norm:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (batch, heads, seq, head_dim)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


# ------------------------------------------------------------------------------------------------ dense MLP
class MoeMLP(nn.Module):
    """Dense SwiGLU MLP: the FFN of the dense layers, and the always-active shared experts."""

    def __init__(self, config: MoeConfig, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# ------------------------------------------------------------------------------------------------ experts
@use_experts_implementation
class MoeExperts(nn.Module):
    """E SwiGLU experts stored as fused 3-D tensors: `gate_up_proj (E, 2I, H)` and `down_proj (E, H, I)`.

    The names and layout are transformers' (Mixtral, Qwen-MoE), so its experts backends (`batched_mm`,
    `grouped_mm`, ...), FP8, peft `target_parameters` and the tensor/expert-parallel plans apply. The own ("eager")
    forward below is hf_moe's default: sort the assignments by expert, one grouped matmul per projection (on CPU:
    `CpuSwiGLUExperts` of `experts_kernels_hf_moe.py`), scatter back (see scripts/benchmark.py for its speed against
    transformers' backends and a dense MLP).
    """

    def __init__(self, config: MoeConfig, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(config.num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, hidden_size, intermediate_size))
        self.hidden_act = config.hidden_act
        self.act_fn = ACT2FN[config.hidden_act]
        self.expert_dropout = config.expert_dropout

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        """SwiGLU, plus expert dropout (Switch Table 4); every experts backend calls this."""
        gate, up = gate_up_out.chunk(2, dim=-1)  # (assignments, I) each
        hidden = self.act_fn(gate) * up
        if self.training and self.expert_dropout > 0:
            hidden = F.dropout(hidden, p=self.expert_dropout)
        return hidden

    def _use_cpu_swiglu(self, expert_inputs: torch.Tensor) -> bool:
        """CPU eager SwiGLU without expert dropout on plain (not distributed) tensors: see `CpuSwiGLUExperts`."""
        weights = (self.gate_up_proj, self.down_proj)
        return (expert_inputs.device.type == "cpu" and self.hidden_act == "silu"
                and not (self.training and self.expert_dropout > 0) and not torch.compiler.is_compiling()
                and all(type(w) in (torch.Tensor, nn.Parameter) for w in weights)
                and self.gate_up_proj.shape[0] == self.num_experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None, *, selection: torch.Tensor | None = None,
                selection_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Token choice: `top_k_index (tokens, k)` and `top_k_weights (tokens, k)` (transformers' experts interface).
        Expert choice: `selection (tokens, E)` bool, the experts that took each token, and `selection_weights
        (tokens, E)`. Both enter through this method, so wrappers of the experts' forward (peft's `target_parameters`
        LoRA) apply to either."""
        if selection is not None:
            # The (expert, token) pairs come out of `nonzero` already grouped by expert, so no sort is needed; the
            # group sizes are data-dependent (eager only: the models switch off full-graph compilation for it).
            expert_of_assignment, token_of_assignment = selection.t().nonzero(as_tuple=True)
            return self._run_sorted(hidden_states, token_of_assignment, selection.sum(0),
                                    selection_weights[token_of_assignment, expert_of_assignment])
        top_k = top_k_index.shape[-1]
        expert_of_assignment = top_k_index.reshape(-1)  # (tokens * k,)
        order = expert_of_assignment.argsort(stable=True)  # assignments grouped by expert
        token_of_assignment = order // top_k  # (tokens * k,)
        # A fixed-size count (bincount's output size depends on the data, which torch.compile cannot trace).
        tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.long, device=top_k_index.device).index_add_(
            0, expert_of_assignment, torch.ones_like(expert_of_assignment))
        return self._run_sorted(hidden_states, token_of_assignment, tokens_per_expert,
                                top_k_weights.reshape(-1)[order])

    def _run_sorted(self, hidden_states: torch.Tensor, token_of_assignment: torch.Tensor,
                    tokens_per_expert: torch.Tensor, combine_weights: torch.Tensor) -> torch.Tensor:
        """The experts on assignments grouped by expert: `token_of_assignment (A,)`, `tokens_per_expert (E,)`,
        `combine_weights (A,)`; returns the weighted sum per token `(tokens, H)`."""
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)  # (E,)
        expert_inputs = hidden_states.index_select(0, token_of_assignment)  # (A, H), sorted by expert
        if self._use_cpu_swiglu(expert_inputs):
            expert_outputs = cpu_swiglu_experts(expert_inputs, self.gate_up_proj, self.down_proj, offsets)
        else:
            gate_up = grouped_matmul(expert_inputs, self.gate_up_proj.transpose(1, 2), offsets)  # (A, 2I)
            expert_outputs = grouped_matmul(self._apply_gate(gate_up), self.down_proj.transpose(1, 2), offsets)
        weighted = (expert_outputs * combine_weights[:, None].to(expert_outputs.dtype)).to(hidden_states.dtype)
        return torch.zeros_like(hidden_states).index_add_(0, token_of_assignment, weighted)  # (tokens, H)


# ------------------------------------------------------------------------------------------------ sparse blocks
def _route_and_run(block: nn.Module, rows: torch.Tensor, row_mask: torch.Tensor | None, group_size: int,
                   continues_cache: bool = False) -> torch.Tensor:
    """Route `rows (rows, d)` and run the experts on them, in the form the block's routing kind takes. The kind's
    router class hands the assignment over (read from the class: peft may wrap the `gate` module itself)."""
    _, weights, chosen = block.gate(rows, row_mask, group_size, continues_cache)
    return ROUTERS[block.routing_kind].run_experts(block.experts, rows, weights, chosen)


class MoeSparseBlock(nn.Module):
    """Top-k MoE and Switch: `gate` routes each token to k of `experts`; optional always-active shared experts."""

    def __init__(self, config: MoeConfig):
        super().__init__()
        self.routing_kind = config.routing_kind
        self.gate = ROUTERS[config.routing_kind](config, config.hidden_size)
        self.experts = MoeExperts(config, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = None
        if config.num_shared_experts > 0:
            shared_size = config.num_shared_experts * config.moe_intermediate_size
            self.shared_experts = MoeMLP(config, config.hidden_size, shared_size)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None,
                continues_cache: bool = False) -> torch.Tensor:
        """`token_mask (batch, seq)` bool marks the real tokens (see `drop_over_capacity`); None: all are real.
        `continues_cache`: the tokens follow cached ones (see `MoeExpertChoiceRouter.forward`)."""
        input_shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, input_shape[-1])  # (tokens, d)
        row_mask = token_mask.reshape(-1) if token_mask is not None else None
        output = _route_and_run(self, tokens, row_mask, input_shape[1], continues_cache)
        if self.shared_experts is not None:
            output = output + self.shared_experts(tokens)
        return output.reshape(input_shape)


class MHMoeSparseBlock(nn.Module):
    """Multi-Head MoE (arXiv 2404.15045, Sec. 3 and Algorithm 1).

    head projection (d -> d) -> split each token into h sub-tokens of width d/h -> route each sub-token to its
    top-k experts (acting on d/h) -> merge the sub-tokens back in their original order -> merge projection (d -> d).
    The decoder layer adds the residual.
    """

    def __init__(self, config: MHMoeConfig):
        super().__init__()
        self.num_heads = config.num_moe_heads
        self.sub_token_size = config.hidden_size // config.num_moe_heads
        self.head_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.routing_kind = config.routing_kind
        self.gate = ROUTERS[config.routing_kind](config, self.sub_token_size)
        self.experts = MoeExperts(config, self.sub_token_size, config.moe_intermediate_size)
        self.merge_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.shared_experts = None
        if config.num_shared_experts > 0:
            shared_size = config.num_shared_experts * config.moe_intermediate_size
            self.shared_experts = MoeMLP(config, config.hidden_size, shared_size)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None,
                continues_cache: bool = False) -> torch.Tensor:
        """`token_mask (batch, seq)` bool marks the real tokens; each one's h sub-tokens share its flag.
        `continues_cache`: the tokens follow cached ones (see `MoeExpertChoiceRouter.forward`)."""
        input_shape = hidden_states.shape
        sub_tokens = self.head_proj(hidden_states).reshape(-1, self.sub_token_size)  # (tokens * h, d / h)
        row_mask = token_mask.reshape(-1).repeat_interleave(self.num_heads) if token_mask is not None else None
        routed = _route_and_run(self, sub_tokens, row_mask, input_shape[1] * self.num_heads, continues_cache)
        merged = routed.reshape(input_shape)  # (batch, seq, d)
        output = self.merge_proj(merged)
        if self.shared_experts is not None:
            output = output + self.shared_experts(hidden_states)
        return output


# By model type, not config class: a remote-code load may hold its own copy of the config classes.
SPARSE_BLOCKS = {"hf_moe": MoeSparseBlock, "hf_switch": MoeSparseBlock, "hf_mh_moe": MHMoeSparseBlock}


# ------------------------------------------------------------------------------------------------ cache argument
# transformers 5.24 renamed `past_key_values` to `cache`: the mask builders' and layers' argument and the output
# field (the old names still work there but log a deprecation message). This file runs as remote code in the user's
# transformers, so it speaks whichever name the installed version uses.
_MASK_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
_CACHE_NAME = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _deprecates_old_cache_name(forward: Callable) -> Callable:
    """Where transformers has renamed the cache argument (>= 5.24), `forward(past_key_values=...)` is passed on as
    `cache=` with the deprecation warning of the built-in models: transformers' own decorator, with the removal version
    the built-ins name. Where `past_key_values` is still the current name (5.23), `forward` is returned unchanged."""
    if _CACHE_NAME != "cache":
        return forward
    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)


def _cache_argument(cache, kwargs: dict):
    """The KV cache, whichever name the caller used: transformers 5.23 passes `past_key_values=` (on >= 5.24
    `_deprecates_old_cache_name` has already renamed it)."""
    past_key_values = kwargs.pop("past_key_values", None)
    return cache if cache is not None else past_key_values


# ------------------------------------------------------------------------------------------------ decoder
class MoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MoeAttention(config, layer_idx)
        if layer_idx in config.sparse_layer_indices:
            self.mlp = SPARSE_BLOCKS[config.model_type](config)
        else:
            self.mlp = MoeMLP(config, config.hidden_size, config.intermediate_size)
        self.is_sparse = layer_idx in config.sparse_layer_indices
        self.input_layernorm = MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @_deprecates_old_cache_name
    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, token_mask=None, continues_cache=False, **kwargs) -> torch.Tensor:
        cache = _cache_argument(cache, kwargs)
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        mlp_input = self.post_attention_layernorm(hidden_states)
        mlp_output = self.mlp(mlp_input, token_mask, continues_cache) if self.is_sparse else self.mlp(mlp_input)
        return hidden_states + mlp_output


@dataclass
class MoeCausalLMOutput(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus the loss terms separately.

    `loss = lm_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss
    (+ router_sequence_aux_loss_coef * sequence_aux_loss)` when labels are given; `sequence_aux_loss` is computed only
    when its coefficient is > 0.
    """

    lm_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    sequence_aux_loss: torch.Tensor | None = None


def real_token_mask(attention_mask, batch_size: int, seq_len: int, past_seen_tokens) -> torch.Tensor | None:
    """`(batch, seq)` bool: which tokens of this forward call are real (not padding), from the mask the model got.

    - 2-D padding mask `(batch, past + seq)`: its last `seq` columns.
    - 4-D mask `(batch, 1, seq, kv)` (a custom one, or the one `generate` prepares for a static cache): a token is
      real when it may attend to itself; padding is masked as a key for every query, its own included. Its key
      column is `past_seen_tokens + i` (also for a static cache, whose columns are absolute positions). Boolean
      masks allow with True, additive float masks with 0.
    - None or a flex-attention BlockMask: None (every token is real; packed sequences have no padding).
    """
    if isinstance(attention_mask, dict):  # `generate` may pass the per-layer-type masks it prepared
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
    if not isinstance(attention_mask, torch.Tensor):
        return None
    if attention_mask.dim() == 2:
        return attention_mask[:, -seq_len:].bool().expand(batch_size, seq_len)
    if attention_mask.dim() != 4:
        return None
    query = torch.arange(seq_len, device=attention_mask.device)
    self_entry = attention_mask[:, 0, query, query + past_seen_tokens]  # (batch or 1, seq)
    allowed = self_entry if self_entry.dtype == torch.bool else self_entry == 0
    return allowed.expand(batch_size, seq_len)


class MoePreTrainedModel(PreTrainedModel):
    config: MoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoeDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Static shapes throughout (expert group sizes live in tensors, transformers' grouped-mm dispatcher picks a
    # traceable kernel), so a static cache and `torch.compile(fullgraph=True)` decoding work.
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "router_logits": [OutputRecorder(MoeTopKRouter, index=0), OutputRecorder(MoeExpertChoiceRouter, index=0)],
        "hidden_states": MoeDecoderLayer,
        "attentions": MoeAttention,
    }

    # `save_pretrained` copies this file and its configuration next to the weights and writes `auto_map`.
    _auto_class = "AutoModel"

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        config = self.config
        if isinstance(module, MoeExperts):
            for weight in (module.gate_up_proj, module.down_proj):
                self._init_matrix(weight, fan_in=weight.shape[-1])
        elif isinstance(module, MoeRouter):
            self._init_matrix(module.weight, fan_in=module.weight.shape[-1])
            if module.noise_weight is not None:
                init.zeros_(module.noise_weight)  # Shazeer et al. 2017, App. A: start without noise
            if module.e_score_correction_bias is not None:
                init.zeros_(module.e_score_correction_bias)  # a new bias starts neutral
            if isinstance(module, MoeExpertChoiceRouter):  # not estimated yet
                init.zeros_(module.expert_choice_threshold)
                init.zeros_(module.expert_choice_threshold_updates)
        elif isinstance(module, MHMoeSparseBlock):
            # arXiv 2404.15045, Algorithm 1.
            init.xavier_uniform_(module.head_proj.weight, gain=2**-0.5)
            init.xavier_uniform_(module.merge_proj.weight)
            init.zeros_(module.head_proj.bias)
            init.zeros_(module.merge_proj.bias)
        elif isinstance(module, nn.Linear) and config.initializer_scale is not None:
            self._init_matrix(module.weight, fan_in=module.weight.shape[-1])

    def _init_matrix(self, weight: torch.Tensor, fan_in: int) -> None:
        """normal(0, initializer_range), or the Switch init: truncated normal, std sqrt(initializer_scale / fan_in)."""
        if self.config.initializer_scale is None:
            init.normal_(weight, mean=0.0, std=self.config.initializer_range)
        else:
            std = (self.config.initializer_scale / fan_in) ** 0.5
            init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # transformers defaults to its "grouped_mm" backend; the experts' own forward is faster for these models
        # (README, benchmark table), so it is the default here. Any registered backend can still be requested...
        if self.config.routing_kind == EXPERT_CHOICE_ROUTING and requested_experts not in (None, "eager"):
            # ...except with expert choice: transformers' backends take (tokens, k) assignments, not a selection.
            raise ValueError(f"`experts_implementation`={requested_experts!r} is invalid with "
                             "`router_type`='expert_choice': only 'eager' (the experts' own forward) takes "
                             "expert-choice selections")
        return super().get_correct_experts_implementation("eager" if requested_experts is None else requested_experts)

    def post_init(self):
        super().post_init()
        if self.config.routing_kind == EXPERT_CHOICE_ROUTING:
            self._can_compile_fullgraph = False  # expert group sizes are data-dependent (`MoeExperts.forward`)

    def set_expert_choice_eval_rule(self, rule: str) -> None:
        """Expert-choice routing outside training: "threshold" (causal, the default) or "batch" (the training
        selection over the forward call's tokens: not causal; for measuring the gap between the two)."""
        self.config.expert_choice_eval_rule = rule
        self.config.validate()
        for module in self.modules():
            if isinstance(module, MoeExpertChoiceRouter):
                module.eval_rule = rule

    def set_router_bias_update_rate(self, rate: float) -> None:
        """Switch auxiliary-loss-free balancing on or off: sets `config.router_bias_update_rate`; with `rate` > 0
        every router without a selection bias gets a zero one (existing biases are kept), with 0 the biases are
        removed and routing goes by the probabilities alone again."""
        self.config.router_bias_update_rate = rate
        self.config.validate()
        for module in self.modules():
            if isinstance(module, MoeRouter):
                if rate > 0:
                    module.add_selection_bias()
                else:
                    module.e_score_correction_bias = None

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers writes only the saved class into `auto_map`; list every head so that all Auto classes load
        # the folder as remote code.
        self.config.auto_map = auto_map_for(type(self.config))
        return super().save_pretrained(save_directory, *args, **kwargs)


class MoeModel(MoePreTrainedModel):
    def __init__(self, config: MoeConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MoeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @_deprecates_old_cache_name
    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, use_cache=None, **kwargs) -> MoeModelOutputWithPast:
        cache = _cache_argument(cache, kwargs)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_seen_tokens = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)
        # Only expert capacity and expert choice need to know the padding; dropless top-k treats every row alike.
        expert_choice = self.config.routing_kind == EXPERT_CHOICE_ROUTING
        token_mask = None
        if self.config.capacity_factor is not None or self.config.eval_capacity_factor is not None or expert_choice:
            token_mask = real_token_mask(attention_mask, *inputs_embeds.shape[:2], past_seen_tokens)
        # Expert choice routes a decoding step (tokens after cached ones) without gradients as at inference.
        continues_cache = expert_choice and bool(past_seen_tokens)

        if not isinstance(mask_mapping := attention_mask, dict):  # `generate` may have prepared them already
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                _MASK_CACHE_ARGUMENT: cache,
                "position_ids": position_ids,
            }
            mask_mapping = {"full_attention": create_causal_mask(**mask_kwargs)}
            if "sliding_attention" in self.config.layer_types:
                mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer_idx, decoder_layer in enumerate(self.layers):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask_mapping[self.config.layer_types[layer_idx]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=use_cache,
                token_mask=token_mask,
                continues_cache=continues_cache,
                **{_CACHE_NAME: cache},  # the name GradientCheckpointingLayer looks for to drop the cache
                **kwargs,
            )
        return MoeModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states),
            **{_CACHE_NAME: cache if use_cache else None},
        )


def _local_router_tokens(attention_mask, input_shape: torch.Size) -> torch.Tensor | int:
    """Tokens of this forward call that the routers count (non-padding), as the optimizer step counts them."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return attention_mask[:, -input_shape[1]:].sum()
    return input_shape[0] * input_shape[1]


class MoeForCausalLM(MoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _fsdp_plan = {"lm_head": "keep_full_weight"}  # as Mixtral / Qwen3-MoE: the head is used right after the norm
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _auto_class = "AutoModelForCausalLM"
    base_model_class = MoeModel

    def __init__(self, config: MoeConfig):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @_deprecates_old_cache_name
    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, output_router_logits: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> MoeCausalLMOutput:
        config = self.config
        cache = _cache_argument(cache, kwargs)
        if output_router_logits is None:
            output_router_logits = config.output_router_logits
        # The auxiliary losses are always part of a training loss: a run can never silently train without them.
        need_router_logits = output_router_logits or labels is not None
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=need_router_logits,
            return_dict=True,  # this forward reads the fields; `can_return_tuple` makes the tuple for the caller
            **{_CACHE_NAME: cache},
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))

        loss = lm_loss = router = None
        if need_router_logits:
            router = router_losses(
                config, outputs.router_logits, attention_mask, batch_size=outputs.last_hidden_state.shape[0],
                position_ids=position_ids, selection_biases=self.selection_biases(),
                global_dispatch_fraction=self._global_dispatch_fraction(labels), device=logits.device)
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=config.vocab_size, **kwargs)
            loss = lm_loss + router.weighted * self._share_of_step(labels, attention_mask,
                                                                   outputs.last_hidden_state.shape, kwargs)

        return MoeCausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=router.aux_loss if router else None,
            z_loss=router.z_loss if router else None,
            sequence_aux_loss=router.sequence_aux_loss if router else None,
            logits=logits,
            **{_CACHE_NAME: getattr(outputs, _CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
        )


    def selection_biases(self) -> tuple[torch.Tensor | None, ...] | None:
        """The routers' selection biases in layer order (auxiliary-loss-free balancing), or None without any."""
        biases = tuple(layer.mlp.gate.e_score_correction_bias for layer in self.model.layers if layer.is_sparse)
        return biases if any(bias is not None for bias in biases) else None

    # The optimizer step a training forward belongs to: global-batch balancing counts f_e over the step's micro-batches
    # and processes, and the aux terms are weighted by the micro-batch's share of the step's router tokens. That is
    # state across forward calls and collectives across processes, which belong to the training loop, not to this file:
    # hf_moe's training add-ons (`hf_moe.training.optimizer_step`) install an object here with
    # `dispatch_fraction(counts (layers, E)) -> f_e (layers, E)` and `share_of_step(router_tokens) -> weight or None`.
    optimizer_step_hook = None

    def _global_dispatch_fraction(self, labels) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The optimizer-step hook's f_e for global-batch balancing in a training forward, else None (f_e of the
        call's own tokens)."""
        if self.config.router_aux_loss_scope != "global_batch" or not forward_trains(self) or labels is None:
            return None  # the step's counts and the collectives only in training forwards, which every process runs
        if self.optimizer_step_hook is None:
            logger.warning_once("router_aux_loss_scope='global_batch' needs the optimizer step of hf_moe's training "
                                "add-ons (hf_moe.training.OptimizerStepCallback, or begin_optimizer_step in a plain "
                                "loop); without them the load-balancing loss counts f_e over each forward call's "
                                "tokens (micro-batch scope)")
            return None
        return self.optimizer_step_hook.dispatch_fraction

    def _share_of_step(self, labels, attention_mask, hidden_shape, loss_kwargs) -> torch.Tensor | float:
        """This micro-batch's weight for the aux and z-loss (its share of the step's router tokens if known)."""
        share = None
        if self.training and self.optimizer_step_hook is not None:
            share = self.optimizer_step_hook.share_of_step(_local_router_tokens(attention_mask, hidden_shape))
        return share_of_accumulated_batch(labels, loss_kwargs.get("num_items_in_batch")) if share is None else share


class MoeForSequenceClassification(GenericForSequenceClassification, MoePreTrainedModel):
    _auto_class = "AutoModelForSequenceClassification"
    base_model_class = MoeModel

    def __init__(self, config: MoeConfig):
        # GenericForSequenceClassification builds its body with AutoModel, which a remote-code load cannot resolve
        # without trust_remote_code; build it directly instead.
        MoePreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = self.base_model_class(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


# ------------------------------------------------------------------------------------------------ Switch, MH-MoE
class SwitchPreTrainedModel(MoePreTrainedModel):
    config: SwitchConfig


class SwitchModel(SwitchPreTrainedModel, MoeModel):
    pass


class SwitchForCausalLM(SwitchPreTrainedModel, MoeForCausalLM, GenerationMixin):
    base_model_class = SwitchModel


class SwitchForSequenceClassification(SwitchPreTrainedModel, MoeForSequenceClassification):
    base_model_class = SwitchModel


class MHMoePreTrainedModel(MoePreTrainedModel):
    config: MHMoeConfig


class MHMoeModel(MHMoePreTrainedModel, MoeModel):
    pass


class MHMoeForCausalLM(MHMoePreTrainedModel, MoeForCausalLM, GenerationMixin):
    base_model_class = MHMoeModel


class MHMoeForSequenceClassification(MHMoePreTrainedModel, MoeForSequenceClassification):
    base_model_class = MHMoeModel


# ------------------------------------------------------------------------------------------------ registry
MODEL_CLASSES = {
    MoeConfig: {"AutoModel": MoeModel, "AutoModelForCausalLM": MoeForCausalLM,
                "AutoModelForSequenceClassification": MoeForSequenceClassification},
    SwitchConfig: {"AutoModel": SwitchModel, "AutoModelForCausalLM": SwitchForCausalLM,
                   "AutoModelForSequenceClassification": SwitchForSequenceClassification},
    MHMoeConfig: {"AutoModel": MHMoeModel, "AutoModelForCausalLM": MHMoeForCausalLM,
                  "AutoModelForSequenceClassification": MHMoeForSequenceClassification},
}


def auto_map_for(config_class: type) -> dict[str, str]:
    """The `auto_map` of a saved folder: every Auto class -> `module.Class`, as remote code resolves it."""
    def reference(cls):
        return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"

    auto_map = {"AutoConfig": reference(config_class)}
    auto_map.update({auto: reference(cls) for auto, cls in MODEL_CLASSES[config_class].items()})
    return auto_map


__all__ = [
    "MoePreTrainedModel", "MoeModel", "MoeForCausalLM", "MoeForSequenceClassification",
    "SwitchPreTrainedModel", "SwitchModel", "SwitchForCausalLM", "SwitchForSequenceClassification",
    "MHMoePreTrainedModel", "MHMoeModel", "MHMoeForCausalLM", "MHMoeForSequenceClassification",
    "MoeCausalLMOutput", "MODEL_CLASSES",
    # The routing names of `routing_hf_moe.py`, importable from the model's module as well.
    "load_balancing_loss", "router_z_loss", "sequence_balance_loss", "drop_over_capacity", "chosen_experts",
    "expert_dispatch_counts", "expert_choice_selection", "router_losses", "RouterLosses", "share_of_accumulated_batch",
]
