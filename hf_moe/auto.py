"""Registers the three hf_moe model types with transformers' Auto classes (run once by `import hf_moe`)."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .modeling import MODEL_CLASSES

AUTO_CLASSES = {
    "AutoModel": AutoModel,
    "AutoModelForCausalLM": AutoModelForCausalLM,
    "AutoModelForSequenceClassification": AutoModelForSequenceClassification,
}


def register_auto_classes() -> None:
    """Make `AutoConfig.for_model("hf_moe" | "hf_switch" | "hf_mh_moe")` and the Auto model classes know hf_moe."""
    for config_class, heads in MODEL_CLASSES.items():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_name, model_class in heads.items():
            AUTO_CLASSES[auto_name].register(config_class, model_class, exist_ok=True)
