"""TRL's `SFTTrainer` and `DPOTrainer` for hf_moe models: the loss they optimise and log carries the model's own
auxiliary terms, `router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss` (plus
`router_sequence_aux_loss_coef * sequence_aux_loss` when that weight is > 0).

Stock TRL 1.16 replaces the model's forward with a fused LM head and, for any MoE, adds Mixtral's load-balancing
loss on the router logits: for hf_moe that is k times the model's own (top-2: the coefficient silently doubled),
drops the z-loss, fails on MH-MoE's sub-token router rows when the batch is padded, and writes
`output_router_logits=True` into the config that is saved. These subclasses keep everything else TRL does (data
preparation, fused LM head, metrics, PEFT) and change only that:

- after TRL's `__init__`, the config's `output_router_logits` / `router_aux_loss_coef` are restored and TRL's own
  MoE term is switched off (`aux_loss_enabled = False`);
- each `compute_loss` reads the router logits of the trained model's first forward call through forward hooks on the
  routers (the model's own output does not carry them under the fused head) and adds the router terms the model's
  forward adds, through the same function (`router_losses`: padding excluded, MH-MoE sub-tokens counted, no
  load-balancing loss for expert choice), weighted as the model's forward weights them (SFT: by the micro-batch's
  share of the step's label tokens, `share_of_accumulated_batch`);
- `aux_loss` and `z_loss` are logged with TRL's metrics.

`SFTConfig.router_aux_loss_coef`, when set, replaces the model's aux coefficient for the run (not in the saved
config). Other MoE families (Mixtral, Qwen3-MoE, ...) keep TRL's behaviour unchanged.
These classes lean on TRL internals (`compute_loss`, `aux_loss_enabled`, `_metrics`): pinned by tests on TRL 1.16.
"""

from contextlib import contextmanager

import torch
from torch import nn
from transformers import PretrainedConfig
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: F401  (configs re-exported for convenience)

from ..modeling.modeling_hf_moe import SPARSE_BLOCKS, router_losses, share_of_accumulated_batch
from ..moe_layers import find_moe_layers, selection_bias


class _FirstForwardRouterLogits:
    """Router logits (with gradient), attention mask, position ids and batch size of the first forward call of
    `model` while active."""

    def __init__(self):
        self.logits, self.attention_mask, self.position_ids, self.batch_size = [], None, None, None
        self.done = False

    @contextmanager
    def capture(self, model: nn.Module):
        def before(module, args, kwargs):
            if not self.done:
                self.attention_mask = kwargs.get("attention_mask")
                self.position_ids = kwargs.get("position_ids")  # padding-free batches delimit documents by them
                inputs = kwargs.get("input_ids", args[0] if args else None)
                inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
                self.batch_size = inputs.shape[0] if isinstance(inputs, torch.Tensor) else None

        def after(module, args, kwargs, output):
            self.done = True

        def router(module, args, output):
            if not self.done:
                self.logits.append(output[0] if isinstance(output, tuple) else output)

        handles = [model.register_forward_pre_hook(before, with_kwargs=True),
                   model.register_forward_hook(after, with_kwargs=True)]
        handles += [layer.router.register_forward_hook(router) for layer in find_moe_layers(model)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def _router_logits_not_requested(config):
    """TRL's fused forward adds Mixtral's aux loss whenever the config asks for router logits; not for this call."""
    requested = config.output_router_logits
    config.output_router_logits = False
    try:
        yield
    finally:
        config.output_router_logits = requested


class _ModelAuxLossMixin:
    # SFT divides the LM loss by the step's label tokens (`num_items_in_batch`), so the per-micro-batch aux terms
    # are weighted by the micro-batch's share, as the model's own forward does; DPO's loss is a per-batch mean.
    aux_weighted_by_token_share = True

    def __init__(self, model, *args, **kwargs):
        if isinstance(model, str):  # TRL loads it; the values as saved
            saved = PretrainedConfig.get_config_dict(model)[0]
        else:
            saved = model.config.get_text_config().to_dict()
        super().__init__(model, *args, **kwargs)
        config = self.model.config.get_text_config()
        self.is_hf_moe = config.model_type in SPARSE_BLOCKS
        if not self.is_hf_moe:
            return
        # TRL wrote these into the config (they would be saved); the model's own loss needs neither.
        config.output_router_logits = saved.get("output_router_logits", False)
        config.router_aux_loss_coef = saved.get("router_aux_loss_coef", config.router_aux_loss_coef)
        self.aux_loss_enabled = False  # no Mixtral aux loss from TRL; the model's terms are added in compute_loss
        # As TRL resolved it: args.router_aux_loss_coef or the config's. The other coefficients are the config's.
        self.moe_aux_coef = self.router_aux_loss_coef

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.is_hf_moe:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        config = self.model.config.get_text_config()
        with _FirstForwardRouterLogits().capture(model) as routed, _router_logits_not_requested(config):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        logits = tuple(routed.logits)
        biases = tuple(selection_bias(model, layer) for layer in find_moe_layers(model))  # layer order, as routed
        biases = biases if any(bias is not None for bias in biases) else None
        # Sequences are documents, as the model's forward counts them: the rows of the batch, and within a
        # padding-free packed row (no attention mask) each run of position ids from 0.
        router = router_losses(config, logits, routed.attention_mask, batch_size=routed.batch_size,
                               position_ids=routed.position_ids, selection_biases=biases,
                               aux_loss_coef=self.moe_aux_coef)
        logged = {"z_loss": router.z_loss, "aux_loss": router.aux_loss}
        if router.sequence_aux_loss is not None and logits:
            logged["sequence_aux_loss"] = router.sequence_aux_loss
        loss = loss + router.weighted.to(loss.device) * self._router_terms_weight(inputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        for key, value in logged.items():
            if value is None:  # expert choice: no load-balancing loss
                continue
            self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value.detach()).mean().item())
        return (loss, outputs) if return_outputs else loss


    def _router_terms_weight(self, inputs, num_items_in_batch):
        """The weight of this micro-batch's router terms in the step's loss, as the trainer weighs its own loss."""
        if not (self.aux_weighted_by_token_share and "labels" in inputs):
            return 1.0
        weight = share_of_accumulated_batch(inputs["labels"], num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            weight = weight * self.accelerator.num_processes  # as TRL scales its LM loss (DDP averages)
        return weight


class MoeSFTTrainer(_ModelAuxLossMixin, SFTTrainer):
    """`trl.SFTTrainer` whose loss is the hf_moe model's own: `lm_loss + router_aux_loss_coef * aux_loss +
    router_z_loss_coef * z_loss` (any other model: exactly `SFTTrainer`).

    Example:
    ```python
    >>> trainer = add_moe_callbacks(MoeSFTTrainer(model=moe, args=SFTConfig(output_dir="sft"),
    ...                                           train_dataset=chats), ExpertStatsCallback())
    ```
    """


class MoeDPOTrainer(_ModelAuxLossMixin, DPOTrainer):
    """`trl.DPOTrainer` whose loss is the DPO loss plus the hf_moe model's own `router_aux_loss_coef * aux_loss +
    router_z_loss_coef * z_loss` of the policy forward (any other model: exactly `DPOTrainer`)."""

    aux_weighted_by_token_share = False
