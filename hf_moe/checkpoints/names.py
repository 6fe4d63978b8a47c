"""How model folders and their tensors are named on disk: the hf_moe model types, the code files a folder ships, the
tokenizer files copied beside the weights, and the tensor names of a sparse block.

(How MoE *modules* are named at run time, for hf_moe and transformers' own MoEs, is `hf_moe.moe_layers`' job; Hub
ids, `lineage.py`'s.)
"""

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..modeling.configuration_hf_moe import MHMoeConfig, MoeConfig, SwitchConfig

CONFIG_CLASSES = {config_class.model_type: config_class for config_class in (MoeConfig, SwitchConfig, MHMoeConfig)}
HF_MOE_MODEL_TYPES = tuple(CONFIG_CLASSES)  # ("hf_moe", "hf_switch", "hf_mh_moe")
# The remote code every hf_moe folder carries: the configuration and modeling files `auto_map` points into, and the
# routing and experts' kernels the modeling file imports relatively (transformers' remote-code loader follows such
# imports within the folder). Found without importing the modeling file (which imports transformers' whole modeling
# stack).
CODE_MODULES = ("configuration_hf_moe", "modeling_hf_moe", "routing_hf_moe", "experts_kernels_hf_moe")
CODE_PATHS = tuple(Path(importlib.util.find_spec(f"hf_moe.modeling.{module}").origin) for module in CODE_MODULES)
CODE_FILES = tuple(path.name for path in CODE_PATHS)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")

# Tensor names of a Llama-family decoder layer's dense MLP, and of hf_moe's sparse block (transformers' layout).
DENSE_MLP_WEIGHT = re.compile(r"model\.layers\.(?P<layer>\d+)\.mlp\.(?P<proj>gate_proj|up_proj|down_proj)\.weight")
ROUTER_WEIGHT = re.compile(r"(?P<layer>model\.layers\.\d+)\.mlp\.gate\.weight")
EXPERTS_WEIGHT = re.compile(r"(?P<layer>model\.layers\.\d+)\.mlp\.experts\.(?P<proj>gate_up_proj|down_proj)")
SHARED_EXPERTS_WEIGHT = re.compile(r"(?P<layer>model\.layers\.\d+)\.mlp\.shared_experts\.(?P<proj>\w+)\.weight")

# Any MoE family's routed-expert tensors on disk, by decoder layer: the router (`gate.weight`, and every other router
# tensor with one row per expert: hf_moe's `noise_weight`, DeepSeek-V3's `e_score_correction_bias`), the fused experts
# (hf_moe and transformers 5.x modules: `experts.gate_up_proj (E, 2I, H)`, `experts.down_proj (E, H, I)`) or one set of
# tensors per expert (what transformers 5.x `save_pretrained` writes for Mixtral, Qwen2/3-MoE, OLMoE and DeepSeek-V3,
# as on the Hub: `experts.3.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.3.w1.weight`). Shared experts
# (`shared_expert`, `shared_experts`, `shared_expert_gate`) match none of these.
_SPARSE_BLOCK_ON_DISK = r"(?P<block>model\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe))"
ROUTER_TENSOR = re.compile(_SPARSE_BLOCK_ON_DISK + r"\.gate\.(?P<name>\w+)")
FUSED_EXPERTS_TENSOR = re.compile(_SPARSE_BLOCK_ON_DISK + r"\.experts\.(?P<name>[A-Za-z_]\w*)")
PER_EXPERT_TENSOR = re.compile(_SPARSE_BLOCK_ON_DISK + r"\.experts\.(?P<expert>\d+)\.(?P<name>[\w.]+)")


@dataclass(frozen=True)
class SparseBlockNames:
    """The tensor names of decoder layer `layer`'s sparse block."""

    layer: int

    @property
    def prefix(self) -> str:
        return f"model.layers.{self.layer}.mlp"

    @property
    def router(self) -> str:
        return f"{self.prefix}.gate.weight"

    @property
    def expert_choice_threshold(self) -> str:
        """An expert-choice router's inference threshold."""
        return f"{self.prefix}.gate.expert_choice_threshold"

    @property
    def expert_choice_threshold_updates(self) -> str:
        """How many training forwards estimated that threshold."""
        return f"{self.prefix}.gate.expert_choice_threshold_updates"

    @property
    def gate_up_proj(self) -> str:
        return f"{self.prefix}.experts.gate_up_proj"

    @property
    def down_proj(self) -> str:
        return f"{self.prefix}.experts.down_proj"


def meta_model(config):
    """The causal-LM model of `config` on the meta device: names, shapes and parameter counts without memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def expected_tensor_names(model) -> set[str]:
    """The tensor names a saved folder of `model` (e.g. its meta-device instance) holds: a tied `lm_head` is not
    stored."""
    names = set(model.state_dict())
    if model.config.tie_word_embeddings:
        names.discard("lm_head.weight")
    return names

