"""Config validation, sparse-layer selection and the MH-MoE matching helper."""

import pytest
from transformers import AutoConfig

from hf_moe import MHMoeConfig, MoeConfig, SwitchConfig, mh_moe_matched_config

INVALID = [
    (MoeConfig, dict(num_experts=2, num_experts_per_tok=4), "`num_experts_per_tok`=4 is invalid: choose 1..2"),
    (MoeConfig, dict(hidden_size=30, num_attention_heads=4), "`hidden_size`=30 is invalid: must be divisible by"),
    (MoeConfig, dict(num_attention_heads=8, num_key_value_heads=3), "`num_key_value_heads`=3 is invalid"),
    (MoeConfig, dict(capacity_factor=0.0), "`capacity_factor`=0.0 is invalid: must be > 0"),
    (MoeConfig, dict(eval_capacity_factor=-1.0), "`eval_capacity_factor`=-1.0 is invalid"),
    (MoeConfig, dict(router_type="expert_routing"), "`router_type`='expert_routing' is invalid: choose one of"),
    (MoeConfig, dict(router_type="expert_choice", expert_capacity_factor=0), "`expert_capacity_factor`=0 is invalid"),
    (MoeConfig, dict(expert_choice_group="token"),
     "`expert_choice_group`='token' is invalid: choose one of ('batch', 'sequence')"),
    (MoeConfig, dict(expert_choice_eval_rule="topk"),
     "`expert_choice_eval_rule`='topk' is invalid: choose one of ('threshold', 'batch')"),
    (MoeConfig, dict(expert_choice_threshold_momentum=0.0), "`expert_choice_threshold_momentum`=0.0 is invalid"),
    (MoeConfig, dict(router_type="expert_choice", capacity_factor=1.25),
     "`capacity_factor`=1.25 is invalid: expert-choice routing is balanced by construction"),
    (MoeConfig, dict(router_type="expert_choice", router_bias_update_rate=1e-3),
     "`router_bias_update_rate`=0.001 is invalid: expert-choice routing is balanced by construction"),
    (MoeConfig, dict(router_type="expert_choice", router_sequence_aux_loss_coef=1e-4),
     "`router_sequence_aux_loss_coef`=0.0001 is invalid"),
    (SwitchConfig, dict(router_type="expert_choice"), "use model_type 'hf_moe' (or 'hf_mh_moe') for expert-choice"),
    (MoeConfig, dict(num_hidden_layers=4, sparse_layers=[1, 4]), "`sparse_layers`=[1, 4] is invalid"),
    (MoeConfig, dict(sparse_layers=[1, 1]), "indices must be unique"),
    (MoeConfig, dict(num_hidden_layers=4, first_k_dense_layers=5), "`first_k_dense_layers`=5 is invalid"),
    (MoeConfig, dict(sparse_layer_interval=0), "`sparse_layer_interval`=0 is invalid"),
    (MoeConfig, dict(num_experts=0), "`num_experts`=0 is invalid"),
    (MoeConfig, dict(expert_dropout=1.5), "`expert_dropout`=1.5 is invalid: must be in [0, 1)"),
    (MoeConfig, dict(router_jitter_noise=-0.1), "`router_jitter_noise`=-0.1 is invalid"),
    (MoeConfig, dict(router_aux_loss_coef=-1.0), "`router_aux_loss_coef`=-1.0 is invalid: must be >= 0"),
    (MoeConfig, dict(router_aux_loss_scope="batch"),
     "`router_aux_loss_scope`='batch' is invalid: choose one of ('micro_batch', 'global_batch')"),
    (MoeConfig, dict(initializer_scale=0.0), "`initializer_scale`=0.0 is invalid"),
    (MoeConfig, dict(num_shared_experts=-1), "`num_shared_experts`=-1 is invalid"),
    (MoeConfig, dict(head_dim=7), "`head_dim`=7 is invalid"),
    (MoeConfig, dict(num_hidden_layers=2, layer_types=["full_attention"]), "`layer_types`"),
    (MoeConfig, dict(num_hidden_layers=1, layer_types=["local"]), "entries must be 'full_attention'"),
    (MoeConfig, dict(sliding_window=0), "`sliding_window`=0 is invalid"),
    (MoeConfig, dict(norm_topk_prob=False, straight_through_topk=True), "requires `norm_topk_prob=True`"),
    (SwitchConfig, dict(num_experts_per_tok=2), "Switch routes each token to exactly 1 expert"),
    (MHMoeConfig, dict(hidden_size=48, num_attention_heads=4, num_moe_heads=5), "`num_moe_heads`=5"),
    (MHMoeConfig, dict(num_moe_heads=0), "`num_moe_heads`=0 is invalid"),
]


