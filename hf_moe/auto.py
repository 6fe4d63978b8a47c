"""Registers the three hf_moe model types with transformers' Auto classes (run once by `import hf_moe`).

The configs are registered at import. The model classes need transformers' whole modeling stack (seconds to
import), and no model can be built or loaded before its config exists, so they are registered (with the card hooks
and the 4-bit experts quantizer) when the first hf_moe config is created: `import hf_moe` costs about what
transformers' own Auto import does, and changes nothing for other models until an hf_moe config exists.
"""

import functools

from transformers import AutoConfig

from .checkpoints.names import CONFIG_CLASSES
from .modeling.configuration_hf_moe import MoeConfig

AUTO_CLASS_NAMES = ("AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification")


def register_auto_classes() -> None:
    """Make `AutoConfig.for_model("hf_moe" | "hf_switch" | "hf_mh_moe")` and the Auto model classes know hf_moe."""
    for model_type, config_class in CONFIG_CLASSES.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
    if "_hf_moe_registers_models" in vars(MoeConfig):
        return
    post_init = MoeConfig.__post_init__

    # Our own config class (the three types share it): its first instance registers the model classes.
    @functools.wraps(post_init)
    def post_init_registering_models(self, *args, **kwargs):
        register_model_classes()
        return post_init(self, *args, **kwargs)

    MoeConfig.__post_init__ = post_init_registering_models
    MoeConfig._hf_moe_registers_models = True


@functools.cache
def register_model_classes() -> None:
    """The model classes of the three types with `AutoModel`, `AutoModelForCausalLM` and
    `AutoModelForSequenceClassification`, hf_moe's card on save and push, and 4-bit experts through
    `from_pretrained(quantization_config=BitsAndBytesConfig(...))` (once)."""
    import transformers

    from .hub.push import install_card_hooks
    from .modeling.modeling_hf_moe import MODEL_CLASSES
    from .quantization.quantizer import register_experts_quantizers

    for config_class, heads in MODEL_CLASSES.items():
        for auto_name, model_class in heads.items():
            getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)
    install_card_hooks()
    register_experts_quantizers()
