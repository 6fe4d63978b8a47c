"""Auxiliary-loss-free load balancing (Wang et al., arXiv 2408.15664; DeepSeek-V3, arXiv 2412.19437 Sec. 2.1.2) for
any MoE model whose routers carry a selection bias: hf_moe models with `router_bias_update_rate` > 0, and the
transformers families that ship `e_score_correction_bias` (DeepSeek-V3/V3.2, GLM-4.5-MoE, Ernie-4.5-MoE, dots1,
MiniMax-M2, Kimi-Linear, LongCat-Flash, MiMo-V2-Flash, ...), which nothing in transformers, its Trainer or TRL updates.

The router adds the bias b to its affinity scores for the top-k choice only (the gating weights stay unbiased); after
every optimizer step each bias moves by `gamma * sign(mean_e load_e - load_e)`, where load_e counts the step's
(token, choice) assignments to expert e over all gradient-accumulation micro-batches and data-parallel processes.
Loads come from `RouterStatsRecorder` (its load-only mode, which keeps them on the routers' device: no host sync per
micro-batch); the processes sum them with one all-reduce per optimizer step.
"""

import logging

import torch
from torch import nn
from transformers import TrainerCallback

from ..moe_layers import (
    EXPERT_CHOICE_ROUTING,
    SELECTION_BIAS,
    MoeLayer,
    find_moe_layers,
    model_type,
    selection_bias,
)
from .optimizer_step import optimizer_step_skipped
from .router_stats import RouterStatsRecorder

logger = logging.getLogger(__name__)

DEFAULT_UPDATE_RATE = 1e-3  # u in arXiv 2408.15664; DeepSeek-V3's gamma for most of its pre-training
# The gamma a run balances with, in each `state.log_history` entry (so in trainer_state.json), where the fine-tuned
# card reads it. A setting rather than a metric: it is not sent to the `report_to` loggers or the console.
UPDATE_RATE_LOG_KEY = "moe/selection_bias_update_rate"


def no_selection_bias_message(model: nn.Module) -> str:
    """Why a model cannot be balanced without an auxiliary loss, and what would make it so."""
    expert_choice = [layer.index for layer in find_moe_layers(model) if layer.routing_kind == EXPERT_CHOICE_ROUTING]
    if expert_choice:
        return (f"{type(model).__name__} (model_type={model_type(model)!r}) routes by expert choice (sparse layers "
                f"{expert_choice}): each expert takes its C tokens, so the load is balanced by construction and "
                "auxiliary-loss-free balancing, a selection bias on each token's top-k choice, does not apply to it")
    return (f"{type(model).__name__} (model_type={model_type(model)!r}) has no router selection bias "
            f"(`{SELECTION_BIAS}`), so auxiliary-loss-free balancing does not apply to it. hf_moe models get one "
            "with `router_bias_update_rate` > 0 (`hf-moe finetune --router_bias_update_rate 1e-3`, or "
            "`model.set_router_bias_update_rate(1e-3)`); of transformers' own families, DeepSeek-V3/V3.2, GLM-4.5-MoE, "
            "Ernie-4.5-MoE, dots1, MiniMax-M2, Kimi-Linear, LongCat-Flash, MiMo-V2-Flash and others carry one")


def router_is_trainable(model: nn.Module, layer: MoeLayer) -> bool:
    """Whether any parameter of the router (its selection bias aside) gets gradients."""
    return any(parameter.requires_grad for name, parameter in model.get_submodule(layer.router_name).named_parameters()
               if name.rpartition(".")[2] != SELECTION_BIAS)


def bias_update_rate(model: nn.Module, update_rate: float | None = None) -> float:
    """gamma: `update_rate` if given, else the model config's `router_bias_update_rate` when > 0, else 1e-3."""
    if update_rate is not None:
        if update_rate < 0:
            raise ValueError(f"`update_rate`={update_rate!r} is invalid: must be >= 0")
        return update_rate
    configured = getattr(getattr(model, "config", None), "router_bias_update_rate", 0.0) or 0.0
    return configured if configured > 0 else DEFAULT_UPDATE_RATE


