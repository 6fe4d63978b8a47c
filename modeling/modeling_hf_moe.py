"""The hf_moe decoders: top-k MoE (`hf_moe`), Switch (`hf_switch`) and Multi-Head MoE (`hf_mh_moe`).

One Llama-family decoder (RMSNorm, RoPE, grouped-query attention with optional q/k norm, biases and sliding window,
SwiGLU) is written once; the three architectures differ only in the sparse block that replaces the MLP of the sparse
layers. Read top to bottom: norm -> rotary -> attention -> dense MLP -> routing and its losses -> experts ->
sparse blocks -> decoder layer -> pretrained base -> model -> heads.

This file is copied next to the weights by `save_pretrained` and loaded as remote code, so it imports only torch,
transformers and its own configuration file.
"""

import inspect
import math
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

from .configuration_hf_moe import EXPERT_CHOICE_ROUTING, TOP_K_ROUTING, MHMoeConfig, MoeConfig, SwitchConfig
from .experts_kernels_hf_moe import cpu_swiglu_experts, grouped_matmul

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


# ------------------------------------------------------------------------------------------------ routing
def drop_over_capacity(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int,
                       capacity_factor: float, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Zero the combine weight of the assignments that overflow their expert's capacity.

    Capacity = `ceil(capacity_factor * assignments / num_experts)` (Switch Transformer Sec. 2.2). Queues fill in
    slot-major order, so every token's first choice is served before any second choice (GShard), and in token order
    within a slot. A dropped assignment keeps a valid expert index with weight 0: the expert output for it is 0 and
    the residual connection carries the token on.

    `token_mask (tokens,)` marks the real tokens: padding takes no place in any queue (its weights are zeroed) and
    the capacity counts real tokens only, so a padded batch routes its real tokens exactly as the same tokens
    unpadded. Without a mask every token is real. Shapes stay static (no data-dependent sizes) for torch.compile.
    """
    num_tokens, top_k = top_k_index.shape
    if token_mask is None:
        capacity = max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))
    else:
        # The same float64 expression as above, on the real-token count (a tensor: no host sync, traceable).
        num_real = token_mask.sum().to(torch.float64)
        capacity = torch.ceil(capacity_factor * num_real * top_k / num_experts).clamp(min=1)
    slot_major = top_k_index.t().reshape(-1)  # (k * tokens,)
    one_hot = F.one_hot(slot_major, num_experts)  # (k * tokens, experts)
    if token_mask is not None:
        one_hot = one_hot * token_mask.repeat(top_k).unsqueeze(-1)  # padding rows join no queue
    position_in_expert = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # (k * tokens,); -1 for padding
    keep = (position_in_expert < capacity).reshape(top_k, num_tokens).t()  # (tokens, k)
    if token_mask is not None:
        keep = keep & token_mask.unsqueeze(-1)
    return top_k_weights * keep


def expert_choice_selection(scores: torch.Tensor, capacity_factor: float, group_size: int | None = None,
                            token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Expert-choice selection (Zhou et al., arXiv 2202.09368): every expert takes the C rows of highest
    score in each selection group, `C = ceil(capacity_factor * real rows of the group / experts)` (at most the group's
    real rows).

    `scores (rows, E)`: the token-to-expert affinities (softmax over the experts). `group_size`: rows per group
    (consecutive rows; None: all rows form one group). `token_mask (rows,)` bool marks real rows: padding is never
    selected and does not count towards C. Returns `(selected (rows, E) bool, cutoff (E,))`, the cutoff being each
    expert's C-th highest score averaged over the groups with real rows (None when no row is real).
    """
    num_rows, num_experts = scores.shape
    group_size = num_rows if group_size is None else group_size
    grouped = scores.reshape(-1, group_size, num_experts)  # (groups, group_size, E)
    real = (torch.ones(grouped.shape[:2], dtype=torch.bool, device=scores.device) if token_mask is None
            else token_mask.reshape(-1, group_size).bool())
    num_real = real.sum(1)  # (groups,)
    capacity = torch.ceil(capacity_factor * num_real.double() / num_experts).long().clamp(min=1).minimum(num_real)
    largest = int(capacity.max())  # data-dependent top-k size: one host sync per router call
    if largest == 0:
        return torch.zeros_like(scores, dtype=torch.bool), None
    masked = grouped.masked_fill(~real.unsqueeze(-1), float("-inf"))
    values, index = masked.topk(largest, dim=1)  # (groups, largest, E): each expert's best rows
    rank = torch.arange(largest, device=scores.device).reshape(1, -1, 1)
    keep = rank < capacity.reshape(-1, 1, 1)  # (groups, largest, 1): ranks within the group's capacity
    selected = torch.zeros_like(grouped, dtype=torch.bool).scatter_(1, index, keep.expand_as(index))
    last = (capacity - 1).clamp(min=0).reshape(-1, 1, 1).expand(-1, 1, num_experts)
    cutoffs = values.gather(1, last).squeeze(1)  # (groups, E)
    has_rows = num_real > 0
    return selected.reshape(num_rows, num_experts), cutoffs[has_rows].mean(0)


def forward_trains(module: nn.Module) -> bool:
    """Whether a forward of `module` trains: train mode with gradients. Only such a forward may update training
    state (expert-choice thresholds, the optimizer step's expert counts); RL trainers generate and score with the
    policy in train mode under `torch.no_grad()`."""
    return module.training and torch.is_grad_enabled()


class MoeRouter(nn.Module):
    """What every hf_moe router shares: the router weight `weight (E, d)`, logits in at least float32 (Switch Sec. 2.4,
    selective precision), multiplicative jitter on the input (`router_jitter_noise`), the noisy top-k gate
    (`router_type="noisy_topk"`, Shazeer et al. 2017, eq. 4: `x W_g + N(0, 1) * softplus(x W_noise)`) and the slot of
    the selection bias `e_score_correction_bias (E,)` (float32, no gradient; see `MoeTopKRouter`).

    Subclasses set `routing_kind` (what their outputs mean, see `configuration_hf_moe.TOP_K_ROUTING`) and return
    `(router_logits (tokens, E) float32, weights, chosen)` from `forward(hidden_states, token_mask, group_size,
    continues_cache)`; the logits are the clean ones (no noise), which the losses read. `run_experts` hands the
    routing to the experts in the form they take for that kind.
    """

    routing_kind: str

    def __init__(self, config: MoeConfig, input_size: int):
        super().__init__()
        self.num_experts = config.num_experts
        self.jitter_noise = config.router_jitter_noise
        self.weight = nn.Parameter(torch.empty(config.num_experts, input_size))
        self.noise_weight = (
            nn.Parameter(torch.empty(config.num_experts, input_size)) if config.router_type == "noisy_topk" else None
        )
        self.register_buffer("e_score_correction_bias", None)  # a slot: saved once it holds a tensor
        if config.router_bias_update_rate > 0:
            self.add_selection_bias()

    @property
    def expert_choice(self) -> bool:
        """Whether the experts choose their tokens (`routing_kind` as a flag)."""
        return self.routing_kind == EXPERT_CHOICE_ROUTING

    # Router state that small steps move (the selection bias by gamma ~ 1e-3, the thresholds by momentum * change):
    # below a bfloat16 step near 1, so it stays float32 whatever dtype the model is cast to.
    _float32_buffers = ("e_score_correction_bias", "expert_choice_threshold")

    def _apply(self, fn, recurse=True):
        # `Module.to(dtype)`, `.half()` and `.bfloat16()` all go through `_apply`; a float32 buffer takes the
        # device the conversion chose but keeps its float32 values (casting back would have rounded them).
        kept = {name: self._buffers[name] for name in self._float32_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            converted = self._buffers[name]
            if converted.dtype != torch.float32:
                self._buffers[name] = original.to(device=converted.device, dtype=torch.float32)
        return self

    def add_selection_bias(self) -> None:
        """Give the router a zero selection bias (no-op when it has one)."""
        if self.e_score_correction_bias is None:
            self.e_score_correction_bias = torch.zeros(self.num_experts, dtype=torch.float32,
                                                       device=self.weight.device)

    def _logits_and_probs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(router_logits (tokens, E), probs (tokens, E))`: clean logits, and the softmax of the noisy ones."""
        router_dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        router_input = hidden_states.to(router_dtype)  # (tokens, d)
        if self.training and self.jitter_noise > 0:
            router_input = router_input * torch.empty_like(router_input).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
        router_logits = F.linear(router_input, self.weight.to(router_dtype))  # (tokens, E)
        selection_logits = router_logits
        if self.noise_weight is not None and self.training:
            noise_std = F.softplus(F.linear(router_input, self.noise_weight.to(router_dtype)))
            selection_logits = router_logits + torch.randn_like(router_logits) * noise_std
        return router_logits, selection_logits.softmax(dim=-1)


class MoeTopKRouter(MoeRouter):
    """Token choice: top-k of the softmax over the experts, optional renormalisation and capacity.

    Used by all three architectures (Switch: k=1 with capacity; MH-MoE: on sub-tokens of width d/h). Returns
    `(router_logits (tokens, E) float32, top_k_weights (tokens, k), top_k_index (tokens, k))`.

    With `router_bias_update_rate` > 0 the router carries `e_score_correction_bias (E,)`: auxiliary-loss-free
    balancing (arXiv 2408.15664, eq. 3) chooses the top-k of `probs + bias` but weights the chosen experts by their
    unbiased `probs`. The name is the buffer's in transformers' DeepSeek-V3 / GLM-4-MoE routers.
    """

    routing_kind = TOP_K_ROUTING

    def __init__(self, config: MoeConfig, input_size: int):
        super().__init__(config, input_size)
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.straight_through_topk = config.straight_through_topk
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None,
                group_size: int | None = None, continues_cache: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`hidden_states (tokens, d)`; `token_mask (tokens,)` bool marks real tokens for the capacity (None: all).
        `group_size` and `continues_cache` are expert choice's (see `MoeExpertChoiceRouter`), unused here."""
        router_logits, router_probs = self._logits_and_probs(hidden_states)
        if self.e_score_correction_bias is None:
            top_k_weights, top_k_index = router_probs.topk(self.top_k, dim=-1)  # (tokens, k)
        else:  # the bias decides which experts, the unbiased probabilities how much (arXiv 2408.15664, eq. 3)
            top_k_index = (router_probs + self.e_score_correction_bias).topk(self.top_k, dim=-1).indices
            top_k_weights = router_probs.gather(-1, top_k_index)  # (tokens, k)
        if self.norm_topk_prob:
            norm = top_k_weights.sum(dim=-1, keepdim=True)
            # Straight-through: a detached denominator keeps the values but lets top-1 weights (p/p = 1) pass p's
            # gradient to the router (arXiv 2101.03961 Sec. 2.1 on why the router needs that gradient).
            top_k_weights = top_k_weights / (norm.detach() if self.straight_through_topk else norm)
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if capacity_factor is not None:
            top_k_weights = drop_over_capacity(top_k_index, top_k_weights, self.num_experts, capacity_factor,
                                               token_mask)
        return router_logits, top_k_weights.to(hidden_states.dtype), top_k_index

    @staticmethod
    def run_experts(experts: nn.Module, hidden_states: torch.Tensor, top_k_weights: torch.Tensor,
                    top_k_index: torch.Tensor) -> torch.Tensor:
        return experts(hidden_states, top_k_index, top_k_weights)  # transformers' experts interface


class MoeExpertChoiceRouter(MoeRouter):
    """Expert choice (`router_type="expert_choice"`): the experts choose their tokens (see `expert_choice_selection`
    and `MoeConfig`). Returns `(router_logits (tokens, E) float32, weights (tokens, E), selected (tokens, E) bool)`:
    the softmax affinity of every chosen (token, expert) pair, 0 elsewhere.

    Carries `expert_choice_threshold (E,)` (float32), the running estimate of each expert's selection cutoff that routes
    tokens causally outside training, and `expert_choice_threshold_updates` (how many training forwards estimated it;
    0 = never). The model learns its inference rule this way, as BatchNorm learns its running statistics, so the
    estimate is part of the model.
    """

    routing_kind = EXPERT_CHOICE_ROUTING

    def __init__(self, config: MoeConfig, input_size: int):
        super().__init__(config, input_size)
        self.expert_capacity_factor = config.expert_capacity_factor
        self.group_by_sequence = config.expert_choice_group == "sequence"
        self.eval_rule = config.expert_choice_eval_rule
        self.threshold_momentum = config.expert_choice_threshold_momentum
        self.register_buffer("expert_choice_threshold", torch.zeros(config.num_experts, dtype=torch.float32))
        self.register_buffer("expert_choice_threshold_updates", torch.zeros((), dtype=torch.long))

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None,
                group_size: int | None = None, continues_cache: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`hidden_states (tokens, d)`; `token_mask (tokens,)` bool marks real tokens (None: all); `group_size`: rows
        per sequence (selection per sequence); `continues_cache`: the call's tokens follow tokens already in the KV
        cache (a decoding step), so they are not whole sequences.

        Train mode selects by batch, as training does, so that scoring a batch under `torch.no_grad()` (the old and
        reference log-probs of RL trainers) gives the training forward's output; only a forward that trains moves the
        threshold. A decoding step without gradients routes as outside training."""
        router_logits, probs = self._logits_and_probs(hidden_states)
        trains = forward_trains(self)
        if (self.training and (trains or not continues_cache)) or self.eval_rule == "batch":
            selected, cutoff = expert_choice_selection(probs.detach(), self.expert_capacity_factor,
                                                       group_size if self.group_by_sequence else None, token_mask)
            if trains and cutoff is not None:
                self._update_threshold(cutoff)
        elif self.expert_choice_threshold_updates > 0:
            # The causal rule: an expert takes a token when the token's affinity reaches the expert's usual cutoff.
            selected = probs >= self.expert_choice_threshold.to(probs.device)
        else:
            top = max(1, min(round(self.expert_capacity_factor), self.num_experts))
            logger.warning_once(f"expert-choice router without an estimated threshold (never trained): routing each "
                                f"token to its top-{top} experts outside training")
            selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, probs.topk(top, dim=-1).indices, True)
        if token_mask is not None:
            selected = selected & token_mask.unsqueeze(-1).bool()
        weights = probs * selected  # the paper's gating: affinities of the chosen pairs, gradient through probs
        return router_logits, weights.to(hidden_states.dtype), selected

    @torch.no_grad()
    def _update_threshold(self, cutoff: torch.Tensor) -> None:
        """Move the threshold towards this forward's cutoff: a plain average over the first 1/momentum updates, then
        an exponential moving average (as BatchNorm's running statistics). With gradient checkpointing the recomputed
        forward updates again with the same cutoff, which weights that batch twice."""
        count = self.expert_choice_threshold_updates
        rate = torch.clamp(1.0 / (count + 1).float(), min=self.threshold_momentum)
        self.expert_choice_threshold.lerp_(cutoff.to(self.expert_choice_threshold), rate)
        count += 1

    @staticmethod
    def run_experts(experts: nn.Module, hidden_states: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor
                    ) -> torch.Tensor:
        return experts(hidden_states, selection=selected, selection_weights=weights)


ROUTERS = {TOP_K_ROUTING: MoeTopKRouter, EXPERT_CHOICE_ROUTING: MoeExpertChoiceRouter}


def _router_row_mask(attention_mask, num_rows: int, num_subtokens: int, device) -> torch.Tensor | None:
    """A (rows,) 0/1 float mask of the router rows that belong to real (non-padding) tokens, or None.

    Router rows are (batch * seq * subtokens) for the tokens of *this* forward call, while a 2-D attention mask also
    covers cached past tokens during generation; only its last `seq` columns apply (the cause of transformers
    issue 30731 is taking all of them).
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    batch_size = attention_mask.shape[0]
    seq_len = num_rows // (batch_size * num_subtokens)
    mask = attention_mask[:, -seq_len:].reshape(-1).to(device=device, dtype=torch.float32)  # (batch * seq,)
    return mask.repeat_interleave(num_subtokens)  # (batch * seq * subtokens,)


def _masked_mean(values: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the rows (dim 0) of `values`, counting only the rows where `row_mask` is 1."""
    if row_mask is None:
        return values.mean(0)
    weights = row_mask.reshape(-1, *([1] * (values.dim() - 1)))
    return (values * weights).sum(0) / row_mask.sum().clamp(min=1.0)


def chosen_experts(logits: torch.Tensor, top_k: int, selection_bias: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, k) the experts a router with these clean logits chooses: top-k of the softmax, plus the selection bias
    when it has one (as `MoeTopKRouter` chooses them)."""
    scores = logits.float().softmax(dim=-1)
    if selection_bias is not None:
        scores = scores + selection_bias.to(scores.device, torch.float32)
    return scores.topk(top_k, dim=-1).indices


def _choice_counts(logits: torch.Tensor, top_k: int, selection_biases, layer: int) -> torch.Tensor:
    """(rows, E) float: 1 where a row chose the expert (`chosen_experts` with the layer's selection bias), else 0."""
    bias = None if selection_biases is None else selection_biases[layer]
    return F.one_hot(chosen_experts(logits, top_k, bias), logits.shape[-1]).sum(dim=1).float()


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], top_k: int, attention_mask=None,
                        num_subtokens: int = 1, dispatch_fraction: torch.Tensor | None = None,
                        selection_biases: tuple[torch.Tensor | None, ...] | None = None) -> torch.Tensor:
    """Load-balancing loss, Switch Transformer eq. 4 (GShard for k > 1): `E * sum_e f_e * P_e`, averaged over layers.

    `f_e` is the fraction of the (token, choice) assignments that pick expert e (top-k of the clean softmax, plus the
    layer's entry of `selection_biases` when the routers carry one), `P_e` the mean router probability of e. It equals
    1 under uniform routing and E when every token picks one expert with certainty. Padding tokens (attention mask 0)
    are excluded; MH-MoE sub-tokens count as tokens. A given `dispatch_fraction` (layers, E) replaces the f_e of
    these logits (global-batch balancing).
    """
    if not router_logits:
        return torch.zeros(())
    losses = []
    for layer, logits in enumerate(router_logits):
        probs = logits.float().softmax(dim=-1)  # (rows, E)
        num_experts = probs.shape[-1]
        row_mask = _router_row_mask(attention_mask, probs.shape[0], num_subtokens, probs.device)
        if dispatch_fraction is None:
            chosen = _choice_counts(logits, top_k, selection_biases, layer)  # (rows, E)
            fraction = _masked_mean(chosen, row_mask) / top_k  # f_e, sums to 1
        else:
            fraction = dispatch_fraction[layer].to(probs.device)
        mean_probability = _masked_mean(probs, row_mask)  # P_e, sums to 1
        losses.append(num_experts * (fraction * mean_probability).sum())
    return torch.stack(losses).mean()


def _document_index(batch_size: int, seq_len: int, position_ids, device) -> torch.Tensor:
    """(batch * seq,) long: the document of each token of the call, numbered 0, 1, ... over the batch.

    Every row starts a document; within a row a new one starts wherever `position_ids` do not continue by 1, as
    padding-free packing (`DataCollatorWithFlattening`, TRL's `padding_free`) restarts them at 0 and as transformers
    separates packed sequences in attention (`masking_utils.find_packed_sequence_indices`).
    """
    starts = torch.zeros(batch_size, seq_len, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if (isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == seq_len
            and position_ids.shape[0] in (1, batch_size)):
        positions = position_ids.to(device).expand(batch_size, seq_len)
        starts[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    return starts.reshape(-1).long().cumsum(0) - 1


def sequence_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int, batch_size: int, attention_mask=None,
                          num_subtokens: int = 1, selection_biases: tuple[torch.Tensor | None, ...] | None = None,
                          position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Sequence-wise balance loss, DeepSeek-V3 (arXiv 2412.19437) eqs. 17-20: `E * sum_e f_e * P_e` within each
    sequence (f_e: the share of the sequence's assignments that chose e, bias included; P_e: its mean normalised
    affinity, here the softmax probability), averaged over the sequences and layers. 1 under uniform routing.

    Rows are `(batch_size * seq * num_subtokens)` in token order. A sequence is a document: each row of the batch,
    split further wherever its `position_ids (batch or 1, seq)` do not continue by 1 (a padding-free packed row holds
    several documents, see `_document_index`). Padding (attention mask 0) is excluded and a document without real
    tokens does not count.
    """
    if not router_logits:
        return torch.zeros(())
    losses = []
    for layer, logits in enumerate(router_logits):
        probs = logits.float().softmax(dim=-1)  # (rows, E)
        num_rows, num_experts = probs.shape
        seq_len = num_rows // (batch_size * num_subtokens)
        chosen = _choice_counts(logits, top_k, selection_biases, layer)  # (rows, E)
        row_mask = _router_row_mask(attention_mask, num_rows, num_subtokens, probs.device)
        if row_mask is None:
            row_mask = probs.new_ones(num_rows)
        # (rows,): a token's sub-tokens share its document
        document = _document_index(batch_size, seq_len, position_ids, probs.device).repeat_interleave(num_subtokens)
        num_documents = batch_size * seq_len  # at most one per token: a static size, no host sync
        real_rows = row_mask[:, None]  # (rows, 1)
        rows_per_document = probs.new_zeros(num_documents).index_add(0, document, row_mask)  # (documents,)
        denominator = rows_per_document.clamp(min=1)[:, None]
        fraction = probs.new_zeros(num_documents, num_experts).index_add(0, document, chosen * real_rows) / (
            top_k * denominator)  # (documents, E)
        mean_probability = probs.new_zeros(num_documents, num_experts).index_add(
            0, document, probs * real_rows) / denominator  # (documents, E)
        per_document = num_experts * (fraction * mean_probability).sum(-1)  # (documents,)
        real = (rows_per_document > 0).float()
        losses.append((per_document * real).sum() / real.sum().clamp(min=1))
    return torch.stack(losses).mean()


@torch.no_grad()
def expert_dispatch_counts(router_logits: tuple[torch.Tensor, ...], top_k: int, attention_mask=None,
                           num_subtokens: int = 1, selection_biases: tuple[torch.Tensor | None, ...] | None = None
                           ) -> torch.Tensor:
    """(layers, E) float32: how many (non-padding row, choice) assignments picked each expert, per layer."""
    counts = []
    for layer, logits in enumerate(router_logits):
        chosen = _choice_counts(logits, top_k, selection_biases, layer)  # (rows, E)
        row_mask = _router_row_mask(attention_mask, logits.shape[0], num_subtokens, logits.device)
        counts.append(chosen.sum(0) if row_mask is None else (chosen * row_mask[:, None]).sum(0))
    return torch.stack(counts)


def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask=None, num_subtokens: int = 1
                  ) -> torch.Tensor:
    """Router z-loss, ST-MoE eq. 5: `mean_tokens(logsumexp(logits)^2)`, averaged over layers; padding excluded."""
    if not router_logits:
        return torch.zeros(())
    losses = []
    for logits in router_logits:
        squared_log_z = torch.logsumexp(logits.float(), dim=-1).square()  # (rows,)
        row_mask = _router_row_mask(attention_mask, logits.shape[0], num_subtokens, logits.device)
        losses.append(_masked_mean(squared_log_z, row_mask))
    return torch.stack(losses).mean()


def share_of_accumulated_batch(labels: torch.Tensor, num_items_in_batch) -> torch.Tensor | float:
    """This micro-batch's share of the label tokens of the whole optimizer step (1.0 without `num_items_in_batch`).

    Under gradient accumulation (and token averaging across processes) transformers' Trainer passes
    `num_items_in_batch`, divides the LM loss by it and no longer divides by the accumulation steps; a per-micro-batch
    auxiliary loss would then count once per micro-batch (transformers issue 48690). Weighting it by this share makes
    the accumulated auxiliary term the token-weighted mean over the micro-batches, as in a single large batch.
    """
    if num_items_in_batch is None:
        return 1.0
    local_items = labels[..., 1:].ne(-100).sum()  # counted as the Trainer counts: shifted causal-LM labels
    return local_items / torch.as_tensor(num_items_in_batch, device=labels.device).clamp(min=1)


@dataclass
class RouterLosses:
    """The router terms of a training loss (see `router_losses`); `weighted` is what the loss adds, times the
    micro-batch's share of the step."""

    aux_loss: torch.Tensor | None
    z_loss: torch.Tensor
    sequence_aux_loss: torch.Tensor | None
    weighted: torch.Tensor


def router_losses(config: MoeConfig, router_logits: tuple[torch.Tensor, ...], attention_mask=None, *,
                  batch_size: int, position_ids: torch.Tensor | None = None,
                  selection_biases: tuple[torch.Tensor | None, ...] | None = None,
                  global_dispatch_fraction: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  aux_loss_coef: float | None = None, device=None) -> RouterLosses:
    """The router terms an hf_moe model adds to its loss, from one forward call's router logits (the model's own
    forward and hf_moe's TRL trainers both call this):

    `weighted = router_z_loss_coef * z_loss + aux_loss_coef * aux_loss (+ router_sequence_aux_loss_coef *
    sequence_aux_loss)`; `aux_loss` is None for expert choice (balanced by construction) and `aux_loss_coef` is the
    config's `router_aux_loss_coef` unless given; `sequence_aux_loss` only when its coefficient is > 0. The loss is
    `lm_loss + weighted * share`, `share` the micro-batch's share of the optimizer step (`share_of_accumulated_batch`).

    `batch_size` and `position_ids` delimit the sequences of the sequence-wise term. `global_dispatch_fraction(counts)`
    turns this call's expert counts `(layers, E)` into the f_e of global-batch balancing (the model's optimizer-step
    hook); None: f_e of these logits. Every term is moved to `device` when given.
    """
    top_k, subtokens = config.num_experts_per_tok, config.num_subtokens
    aux_loss = sequence_aux_loss = None
    if config.routing_kind == TOP_K_ROUTING:
        fraction = None
        if global_dispatch_fraction is not None:
            fraction = global_dispatch_fraction(expert_dispatch_counts(router_logits, top_k, attention_mask, subtokens,
                                                                       selection_biases))
        aux_loss = load_balancing_loss(router_logits, top_k, attention_mask, subtokens, fraction,
                                       selection_biases=selection_biases).to(device)
    z_loss = router_z_loss(router_logits, attention_mask, subtokens).to(device)
    if config.router_sequence_aux_loss_coef > 0:
        sequence_aux_loss = sequence_balance_loss(router_logits, top_k, batch_size, attention_mask, subtokens,
                                                  selection_biases, position_ids).to(device)
    weighted = config.router_z_loss_coef * z_loss
    if aux_loss is not None:
        weighted = weighted + (config.router_aux_loss_coef if aux_loss_coef is None else aux_loss_coef) * aux_loss
    if sequence_aux_loss is not None:
        weighted = weighted + config.router_sequence_aux_loss_coef * sequence_aux_loss
    return RouterLosses(aux_loss, z_loss, sequence_aux_loss, weighted)


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
def _route_and_run(gate: MoeRouter, experts: MoeExperts, rows: torch.Tensor, row_mask: torch.Tensor | None,
                   group_size: int, continues_cache: bool = False) -> torch.Tensor:
    """Route `rows (rows, d)` and run the experts on them, in the form the router's kind takes."""
    _, weights, chosen = gate(rows, row_mask, group_size, continues_cache)
    return gate.run_experts(experts, rows, weights, chosen)


class MoeSparseBlock(nn.Module):
    """Top-k MoE and Switch: `gate` routes each token to k of `experts`; optional always-active shared experts."""

    def __init__(self, config: MoeConfig):
        super().__init__()
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
        output = _route_and_run(self.gate, self.experts, tokens, row_mask, input_shape[1], continues_cache)
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
        routed = _route_and_run(self.gate, self.experts, sub_tokens, row_mask, input_shape[1] * self.num_heads,
                                continues_cache)
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
    "MoeCausalLMOutput", "load_balancing_loss", "router_z_loss", "drop_over_capacity", "MODEL_CLASSES",
    "sequence_balance_loss", "chosen_experts",
]
__all__ += ["expert_dispatch_counts", "expert_choice_selection", "router_losses", "RouterLosses",
            "share_of_accumulated_batch"]
