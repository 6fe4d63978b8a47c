"""Expert statistics read from the routers with forward hooks: load per expert, imbalance, MaxVio, entropy, drops,
losses."""

import inspect
import re
from collections import defaultdict

import torch
from torch import nn
from transformers import Cache

from ..modeling.modeling_hf_moe import SPARSE_BLOCKS, forward_trains, load_balancing_loss
from ..moe_layers import (
    EXPERT_CHOICE_ROUTING,
    SELECTION_BIAS,
    MoeLayer,
    TokenAssignment,
    find_moe_layers,
    model_type,
    token_assignment,
)


def is_per_layer_key(key: str) -> bool:
    """Whether `key` is a per-layer metric of [`RouterStatsRecorder.summary`] (`moe/layer<i>/...`), not a summary
    over the layers (`moe/<metric>`)."""
    return re.match(r"moe/layer\d+/", key) is not None


LOSS_TERMS = ("lm_loss", "aux_loss", "z_loss", "sequence_aux_loss")  # the model's own terms (MoeCausalLMOutput)


def forward_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call of `module` by name, positional ones bound to the names of its `forward` (so
    `model(ids, mask)` gives `attention_mask` as `model(input_ids=ids, attention_mask=mask)` does)."""
    if not args:
        return kwargs
    signature = inspect.signature(module.forward)
    named = dict(kwargs)
    for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
        if signature.parameters[name].kind is not inspect.Parameter.VAR_KEYWORD:  # its items are in `kwargs`
            named[name] = value
    return named


def _one_mask(attention_mask):
    """`attention_mask`, or of the per-layer-type dict that `generate` may pass, the full-attention mask (else the
    first)."""
    if isinstance(attention_mask, dict):
        return attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
    return attention_mask


def real_tokens(attention_mask, batch_size: int | None = None, past_seen_tokens: int | None = None
                ) -> torch.Tensor | None:
    """`(batch, columns)` bool: which tokens are real (not padding), from whatever attention mask a forward call got;
    the last `seq` columns are the tokens of the call. None when the mask cannot tell (then every token counts).

    - 2-D padding mask `(batch, past + seq)`: as it is.
    - 4-D mask `(batch, heads, seq, kv)`, boolean (True attends) or additive float (0 attends), as transformers
      builds it or a caller passes it: a token is real when it attends to itself. Padding is masked as a key for
      every query, its own included; a padding query may still see earlier real tokens (right padding), so a row that
      is not fully masked tells nothing. The token's own key column is `past_seen_tokens + i` (the cache's length
      before the call; a static cache's columns are absolute positions, wider than the tokens seen), or `kv - seq + i`
      without a cache or when the cache keeps a window. Packed sequences (block-diagonal masks) have no padding.
    - The per-layer-type dict `generate` may pass (`{"full_attention": ..., "sliding_attention": ...}`): its full
      attention mask, else its first.
    - None, or a flex-attention BlockMask: None.
    """
    attention_mask = _one_mask(attention_mask)
    if not isinstance(attention_mask, torch.Tensor):
        return None
    if attention_mask.dim() == 2:
        return attention_mask.bool()
    if attention_mask.dim() != 4:
        return None
    seq, kv = attention_mask.shape[-2:]
    offset = past_seen_tokens if past_seen_tokens is not None and past_seen_tokens + seq <= kv else kv - seq
    query = torch.arange(seq, device=attention_mask.device)
    own_key = attention_mask[:, 0, query, query + offset]  # (batch or 1, seq)
    real = own_key if own_key.dtype == torch.bool else own_key == 0
    return real.expand(batch_size, seq) if batch_size is not None and real.shape[0] == 1 else real


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio (Wang et al., arXiv 2408.15664, eq. 4): `max_e load_e / mean_e load_e - 1` over the last dimension;
    0 when every expert gets the same load."""
    load = load.float()
    return load.max(-1).values / load.mean(-1).clamp(min=1e-12) - 1


