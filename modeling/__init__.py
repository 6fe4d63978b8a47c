"""Architecture definitions of hf_moe, installed as `hf_moe.modeling`.

The two files here are self-contained (torch + transformers only): `save_pretrained` copies them next to the weights
so that a model folder loads with `trust_remote_code=True` where hf_moe is not installed.
"""

from .configuration_hf_moe import MHMoeConfig, MoeConfig, SwitchConfig, mh_moe_matched_config
from .modeling_hf_moe import (
    MODEL_CLASSES,
    MHMoeForCausalLM,
    MHMoeForSequenceClassification,
    MHMoeModel,
    MoeCausalLMOutput,
    MoeForCausalLM,
    MoeForSequenceClassification,
    MoeModel,
    SwitchForCausalLM,
    SwitchForSequenceClassification,
    SwitchModel,
    load_balancing_loss,
    router_z_loss,
    sequence_balance_loss,
)

__all__ = [
    "MoeConfig", "SwitchConfig", "MHMoeConfig", "mh_moe_matched_config", "MODEL_CLASSES",
    "MoeModel", "MoeForCausalLM", "MoeForSequenceClassification",
    "SwitchModel", "SwitchForCausalLM", "SwitchForSequenceClassification",
    "MHMoeModel", "MHMoeForCausalLM", "MHMoeForSequenceClassification",
    "MoeCausalLMOutput", "load_balancing_loss", "router_z_loss", "sequence_balance_loss",
]
