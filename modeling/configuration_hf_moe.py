"""Configurations of the three hf_moe decoders: top-k MoE (`hf_moe`), Switch (`hf_switch`) and Multi-Head MoE
(`hf_mh_moe`).

All three share one Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) so that a dense Llama,
Mistral, Qwen2 or Qwen3 checkpoint maps onto them weight for weight; they differ only in the sparse block that
replaces the MLP of the sparse layers.

This file is copied next to the weights by `save_pretrained` and loaded as remote code, so it imports only
`transformers` (and the standard library).
"""

from transformers import PreTrainedConfig

ROUTER_TYPES = ("softmax_topk", "noisy_topk", "expert_choice")
EXPERT_CHOICE_GROUPS = ("batch", "sequence")
EXPERT_CHOICE_EVAL_RULES = ("threshold", "batch")
ROUTER_AUX_LOSS_SCOPES = ("micro_batch", "global_batch")
# What a router's outputs mean, read by every consumer that must tell the two apart (`MoeConfig.routing_kind`, the
# routers' `routing_kind`): token choice returns `(logits, top_k_weights, top_k_index)`, expert choice
# `(logits, weights (tokens, E), selected (tokens, E))`.
TOP_K_ROUTING = "top_k"
EXPERT_CHOICE_ROUTING = "expert_choice"

# Parallel plans by part of the model; `MoeConfig.base_model_tp_plan` / `base_model_ep_plan` combine the parts that a
# config's layers have. Names and styles are those of transformers' Qwen2-MoE plans.
_ATTENTION_TP_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
}
_DENSE_MLP_TP_PLAN = {
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}
_EXPERTS_TP_PLAN = {
    "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
    "layers.*.mlp.experts.down_proj": "rowwise",
    "layers.*.mlp.experts": "moe_tp_experts",
}
_EXPERTS_EP_PLAN = {
    "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
    "layers.*.mlp.experts.down_proj": "grouped_gemm",
    "layers.*.mlp.experts": "ep_dispatch_experts",
}


def _require(condition: bool, field: str, value, allowed: str) -> None:
    """Raise a `ValueError` that names the field, the value given and what is allowed."""
    if not condition:
        raise ValueError(f"`{field}`={value!r} is invalid: {allowed}.")


