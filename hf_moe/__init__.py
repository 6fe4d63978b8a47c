"""hf_moe: Mixture-of-Experts decoders (MoE, Switch, MH-MoE) for Hugging Face transformers.

`import hf_moe` registers the model types `hf_moe`, `hf_switch` and `hf_mh_moe` with the Auto classes.
"""

from .auto import register_auto_classes
from .export import ExportArguments, ExportRefusedError, export, verify_export
from .hub import check_folder, publish, register_model_card_writer
from .modeling import (
    MHMoeConfig,
    MHMoeForCausalLM,
    MHMoeForSequenceClassification,
    MHMoeModel,
    MoeCausalLMOutput,
    MoeConfig,
    MoeForCausalLM,
    MoeForSequenceClassification,
    MoeModel,
    SwitchConfig,
    SwitchForCausalLM,
    SwitchForSequenceClassification,
    SwitchModel,
    load_balancing_loss,
    mh_moe_matched_config,
    router_z_loss,
)
from .quantization.quantizer import register_experts_quantizers
from .upcycling import UnsupportedCheckpointError, UpcycleArguments, upcycle, verify_upcycling

__version__ = "0.1.0"

register_auto_classes()
register_model_card_writer()
register_experts_quantizers()  # from_pretrained(quantization_config=BitsAndBytesConfig(...)) quantises experts too

__all__ = [
    "MoeConfig", "SwitchConfig", "MHMoeConfig", "mh_moe_matched_config",
    "MoeModel", "MoeForCausalLM", "MoeForSequenceClassification",
    "SwitchModel", "SwitchForCausalLM", "SwitchForSequenceClassification",
    "MHMoeModel", "MHMoeForCausalLM", "MHMoeForSequenceClassification",
    "MoeCausalLMOutput", "load_balancing_loss", "router_z_loss",
    "upcycle", "UpcycleArguments", "verify_upcycling", "UnsupportedCheckpointError",
    "export", "ExportArguments", "ExportRefusedError", "verify_export",
    "check_folder", "publish",
]