@pytest.mark.parametrize("config_class, kwargs, message", INVALID, ids=[m[:40] for _, _, m in INVALID])
def test_invalid_config_raises_with_field_value_and_allowed(config_class, kwargs, message):
    with pytest.raises(ValueError) as error:
        config_class(**kwargs)
    assert message in str(error.value)


def test_auto_config_knows_the_three_model_types():
    for model_type, config_class in [("hf_moe", MoeConfig), ("hf_switch", SwitchConfig), ("hf_mh_moe", MHMoeConfig)]:
        config = AutoConfig.for_model(model_type, hidden_size=64, num_attention_heads=4)
        assert type(config) is config_class and config.hidden_size == 64


def test_switch_defaults_follow_the_paper():
    config = SwitchConfig()
    assert (config.num_experts_per_tok, config.capacity_factor, config.eval_capacity_factor) == (1, 1.25, 2.0)
    assert (config.router_jitter_noise, config.initializer_scale, config.norm_topk_prob) == (0.01, 0.1, False)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(num_hidden_layers=6), [0, 1, 2, 3, 4, 5]),
        (dict(num_hidden_layers=6, sparse_layer_interval=2), [1, 3, 5]),
        (dict(num_hidden_layers=6, first_k_dense_layers=2), [2, 3, 4, 5]),
        (dict(num_hidden_layers=6, first_k_dense_layers=1, sparse_layer_interval=2), [2, 4]),
        (dict(num_hidden_layers=6, sparse_layers=[4, 0]), [0, 4]),
    ],
)
def test_sparse_layer_selection(kwargs, expected):
    assert MoeConfig(**kwargs).sparse_layer_indices == expected


def test_config_round_trips_through_dict():
    config = MHMoeConfig(hidden_size=64, num_attention_heads=4, num_moe_heads=4, capacity_factor=1.5,
                         sparse_layers=[0], num_hidden_layers=2)
    again = MHMoeConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize("heads, expected_size, expected_experts", [(2, 768, 41), (3, 512, 93)])
def test_mh_moe_matched_config_matches_flops_of_the_paper_settings(heads, expected_size, expected_experts):
    # arXiv 2411.16205: d=768, SMoE top-1 with d_moe=2048 -> h=2: d_mh=768 top-2; h=3: d_mh=512 top-3.
    moe = MoeConfig(hidden_size=768, num_attention_heads=12, moe_intermediate_size=2048, num_experts=8,
                    num_experts_per_tok=1)
    mh = mh_moe_matched_config(moe, num_moe_heads=heads)
    assert (mh.moe_intermediate_size, mh.num_experts_per_tok, mh.num_moe_heads) == (expected_size, heads, heads)
    assert mh.num_experts == expected_experts
    d = 768
    moe_flops = 3 * 1 * d * 2048
    mh_flops = 2 * d * d + 3 * mh.num_experts_per_tok * d * mh.moe_intermediate_size
    assert mh_flops == moe_flops
    moe_params = 8 * 3 * d * 2048
    mh_params = 2 * d * d + mh.num_experts * 3 * (d // heads) * mh.moe_intermediate_size
    assert abs(mh_params - moe_params) / moe_params < 0.02
