"""Shared fixtures: tiny random configs of the three architectures (CPU, float32, fast)."""

import pytest
import torch

import hf_moe  # noqa: F401  (registers the Auto classes)
from hf_moe import MHMoeConfig, MoeConfig, SwitchConfig

TINY_DECODER = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def tiny_config(model_type: str, **overrides):
    """A tiny random config of `model_type` ('hf_moe', 'hf_switch' or 'hf_mh_moe')."""
    fields = dict(TINY_DECODER, num_experts=4)
    if model_type == "hf_moe":
        fields.update(num_experts_per_tok=2)
        return MoeConfig(**{**fields, **overrides})
    if model_type == "hf_switch":
        return SwitchConfig(**{**fields, **overrides})
    fields.update(num_experts_per_tok=2, num_moe_heads=2, moe_intermediate_size=24)
    return MHMoeConfig(**{**fields, **overrides})


MODEL_TYPES = ["hf_moe", "hf_switch", "hf_mh_moe"]


@pytest.fixture(params=MODEL_TYPES)
def model_type(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
