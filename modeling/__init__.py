"""Architecture definitions of hf_moe, installed as `hf_moe.modeling`.

The code files here are self-contained (torch + transformers only): `save_pretrained` copies them next to the weights
so that a model folder loads with `trust_remote_code=True` where hf_moe is not installed. Names are imported on first
use (PEP 562): the configs without transformers' modeling stack, the models with it.
"""

import importlib

_CONFIGURATION = ("MoeConfig", "SwitchConfig", "MHMoeConfig", "mh_moe_matched_config", "TOP_K_ROUTING",
                  "EXPERT_CHOICE_ROUTING")
_MODELING = ("MODEL_CLASSES", "MoeModel", "MoeForCausalLM", "MoeForSequenceClassification", "SwitchModel",
             "SwitchForCausalLM", "SwitchForSequenceClassification", "MHMoeModel", "MHMoeForCausalLM",
             "MHMoeForSequenceClassification", "MoeCausalLMOutput", "load_balancing_loss", "router_z_loss",
             "sequence_balance_loss", "router_losses", "RouterLosses", "share_of_accumulated_batch")
__all__ = [*_CONFIGURATION, *_MODELING]


def __getattr__(name: str):
    if name in _CONFIGURATION:
        module = ".configuration_hf_moe"
    elif name in _MODELING:
        module = ".modeling_hf_moe"
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
