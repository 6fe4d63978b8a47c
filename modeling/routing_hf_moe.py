"""Routing in the hf_moe decoders: the routers of both kinds, expert capacity, expert-choice selection, and the
router losses with their composition into a training loss.

Read top to bottom: capacity and expert-choice selection (pure functions) -> the routers (`MoeTopKRouter`,
`MoeExpertChoiceRouter` on a shared `MoeRouter`) -> the losses their logits feed (load balancing, sequence-wise
balance, z-loss) -> `router_losses`, the terms a training loss adds. `modeling_hf_moe.py` builds a router per sparse
block and calls `router_losses` in its forward.

This file is copied next to the weights with the modeling file (which imports it relatively) and loaded as remote
code, so it imports only torch, transformers and the configuration file.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from .configuration_hf_moe import EXPERT_CHOICE_ROUTING, TOP_K_ROUTING, MoeConfig

logger = logging.get_logger(__name__)


# ------------------------------------------------------------------------------------------------ selection
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


# ------------------------------------------------------------------------------------------------ routers
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


# ------------------------------------------------------------------------------------------------ losses
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


# ------------------------------------------------------------------------------------------------ loss terms
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