class SelectionBiasBalancer:
    """Moves the routers' selection biases after each optimizer step by `gamma * sign(mean load - load_e)`.

    Create it when the routers' trainability is settled (after any freezing): routers whose parameters are all frozen
    keep their bias as it is. Every forward call of `model` that trains (train mode with gradients; not the generation
    and scoring RL trainers run in train mode under `torch.no_grad()`) then counts its (non-padding) assignments per
    expert; `step()` closes an optimizer step: it sums those counts over the data-parallel processes (one
    all-reduce of all layers' counts; every process must call it, as every process runs the optimizer step) and
    updates the biases, in float32. A plain loop calls `step()` after `optimizer.step()`; the Trainer callback
    [`AuxLossFreeBalancingCallback`] does it in `on_step_end`.

    Example:
    ```python
    >>> balancer = SelectionBiasBalancer(model, update_rate=1e-3)
    >>> for batch in loader:
    ...     model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad(); balancer.step()
    ```
    """

    def __init__(self, model: nn.Module, update_rate: float | None = None):
        self.model = model
        self.update_rate = bias_update_rate(model, update_rate)
        biased = [layer for layer in find_moe_layers(model) if layer.selection_bias_name is not None]
        self.frozen_layers = [layer.index for layer in biased if not router_is_trainable(model, layer)]
        self.layers = [layer for layer in biased if layer.index not in self.frozen_layers]
        self.has_selection_bias = bool(biased)
        # Gradient checkpointing may count a step's routers twice (a forward with gradients, then its recomputation
        # in backward): every count doubles alike, which changes neither sign(mean - load) nor MaxVio.
        self.recorder = RouterStatsRecorder(model, only_training=True, loads_only=True) if self.layers else None
        dtypes = {selection_bias(model, layer).dtype for layer in self.layers} - {torch.float32}
        if dtypes:  # hf_moe routers keep it in float32 even through `model.to(dtype)`; other families'
            # `model.to(dtype)` casts it
            logger.warning("the selection biases are stored in %s: steps of gamma=%g are rounded to that precision; "
                           "keep them in float32", ", ".join(map(str, dtypes)), self.update_rate)

    @torch.no_grad()
    def step(self) -> dict[int, torch.Tensor]:
        """End an optimizer step: update every trainable router's bias from the step's global load; returns
        {layer index: load (E,)} (summed over processes) of the updated layers."""
        if self.recorder is None:
            return {}
        counted = self.recorder.end_step()
        biases = [selection_bias(self.model, layer) for layer in self.layers]
        loads = [counted.get(layer.index, torch.zeros(bias.numel(), device=bias.device)).to(bias.device)
                 for layer, bias in zip(self.layers, biases, strict=True)]
        flat = torch.cat([load.float() for load in loads])
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flat)
        global_loads = flat.split([load.numel() for load in loads])
        for bias, load in zip(biases, global_loads, strict=True):
            if load.sum() == 0:
                continue  # no token reached this layer in the step (no evidence either way)
            # arXiv 2408.15664, Algorithm 1: e_i = mean load - load_i; b_i += u * sign(e_i), here in float32.
            update = self.update_rate * torch.sign(load.mean() - load)
            bias.copy_((bias.float() + update.view_as(bias)).to(bias.dtype))
        return {layer.index: load for layer, load in zip(self.layers, global_loads, strict=True)}

    def skip_step(self) -> None:
        """End an optimizer step that was not taken (its gradients dropped): its loads are discarded and no bias
        moves, so the step changes nothing. Every process skips alike (no collective)."""
        if self.recorder is not None:
            self.recorder.end_step()

    def remove(self) -> None:
        """Stop counting (remove the recorder's hooks)."""
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None


class AuxLossFreeBalancingCallback(TrainerCallback):
    """Auxiliary-loss-free balancing for the stock Trainer and TRL's trainers: after every optimizer step, each
    router's selection bias moves by `gamma * sign(mean load - load_e)` (Wang et al., arXiv 2408.15664; DeepSeek-V3),
    from the step's expert loads over all gradient-accumulation micro-batches and data-parallel processes.

    Works on any model whose routers carry a selection bias (`hf_moe.moe_layers` finds it): hf_moe models with
    `router_bias_update_rate` > 0, and transformers' families with `e_score_correction_bias`. `update_rate` (gamma)
    defaults to the model config's `router_bias_update_rate`, else 1e-3, and every `state.log_history` entry records
    it (`moe/selection_bias_update_rate`, read by the model card). Routers frozen before training keep their bias, and
    a step that [`NonFiniteGuardCallback`] skipped moves no bias (its loads are discarded). A model without any
    selection bias gets one warning naming its model type and nothing happens.

    Example:
    ```python
    >>> trainer = add_moe_callbacks(Trainer(model=deepseek_v3, args=args, train_dataset=ds),
    ...                             AuxLossFreeBalancingCallback(update_rate=1e-3), ExpertStatsCallback())
    ```
    """

    def __init__(self, update_rate: float | None = None):
        if update_rate is not None and update_rate < 0:
            raise ValueError(f"`update_rate`={update_rate!r} is invalid: must be >= 0")
        self.update_rate = update_rate
        self.balancer: SelectionBiasBalancer | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.balancer is not None:
            return
        self.balancer = SelectionBiasBalancer(model, self.update_rate)
        if not self.balancer.has_selection_bias:
            logger.warning("AuxLossFreeBalancingCallback: %s", no_selection_bias_message(model))
        elif self.balancer.frozen_layers:
            logger.info("AuxLossFreeBalancingCallback: the routers of layers %s are frozen; their selection biases "
                        "stay as they are", self.balancer.frozen_layers)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.balancer is not None and state.log_history:  # the entry the Trainer appended for these logs
            state.log_history[-1][UPDATE_RATE_LOG_KEY] = self.balancer.update_rate

    def on_step_end(self, args, state, control, **kwargs):
        if self.balancer is None:
            return
        if optimizer_step_skipped(state):  # NonFiniteGuardCallback dropped the step's gradients
            self.balancer.skip_step()
        else:
            self.balancer.step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.balancer is not None:
            self.balancer.remove()
            self.balancer = None