class MoeConfig(PreTrainedConfig):
    r"""
    Configuration of a decoder whose sparse layers use a token-choice top-k softmax router (Mixtral / Qwen-MoE /
    GShard style).

    Decoder (same meaning as in `LlamaConfig` / `Qwen3Config`):
        vocab_size (`int`, defaults to 32000): vocabulary size.
        hidden_size (`int`, defaults to 512): model width d.
        intermediate_size (`int`, defaults to 1408): inner size of the dense SwiGLU MLPs (layers that stay dense).
        num_hidden_layers (`int`, defaults to 8): number of decoder layers.
        num_attention_heads (`int`, defaults to 8): query heads.
        num_key_value_heads (`int`, *optional*): key/value heads (grouped-query attention); `None` means
            `num_attention_heads`.
        head_dim (`int`, *optional*): per-head size; `None` means `hidden_size // num_attention_heads`.
        hidden_act (`str`, defaults to `"silu"`): activation of the SwiGLU gate, dense and expert MLPs alike.
        max_position_embeddings (`int`, defaults to 4096): longest sequence RoPE is set up for.
        rope_parameters (`dict`, *optional*): RoPE type, `rope_theta` and scaling, as in transformers
            (`{"rope_type": "default", "rope_theta": 10000.0}` when omitted; `linear`, `dynamic`, `yarn`, `llama3`...).
        rms_norm_eps (`float`, defaults to 1e-6): RMSNorm epsilon.
        attention_bias (`bool`, defaults to `False`): bias on the q/k/v projections (Qwen2).
        attention_output_bias (`bool`, defaults to `False`): bias on the output projection (Llama with
            `attention_bias=True` sets both).
        use_qk_norm (`bool`, defaults to `False`): per-head RMSNorm on queries and keys (Qwen3).
        sliding_window (`int`, *optional*): window of the `"sliding_attention"` layers (Mistral); `None` disables it.
        layer_types (`list[str]`, *optional*): `"full_attention"` or `"sliding_attention"` per layer; derived from
            `sliding_window` when omitted.
        attention_dropout (`float`, defaults to 0.0): dropout on attention probabilities.
        initializer_range (`float`, defaults to 0.02): std of the normal init of all weights...
        initializer_scale (`float`, *optional*): ...unless this is set: then weights are drawn from a truncated
            normal with std `sqrt(initializer_scale / fan_in)` (Switch Transformer, Table 3, uses 0.1).
        tie_word_embeddings (`bool`, defaults to `False`): share the input embedding and the LM head.
        use_cache (`bool`, defaults to `True`): return the KV cache.

    Which layers are sparse (the others keep a dense MLP):
        sparse_layers (`list[int]`, *optional*): explicit layer indices; overrides the next two fields.
        sparse_layer_interval (`int`, defaults to 1): every N-th layer is sparse, counting from the first layer
            after the dense prefix: 1 = all, 2 = every other (GLaM, Switch).
        first_k_dense_layers (`int`, defaults to 0): the first k layers stay dense (DeepSeek's `first_k_dense_replace`).

    Sparse block:
        num_experts (`int`, defaults to 8): routed experts E per sparse layer.
        num_experts_per_tok (`int`, defaults to 2): experts k chosen per token.
        moe_intermediate_size (`int`, *optional*): inner size of one expert; `None` means `intermediate_size`.
        norm_topk_prob (`bool`, defaults to `True`): renormalise the k chosen probabilities to sum to 1 (Mixtral);
            `False` keeps the raw softmax probabilities (Qwen-MoE, Switch).
        straight_through_topk (`bool`, defaults to `False`): with `norm_topk_prob`, divide by the *detached* sum of
            the k probabilities: the same combine weights, but with top-1 (weight exactly 1) the router still gets the
            gradient of p (straight-through). Upcycled Switch models use it, so they equal the dense model at step 0.
        router_type (`str`, defaults to `"softmax_topk"`): `"softmax_topk"` (softmax over all experts, in float32,
            then top-k) or `"noisy_topk"` (Shazeer et al. 2017: learned, input-dependent Gaussian noise on the logits
            while training).
            `"expert_choice"`: experts choose tokens (see "Expert-choice routing" below).
        router_jitter_noise (`float`, defaults to 0.0): multiplicative uniform noise `U(1-eps, 1+eps)` on the router
            input while training (Switch Transformer).
        num_shared_experts (`int`, defaults to 0): always-active experts, fused into one SwiGLU MLP of size
            `num_shared_experts * moe_intermediate_size` whose output is added to the routed one (DeepSeek-MoE).
        capacity_factor (`float`, *optional*): while training, each expert takes at most
            `ceil(capacity_factor * tokens * k / num_experts)` token assignments of a forward call; the rest are
            dropped (their expert output is 0, the residual carries them on). `None` = dropless.
        eval_capacity_factor (`float`, *optional*): the same outside training. `None` = dropless.
        expert_dropout (`float`, defaults to 0.0): dropout on the experts' inner activations (Switch Table 4 uses 0.4
            when fine-tuning).

    Auxiliary losses (added to the LM loss when `labels` are given):
        router_aux_loss_coef (`float`, defaults to 0.01): weight of the load-balancing loss
            `E * sum_e f_e * P_e` (Switch eq. 4, GShard), which is 1 under uniform routing. f_e counts the experts
            actually chosen (with a selection bias, the biased choice), P_e the unbiased probabilities.
        router_z_loss_coef (`float`, defaults to 0.001): weight of the router z-loss `mean(logsumexp(logits)^2)`
            (ST-MoE eq. 5).
        router_aux_loss_scope (`str`, defaults to `"micro_batch"`): over which tokens the expert-selection
            frequencies f_e of the load-balancing loss are counted while training. `"micro_batch"`: the tokens of
            each forward call. `"global_batch"` (Qiu et al., arXiv 2501.11873, as in Qwen3-MoE): f_e is summed over
            all data-parallel processes (one all-reduce of a (layers, E) tensor per forward call) and over the
            gradient-accumulation micro-batches of the optimizer step seen so far; P_e stays local and carries the
            gradient. That needs hf_moe's training add-ons (`hf_moe.training.OptimizerStepCallback`, or
            `begin_optimizer_step` in a plain loop); a model without them (remote code where hf_moe is not
            installed) counts f_e over each forward call's tokens, as `"micro_batch"`, and warns once.
        router_sequence_aux_loss_coef (`float`, defaults to 0.0): weight of the sequence-wise balance loss of
            DeepSeek-V3 (arXiv 2412.19437, Sec. 2.1.2, eqs. 17-20): `E * sum_e f_e * P_e` computed within each
            sequence and averaged over the sequences, which keeps single sequences from piling onto few experts.
            A sequence is a document: a row of the batch, or in a padding-free packed row each run of `position_ids`
            from 0.
            DeepSeek-V3 pairs a tiny weight (1e-4) with the selection bias below; 0 turns it off.
        output_router_logits (`bool`, defaults to `False`): return the per-layer router logits.

    Auxiliary-loss-free balancing (Wang et al., arXiv 2408.15664; DeepSeek-V3):
        router_bias_update_rate (`float`, defaults to 0.0): gamma. When > 0, every router carries a float32 buffer
            `e_score_correction_bias` (E,), saved with the weights, that is added to the softmax probabilities for
            the top-k selection only: the gating weights stay the unbiased probabilities. After every optimizer step
            `hf_moe.training.AuxLossFreeBalancingCallback` moves it by `gamma * sign(mean load - load_e)` (the paper
            uses 1e-3). 0 = no bias: routing by the probabilities alone.

    Expert-choice routing (Zhou et al., arXiv 2202.09368), with `router_type="expert_choice"` (`hf_moe`, `hf_mh_moe`):
        each expert takes the C tokens (MH-MoE: sub-tokens) with the highest softmax affinity to it, C =
        `ceil(expert_capacity_factor * tokens / num_experts)` over a selection group of real (non-padding) tokens, and
        weights them by that affinity. Load is balanced by construction: no load-balancing loss is computed
        (`router_aux_loss_coef` does not apply; the z-loss does), and a token gets a variable number of experts
        (`expert_capacity_factor` on average). `num_experts_per_tok` is not used.
        expert_capacity_factor (`float`, defaults to 2.0): c, the experts per token on average (the paper's
            default, the active compute of top-2 token choice).
        expert_choice_group (`str`, defaults to `"batch"`): the tokens an expert chooses among while training:
            `"batch"` (all real tokens of the forward call) or `"sequence"` (each sequence's own, C per sequence).
        expert_choice_eval_rule (`str`, defaults to `"threshold"`): routing outside training. Batch selection is not
            causal (whether an expert takes a token depends on the other tokens, later ones included), so by default
            a token goes to every expert whose affinity reaches that expert's threshold `expert_choice_threshold`, a
            running estimate of its training selection cutoff (the C-th largest affinity); each token's experts then
            depend on that token alone, as Mixture-of-Depths' causal inference rule (arXiv 2404.02258).
            `"batch"`: the training selection over the call's tokens (not causal; for measuring the gap). A router
            whose threshold was never estimated routes each token to its top-`round(expert_capacity_factor)` experts.
            This rule also routes the decoding steps (tokens after cached ones) of a train-mode `generate` under
            `torch.no_grad()`, as RL trainers run it; a whole batch in train mode is selected as in training.
        expert_choice_threshold_momentum (`float`, defaults to 0.1): as BatchNorm's momentum, each training forward
            (train mode with gradients enabled) sets `threshold = (1 - m) * threshold + m * cutoff` (a plain average
            over the first 1/m forwards).

    Provenance:
        base_model (`str`, *optional*): the dense checkpoint this model was upcycled from, for the model card.

    Example:
    ```python
    >>> import hf_moe
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> config = AutoConfig.for_model("hf_moe", hidden_size=256, num_experts=8, num_experts_per_tok=2)
    >>> model = AutoModelForCausalLM.from_config(config)
    ```
    """

    model_type = "hf_moe"
    _auto_class = "AutoConfig"  # `save_pretrained` copies this file next to config.json
    keys_to_ignore_at_inference = ["past_key_values", "aux_loss", "z_loss", "sequence_aux_loss", "router_logits"]
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    # decoder
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rope_parameters: dict | None = None
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    attention_output_bias: bool = False
    use_qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_scale: float | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # which layers are sparse
    sparse_layers: list[int] | None = None
    sparse_layer_interval: int = 1
    first_k_dense_layers: int = 0
    # sparse block
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = True
    straight_through_topk: bool = False
    router_type: str = "softmax_topk"
    router_jitter_noise: float = 0.0
    num_shared_experts: int = 0
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    expert_dropout: float = 0.0
    # auxiliary losses
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    router_aux_loss_scope: str = "micro_batch"
    router_sequence_aux_loss_coef: float = 0.0
    output_router_logits: bool = False
    # auxiliary-loss-free balancing
    router_bias_update_rate: float = 0.0
    # expert-choice routing
    expert_capacity_factor: float = 2.0
    expert_choice_group: str = "batch"
    expert_choice_eval_rule: str = "threshold"
    expert_choice_threshold_momentum: float = 0.1
    # provenance
    base_model: str | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.layer_types is None:
            attention = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [attention] * self.num_hidden_layers
        self.validate()
        super().__post_init__(**kwargs)

    # ----------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; raise a `ValueError` naming the field, its value and what is allowed."""
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "max_position_embeddings", "num_experts", "moe_intermediate_size",
                      "sparse_layer_interval"):
            value = getattr(self, field)
            _require(isinstance(value, int) and value >= 1, field, value, "a positive integer is required")
        if self.head_dim is None:
            _require(self.hidden_size % self.num_attention_heads == 0, "hidden_size", self.hidden_size,
                     f"must be divisible by `num_attention_heads`={self.num_attention_heads} (or set `head_dim`)")
        else:
            _require(isinstance(self.head_dim, int) and self.head_dim >= 1 and self.head_dim % 2 == 0, "head_dim",
                     self.head_dim, "a positive even integer is required (RoPE rotates pairs)")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 self.num_key_value_heads, f"must divide `num_attention_heads`={self.num_attention_heads}")
        _require(1 <= self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok", self.num_experts_per_tok,
                 f"choose 1..{self.num_experts} (`num_experts`={self.num_experts})")
        _require(not self.straight_through_topk or self.norm_topk_prob, "straight_through_topk",
                 self.straight_through_topk, "requires `norm_topk_prob=True`")
        _require(self.router_aux_loss_scope in ROUTER_AUX_LOSS_SCOPES, "router_aux_loss_scope",
                 self.router_aux_loss_scope, f"choose one of {ROUTER_AUX_LOSS_SCOPES}")
        _require(self.router_type in ROUTER_TYPES, "router_type", self.router_type, f"choose one of {ROUTER_TYPES}")
        self._validate_expert_choice()
        for field in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, field)
            _require(value is None or value > 0, field, value, "must be > 0, or None for dropless routing")
        for field in ("router_jitter_noise", "expert_dropout", "attention_dropout"):
            value = getattr(self, field)
            _require(0.0 <= value < 1.0, field, value, "must be in [0, 1)")
        for field in ("router_aux_loss_coef", "router_z_loss_coef", "router_sequence_aux_loss_coef",
                      "router_bias_update_rate", "initializer_range"):
            value = getattr(self, field)
            _require(value >= 0, field, value, "must be >= 0")
        _require(self.initializer_scale is None or self.initializer_scale > 0, "initializer_scale",
                 self.initializer_scale, "must be > 0, or None for normal(0, initializer_range)")
        _require(self.num_shared_experts >= 0, "num_shared_experts", self.num_shared_experts, "must be >= 0")
        _require(0 <= self.first_k_dense_layers <= self.num_hidden_layers, "first_k_dense_layers",
                 self.first_k_dense_layers, f"choose 0..{self.num_hidden_layers} (`num_hidden_layers`)")
        if self.sparse_layers is not None:
            for index in self.sparse_layers:
                _require(isinstance(index, int) and 0 <= index < self.num_hidden_layers, "sparse_layers",
                         self.sparse_layers, f"layer indices must be in 0..{self.num_hidden_layers - 1}")
            _require(len(set(self.sparse_layers)) == len(self.sparse_layers), "sparse_layers", self.sparse_layers,
                     "indices must be unique")
        _require(self.sliding_window is None or self.sliding_window >= 1, "sliding_window", self.sliding_window,
                 "a positive integer, or None for full attention")
        _require(len(self.layer_types) == self.num_hidden_layers, "layer_types", self.layer_types,
                 f"needs one entry per layer ({self.num_hidden_layers})")
        for layer_type in self.layer_types:
            _require(layer_type in ("full_attention", "sliding_attention"), "layer_types", self.layer_types,
                     "entries must be 'full_attention' or 'sliding_attention'")

    def _validate_expert_choice(self) -> None:
        _require(isinstance(self.expert_capacity_factor, (int, float)) and self.expert_capacity_factor > 0,
                 "expert_capacity_factor", self.expert_capacity_factor, "must be > 0 (experts per token on average)")
        _require(self.expert_choice_group in EXPERT_CHOICE_GROUPS, "expert_choice_group", self.expert_choice_group,
                 f"choose one of {EXPERT_CHOICE_GROUPS}")
        _require(self.expert_choice_eval_rule in EXPERT_CHOICE_EVAL_RULES, "expert_choice_eval_rule",
                 self.expert_choice_eval_rule, f"choose one of {EXPERT_CHOICE_EVAL_RULES}")
        _require(0 < self.expert_choice_threshold_momentum <= 1, "expert_choice_threshold_momentum",
                 self.expert_choice_threshold_momentum, "must be in (0, 1]")
        if self.router_type != "expert_choice":
            return
        # Token-choice mechanisms that expert choice replaces: refused rather than silently ignored.
        for field, allowed in (("capacity_factor", None), ("eval_capacity_factor", None),
                               ("router_bias_update_rate", 0.0), ("router_sequence_aux_loss_coef", 0.0)):
            value = getattr(self, field)
            _require(value == allowed, field, value,
                     f"expert-choice routing is balanced by construction (each expert takes its C tokens); set "
                     f"{allowed} or use a token-choice `router_type`")

    @property
    def routing_kind(self) -> str:
        """`EXPERT_CHOICE_ROUTING` when the experts choose their tokens, else `TOP_K_ROUTING` (top-k and Switch)."""
        return EXPERT_CHOICE_ROUTING if self.router_type == "expert_choice" else TOP_K_ROUTING

    @property
    def sparse_layer_indices(self) -> list[int]:
        """Indices of the layers whose MLP is a sparse block."""
        if self.sparse_layers is not None:
            return sorted(self.sparse_layers)
        first = self.first_k_dense_layers
        # Counted from the end of the interval (Switch/GLaM: layers 1, 3, 5, ... for an interval of 2).
        return [i for i in range(first, self.num_hidden_layers) if (i - first + 1) % self.sparse_layer_interval == 0]

    @property
    def num_subtokens(self) -> int:
        """Router rows per token (1 here; `num_moe_heads` for MH-MoE)."""
        return 1

    # transformers reads the parallel plans from the config as class attributes; here they are properties of the
    # layer layout, so that every entry names parameters that exist (a plan entry that matches nothing fails
    # transformers' `test_tp_plan_matches_params` and is reported when the plan is applied). Being properties, they are
    # never written to config.json and always follow the fields they derive from.
    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor-parallel plan of the base model: attention always, the dense-MLP entries when some layer keeps a
        dense MLP, the expert entries when some layer is sparse."""
        sparse_layers = self.sparse_layer_indices
        plan = dict(_ATTENTION_TP_PLAN)
        if len(sparse_layers) < self.num_hidden_layers:
            plan.update(_DENSE_MLP_TP_PLAN)
        if sparse_layers and self.routing_kind == TOP_K_ROUTING:
            plan.update(_EXPERTS_TP_PLAN)  # (expert choice: transformers' sharded experts take top-k assignments)
        return plan

    @property
    def base_model_ep_plan(self) -> dict[str, str]:
        """Expert-parallel plan of the base model: the experts of the sparse layers (empty without sparse layers)."""
        top_k = self.routing_kind == TOP_K_ROUTING  # the EP dispatch takes top-k assignments
        return dict(_EXPERTS_EP_PLAN) if self.sparse_layer_indices and top_k else {}


class SwitchConfig(MoeConfig):
    r"""
    Switch Transformer routing (Fedus et al., arXiv 2101.03961) in the hf_moe decoder: top-1, expert capacity,
    jitter, expert dropout and the 0.1-scaled init. Same fields as [`MoeConfig`]; these defaults differ:

        num_experts_per_tok (`int`, defaults to 1): must be 1.
        norm_topk_prob (`bool`, defaults to `False`): the output is `p_i(x) * E_i(x)` so the router gets a gradient.
        capacity_factor (`float`, defaults to 1.25) and eval_capacity_factor (`float`, defaults to 2.0): a token over
            its expert's capacity skips the expert (expert output 0) and passes on through the residual; unlike
            transformers' Switch port, it is not replaced by `p * x`.
        router_jitter_noise (`float`, defaults to 0.01).
        initializer_scale (`float`, defaults to 0.1): truncated normal with std `sqrt(0.1 / fan_in)`.
        sparse_layer_interval (`int`, defaults to 2): every other layer is sparse.
    """

    model_type = "hf_switch"

    num_experts_per_tok: int = 1
    norm_topk_prob: bool = False
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = 2.0
    router_jitter_noise: float = 0.01
    initializer_scale: float | None = 0.1
    sparse_layer_interval: int = 2

    def validate(self) -> None:
        _require(self.router_type != "expert_choice", "router_type", self.router_type,
                 "Switch routes each token to exactly 1 expert; use model_type 'hf_moe' (or 'hf_mh_moe') for "
                 "expert-choice routing")
        super().validate()
        _require(self.num_experts_per_tok == 1, "num_experts_per_tok", self.num_experts_per_tok,
                 "Switch routes each token to exactly 1 expert; use model_type 'hf_moe' for top-k")


class MHMoeConfig(MoeConfig):
    r"""
    Multi-Head Mixture-of-Experts (Wu et al., arXiv 2404.15045): a head projection d -> d, each token split into
    `num_moe_heads` sub-tokens of width d/h that are routed (top-k each) to experts acting on d/h, merged back and
    passed through a merge projection d -> d. Same fields as [`MoeConfig`], plus:

        num_moe_heads (`int`, defaults to 4): h, the number of sub-tokens per token; must divide `hidden_size`.
            Decoupled from the attention heads.

    The load-balancing and z-losses count sub-tokens, and the padding mask is repeated per head.
    `moe_intermediate_size` is the inner size of an expert acting on d/h. Use [`mh_moe_matched_config`] for a
    FLOPs- and parameter-matched MH-MoE counterpart of a [`MoeConfig`].
    """

    model_type = "hf_mh_moe"

    num_moe_heads: int = 4

    def validate(self) -> None:
        super().validate()
        _require(isinstance(self.num_moe_heads, int) and self.num_moe_heads >= 1, "num_moe_heads",
                 self.num_moe_heads, "a positive integer is required")
        _require(self.hidden_size % self.num_moe_heads == 0, "hidden_size", self.hidden_size,
                 f"must be divisible by `num_moe_heads`={self.num_moe_heads}")

    @property
    def num_subtokens(self) -> int:
        return self.num_moe_heads


def mh_moe_matched_config(config: MoeConfig, num_moe_heads: int, num_experts_per_tok: int | None = None
                          ) -> MHMoeConfig:
    """An MH-MoE config with the per-token FLOPs and the expert parameters of a top-k MoE config.

    Huang et al., arXiv 2411.16205, Eqs. 8-9, written for SwiGLU experts (3 matrices) and the head + merge projections
    (2 d^2 multiply-adds per token):

    - FLOPs (Eq. 8): `3 * k * d * d_moe = 2 * d^2 + 3 * k_mh * d * d_mh`, so `d_mh = (k * d_moe - 2d/3) / k_mh`.
    - Parameters (Eq. 9): `E * 3 * d * d_moe = 2 * d^2 + E_mh * 3 * (d/h) * d_mh`, solved for `E_mh` and rounded.

    `d_mh` is rounded to a multiple of 8. `k_mh` (experts per sub-token) defaults to h, as in the paper's
    configurations (h=2: top-2, h=3: top-3).

    Example:
    ```python
    >>> from hf_moe import MoeConfig, mh_moe_matched_config
    >>> moe = MoeConfig(hidden_size=768, moe_intermediate_size=2048, num_experts=8, num_experts_per_tok=1)
    >>> mh = mh_moe_matched_config(moe, num_moe_heads=3)
    >>> mh.moe_intermediate_size, mh.num_experts_per_tok
    (512, 3)
    ```
    """
    d, heads = config.hidden_size, num_moe_heads
    _require(d % heads == 0, "num_moe_heads", heads, f"must divide `hidden_size`={d}")
    k_mh = heads if num_experts_per_tok is None else num_experts_per_tok
    d_moe, k, experts = config.moe_intermediate_size, config.num_experts_per_tok, config.num_experts
    # Rounded to a multiple of 8 so the grouped-matmul kernels get 16-byte aligned rows (FLOPs stay within ~1%).
    d_mh = 8 * round((k * d_moe - 2 * d / 3) / k_mh / 8)
    _require(d_mh >= 1, "num_moe_heads", heads,
             f"no positive expert size matches the FLOPs of top-{k} experts of size {d_moe} at width {d}")
    experts_mh = max(k_mh, round((experts * 3 * d * d_moe - 2 * d * d) / (3 * (d // heads) * d_mh)))
    fields = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "num_moe_heads"):
        fields.pop(key, None)
    fields.update(num_moe_heads=heads, moe_intermediate_size=d_mh, num_experts=experts_mh,
                  num_experts_per_tok=k_mh)
    return MHMoeConfig(**fields)


__all__ = ["MoeConfig", "SwitchConfig", "MHMoeConfig", "mh_moe_matched_config", "TOP_K_ROUTING",
           "EXPERT_CHOICE_ROUTING"]