class RouterStatsRecorder:
    """Accumulates per-layer routing statistics from the routers' outputs until `summary()` is read.

    Recorded per sparse layer: router rows (tokens, or sub-tokens for MH-MoE), assignments per expert, dropped
    assignments (capacity), summed router entropy, the z-loss of each forward call, and the number of distinct experts
    the sub-tokens of one token reach (MH-MoE). Recorded per forward call: the model's own loss terms (`LOSS_TERMS`)
    from its output; the load-balancing loss is the model's, not recomputed per router, since the model's carries what
    a recomputation would miss (the selection bias, the padding, global-batch counts, a family's own formula). Under
    TRL's fused LM head, whose output has none, an hf_moe model's is its `load_balancing_loss` over the routers'
    outputs of the call (what `MoeSFTTrainer` adds). With `only_training` (the default) only forwards that train
    count: train mode with gradients (`forward_trains`). Work per forward call is a handful of reductions on the
    (tokens, E) router output, done without gradient. The load (assignments per expert), the dropped assignments, the
    entropy and the z-loss count the tokens the attention mask marks real (`real_tokens`): padding loads no expert.

    The load since the last `end_step()` is also kept per optimizer step on the routers' device (no host sync):
    `end_step()` returns it, and `summary()` averages the MaxVio of each step's load (the paper's MaxVio_batch) when
    steps were marked. `loads_only=True` records that load and nothing else (what the balancing callback needs).
    """

    def __init__(self, model: nn.Module, only_training: bool = True, loads_only: bool = False):
        self.layers = find_moe_layers(model, warn=not loads_only)
        self.routers = {layer.index: layer.router for layer in self.layers}
        self.num_experts = {layer.index: layer.num_experts for layer in self.layers}
        self.only_training = only_training
        self.loads_only = loads_only
        self.num_subtokens = getattr(getattr(model, "config", None), "num_subtokens", 1)
        self.attention_mask = None
        # An hf_moe model's load-balancing loss per router of the current call, for an output without aux_loss.
        self.computes_model_aux_loss = not loads_only and model_type(model) in SPARSE_BLOCKS
        self.call_aux_losses: list[torch.Tensor] = []
        self.handles = [layer.router.register_forward_hook(self._hook(layer)) for layer in self.layers]
        # The attention mask of the current forward call: which router rows are padding.
        self.handles.append(model.register_forward_pre_hook(self._record_attention_mask, with_kwargs=True))
        if not loads_only:
            # The model's own loss terms (lm_loss, aux_loss, z_loss of MoeCausalLMOutput), as the Trainer computed them.
            self.handles.append(model.register_forward_hook(self._record_loss_terms))
        self.step_load: dict[int, torch.Tensor] = {}
        self.reset()
        self.cumulative_load = {layer: torch.zeros(count) for layer, count in self.num_experts.items()}

    def reset(self) -> None:
        self.loss_terms = defaultdict(list)
        self.totals = defaultdict(lambda: defaultdict(float))
        self.loads = {layer: torch.zeros(count) for layer, count in self.num_experts.items()}
        self.step_history: list[dict[int, torch.Tensor]] = []  # per marked step: {layer: load}, on the CPU

    def end_step(self) -> dict[int, torch.Tensor]:
        """Close an optimizer step: returns {layer: load (E,)} counted since the previous call, on the routers'
        device (layers without a training forward since then are left out), and starts the next step's count."""
        step_load, self.step_load = self.step_load, {}
        if not self.loads_only and step_load:
            self.step_history.append({layer: load.float().cpu() for layer, load in step_load.items()})
        return step_load

    def _record_attention_mask(self, module, args, kwargs) -> None:
        arguments = forward_arguments(module, args, kwargs)
        mask = _one_mask(arguments.get("attention_mask"))
        batch_size = past_seen_tokens = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:  # its diagonal needs the cache length and the batch
            inputs = next((arguments[name] for name in ("input_ids", "inputs_embeds")
                           if isinstance(arguments.get(name), torch.Tensor)), None)
            batch_size = None if inputs is None else inputs.shape[0]
            cache = next((value for value in arguments.values() if isinstance(value, Cache)), None)
            past_seen_tokens = None if cache is None else int(cache.get_seq_length())
        self.attention_mask = real_tokens(mask, batch_size, past_seen_tokens)
        self.call_aux_losses = []

    def _row_mask(self, rows: int) -> torch.Tensor | None:
        """(rows,) 1.0 for router rows of real tokens, 0.0 for padding; None when unknown (then every row counts).

        Router rows are (batch * seq * sub-tokens) of the current call; the real-token mask (`real_tokens`) may also
        cover cached tokens (generation), so only its last `seq` columns apply.
        """
        mask = self.attention_mask
        if mask is None or rows % (mask.shape[0] * self.num_subtokens):
            return None
        seq = rows // (mask.shape[0] * self.num_subtokens)
        if seq > mask.shape[1]:
            return None
        return mask[:, -seq:].reshape(-1).float().repeat_interleave(self.num_subtokens)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _record_loss_terms(self, module, inputs, outputs) -> None:
        call_aux_losses, self.call_aux_losses = self.call_aux_losses, []
        if self.only_training and not forward_trains(module):
            return
        for key in LOSS_TERMS:
            value = getattr(outputs, key, None)
            if isinstance(value, torch.Tensor):
                self.loss_terms[key].append(value.detach().float().item())
        if not isinstance(getattr(outputs, "aux_loss", None), torch.Tensor) and call_aux_losses:
            # The model's `load_balancing_loss` averages its layers' terms.
            self.loss_terms["aux_loss"].append(torch.stack(call_aux_losses).mean().item())

    def _hook(self, layer: MoeLayer):
        def record(module, inputs, outputs):
            if self.only_training and not forward_trains(module):
                return
            with torch.no_grad():
                self._record(layer, token_assignment(layer, outputs), getattr(module, SELECTION_BIAS, None))

        return record

    def _record(self, layer: MoeLayer, assignment: TokenAssignment, selection_bias: torch.Tensor | None) -> None:
        chosen = assignment.chosen  # (rows, E)
        rows = chosen.shape[0]
        row_mask = self._row_mask(rows)
        real_rows = torch.ones(rows, device=chosen.device) if row_mask is None else row_mask.to(chosen.device)
        taken = chosen.float() * real_rows[:, None]  # (rows, E), padding rows zero
        self._add_load(layer.index, taken.sum(0))
        if self.loads_only:
            return
        totals = self.totals[layer.index]
        self._record_router_terms(totals, assignment.logits, real_rows)
        if layer.routing_kind == EXPERT_CHOICE_ROUTING:
            self._record_experts_per_row(totals, taken, real_rows)
            return
        totals["assignments"] += taken.sum().item()
        totals["dropped"] += (assignment.dropped.float() * real_rows[:, None]).sum().item()
        if self.computes_model_aux_loss:  # padding as the loads count it (every row when the mask does not fit)
            mask = self.attention_mask if row_mask is not None else None
            self.call_aux_losses.append(load_balancing_loss((assignment.logits,), layer.top_k, mask,
                                                            self.num_subtokens, selection_biases=(selection_bias,)))
        # Top-k rows of padding tokens count here too (they have their k experts); expert choice counts real tokens.
        self._record_distinct_experts(totals, chosen.float())

    def _record_experts_per_row(self, totals, taken: torch.Tensor, real_rows: torch.Tensor) -> None:
        """Expert choice: a row's expert count varies (mean and spread kept, and the rows no expert took)."""
        experts_per_row = taken.sum(-1)[real_rows > 0]  # (real rows,)
        assignments, squares, unrouted = torch.stack([  # one device-to-host copy for the three sums
            experts_per_row.sum(), experts_per_row.square().sum(), (experts_per_row == 0).sum()]).tolist()
        totals["assignments"] += assignments
        totals["experts_per_row_squares"] += squares
        totals["real_rows"] += experts_per_row.numel()
        totals["unrouted_rows"] += unrouted
        self._record_distinct_experts(totals, taken, real_rows)

    def _record_distinct_experts(self, totals, taken: torch.Tensor, real_rows: torch.Tensor | None = None) -> None:
        """MH-MoE: the distinct experts the h sub-tokens of each token reach (`taken (rows, E)` 1 where a row went
        to an expert), over the tokens whose rows `real_rows` marks real (None: every token)."""
        rows = taken.shape[0]
        if self.num_subtokens == 1 or rows % self.num_subtokens:
            return
        per_token = taken.reshape(rows // self.num_subtokens, self.num_subtokens, -1).amax(1)  # (tokens, E)
        if real_rows is None:
            totals["distinct_experts"] += per_token.sum().item()
            totals["tokens"] += per_token.shape[0]
            return
        token_real = real_rows.reshape(-1, self.num_subtokens)[:, 0] > 0
        totals["distinct_experts"] += per_token.sum(-1)[token_real].sum().item()
        totals["tokens"] += token_real.sum().item()

    def _add_load(self, layer: int, load: torch.Tensor) -> None:
        self.step_load[layer] = load if layer not in self.step_load else self.step_load[layer] + load
        if not self.loads_only:
            load = load.cpu()
            self.loads[layer] += load
            self.cumulative_load[layer] += load

    def _record_router_terms(self, totals, logits: torch.Tensor, real_rows: torch.Tensor) -> None:
        """Entropy and z-loss over the real rows (`real_rows`: (rows,) 1.0 real, 0.0 padding); the z-loss is then
        the model's term of the layer (ST-MoE eq. 5, padding excluded, as `router_z_loss`)."""
        probs = logits.float().softmax(-1)  # (rows, E)
        entropy = -(probs * probs.clamp(min=1e-20).log()).sum(-1)  # (rows,)
        squared_log_z = torch.logsumexp(logits.float(), dim=-1).square()  # (rows,)
        count, entropy_sum, squared_log_z_sum = torch.stack([  # one device-to-host copy for the three sums
            real_rows.sum(), (entropy * real_rows).sum(), (squared_log_z * real_rows).sum()]).tolist()
        totals["calls"] += 1
        totals["rows"] += count  # real rows
        totals["entropy"] += entropy_sum
        totals["z_loss"] += squared_log_z_sum / max(count, 1.0)

    def load_matrix(self, cumulative: bool = True) -> tuple[list[int], torch.Tensor]:
        """(layer indices, (layers, E) fraction of assignments per expert)."""
        loads = self.cumulative_load if cumulative else self.loads
        layers = sorted(loads)
        matrix = torch.stack([loads[i] / loads[i].sum().clamp(min=1) for i in layers]) if layers else torch.zeros(0)
        return layers, matrix

    def summary(self, per_expert: bool = True) -> dict[str, float]:
        """Metrics since the last `reset()`: `moe/<metric>` averaged over layers and `moe/layer<i>/<metric>`."""
        metrics, averages = {}, defaultdict(list)
        for layer in sorted(self.totals):
            totals, load = self.totals[layer], self.loads[layer]
            if not totals["calls"]:
                continue
            fraction = load / load.sum().clamp(min=1)
            step_loads = [step[layer] for step in self.step_history if layer in step and step[layer].sum() > 0]
            values = {
                "z_loss": totals["z_loss"] / totals["calls"],
                "imbalance_max_over_mean": (fraction.max() / fraction.mean()).item(),
                # Per optimizer step (the global batch once summed over processes), averaged over the steps.
                "max_vio": (max_violation(torch.stack(step_loads)).mean() if step_loads
                            else max_violation(load)).item(),
                "imbalance_cv": (fraction.std(unbiased=False) / fraction.mean()).item(),
                "router_entropy": totals["entropy"] / max(totals["rows"], 1),
                "dropped_fraction": totals["dropped"] / max(totals["assignments"], 1),
                "expert_activation_rate": (load > 0).float().mean().item(),
            }
            if totals["tokens"]:
                values["distinct_experts_per_token"] = totals["distinct_experts"] / totals["tokens"]
            if totals["real_rows"]:  # expert choice: experts per token (MH-MoE: per sub-token), mean and spread
                mean = totals["assignments"] / totals["real_rows"]
                values["experts_per_token"] = mean
                values["experts_per_token_std"] = max(
                    totals["experts_per_row_squares"] / totals["real_rows"] - mean * mean, 0.0) ** 0.5
                values["unrouted_token_fraction"] = totals["unrouted_rows"] / totals["real_rows"]
            for key, value in values.items():
                metrics[f"moe/layer{layer}/{key}"] = value
                averages[key].append(value)
            if per_expert:
                for expert, value in enumerate(fraction.tolist()):
                    metrics[f"moe/layer{layer}/expert{expert}_fraction"] = value
        for key, values in averages.items():
            metrics[f"moe/{key}"] = sum(values) / len(values)
        # The model's own loss terms, averaged over the forward calls (before their coefficients).
        for key, values in self.loss_terms.items():
            metrics[f"moe/model_{key}"] = sum(values) / len(values)
        if "moe/model_aux_loss" in metrics:  # the load-balancing loss is the model's (none for expert choice)
            metrics["moe/aux_loss"] = metrics["moe/model_aux_loss"]
        return metrics
