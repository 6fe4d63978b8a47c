"""The MoE config of an upcycled dense Llama-family config: the decoder copied field for field, the sparse block
chosen by the user."""

from transformers import PreTrainedConfig

from ..checkpoints.names import CONFIG_CLASSES
from ..modeling import MoeConfig
from ..modeling.configuration_hf_moe import EXPERT_CHOICE_ROUTING

ARCHITECTURES = CONFIG_CLASSES  # model type -> config class: hf_moe, hf_switch, hf_mh_moe


def parse_moe_layers(moe_layers: str | list[int], num_layers: int) -> list[int]:
    """'all' | 'every_other' (layers 1, 3, 5, ... as in Switch/GLaM) | 'i,j,k' | [i, j, k] -> sorted indices."""
    if isinstance(moe_layers, list):
        indices = moe_layers
    elif moe_layers == "all":
        indices = list(range(num_layers))
    elif moe_layers == "every_other":
        indices = list(range(1, num_layers, 2))
    else:
        try:
            indices = [int(part) for part in moe_layers.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"`moe_layers`={moe_layers!r} is invalid: use 'all', 'every_other' or a comma-separated "
                             "list of layer indices") from None
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad or not indices:
        raise ValueError(f"`moe_layers`={moe_layers!r} is invalid: layer indices must be in 0..{num_layers - 1}")
    return sorted(set(indices))


def dense_decoder_fields(dense: PreTrainedConfig) -> dict:
    """The decoder fields of an hf_moe config that reproduce `dense` (llama, mistral, qwen2 or qwen3) exactly."""
    model_type = dense.model_type
    attention_bias = bool(getattr(dense, "attention_bias", False))
    layer_types = getattr(dense, "layer_types", None)
    sliding_window = getattr(dense, "sliding_window", None)
    if model_type == "mistral":
        layer_types = None  # Mistral applies its window (if any) to every layer
    elif not (layer_types and "sliding_attention" in layer_types):
        sliding_window = None
    head_dim = getattr(dense, "head_dim", None)
    return dict(
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=getattr(dense, "num_key_value_heads", None) or dense.num_attention_heads,
        head_dim=head_dim if head_dim != dense.hidden_size // dense.num_attention_heads else None,
        hidden_act=dense.hidden_act,
        max_position_embeddings=dense.max_position_embeddings,
        rope_parameters=dict(dense.rope_parameters),
        rms_norm_eps=dense.rms_norm_eps,
        # Qwen2 has biases on q/k/v but not o; Llama/Qwen3's `attention_bias` covers all four projections.
        attention_bias=True if model_type == "qwen2" else attention_bias,
        attention_output_bias=False if model_type == "qwen2" else attention_bias,
        use_qk_norm=model_type == "qwen3",
        sliding_window=sliding_window,
        layer_types=list(layer_types) if layer_types else None,
        attention_dropout=float(getattr(dense, "attention_dropout", 0.0)),
        tie_word_embeddings=bool(getattr(dense, "tie_word_embeddings", False)),
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        pad_token_id=getattr(dense, "pad_token_id", None),
    )


def upcycled_config(dense: PreTrainedConfig, arch: str, num_experts: int, top_k: int, sparse_layers: list[int],
                    moe_intermediate_size: int, num_moe_heads: int, base_model: str,
                    capacity_factor: float | None = None, router_type: str = "softmax_topk",
                    expert_capacity_factor: float = 2.0) -> MoeConfig:
    """The target config. Routing is set up for dense equivalence at step 0 with copied experts: renormalised
    top-k, dropless inference, training capacity `capacity_factor` (None = dropless); Switch uses the
    straight-through top-1 weight (value 1, router gradient kept). `router_type="expert_choice"`: experts choose
    `expert_capacity_factor` tokens each on average (not function-preserving: a token gets a varying number of
    experts)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"`arch`={arch!r} is invalid: choose one of {tuple(ARCHITECTURES)}")
    fields = dense_decoder_fields(dense)
    fields.update(num_experts=num_experts, num_experts_per_tok=top_k, sparse_layers=sparse_layers,
                  moe_intermediate_size=moe_intermediate_size, norm_topk_prob=True, eval_capacity_factor=None,
                  capacity_factor=capacity_factor, router_type=router_type,
                  base_model=base_model)
    if router_type == EXPERT_CHOICE_ROUTING:
        fields.update(expert_capacity_factor=expert_capacity_factor)
    if arch == "hf_switch":
        fields.update(straight_through_topk=True)
    if arch == "hf_mh_moe":
        fields.update(num_moe_heads=num_moe_heads)
    return ARCHITECTURES[arch](**fields)
