"""The training layer on transformers' own MoE families (tiny random configs, stock Trainer): routers found by
convention, expert statistics equal to an independent count, freezing, the non-finite guard; and the Trainer
behaviours the callbacks rely on where no public hook exists."""

import logging

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_moe.moe_layers import find_moe_layers, moe_module_names
from hf_moe.training import ExpertStatsCallback, NonFiniteGuardCallback, add_moe_callbacks, freeze_moe

from .test_training import _Poison

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=24, shared_expert_intermediate_size=24),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=24, head_dim=8),
    "olmoe": lambda: transformers.OlmoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **{**SMALL, "num_key_value_heads": 4}, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=0, moe_intermediate_size=24, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "gpt_oss": lambda: transformers.GptOssConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                                 sliding_window=16),
}


def _rows(count=16, length=12):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SMALL["vocab_size"], (count, length), generator=generator).tolist()
    return [{"input_ids": row, "attention_mask": [1] * length, "labels": row} for row in ids]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_statistics_freezing_and_nonfinite_guard_on_builtin_moe(family, tmp_path):
    model = AutoModelForCausalLM.from_config(FAMILIES[family]())
    layers = find_moe_layers(model)
    assert [layer.index for layer in layers] == [0, 1] and all(layer.num_experts == 4 for layer in layers)
    assert all(layer.experts_name.endswith(".experts") for layer in layers)

    # The independent count: top-k of the router logits the model itself returns with output_router_logits.
    model.config.output_router_logits = True
    counts = torch.zeros(len(layers), 4)

    def count(module, inputs, outputs):
        if module.training:
            for row, logits in enumerate(outputs.router_logits):
                counts[row] += torch.bincount(logits.topk(2, dim=-1).indices.reshape(-1), minlength=4).float()

    model.register_forward_hook(count)
    freeze_moe(model, "experts")
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    routers = {n: p.detach().clone() for name in moe_module_names(model, "router")
               for n, p in model.named_parameters() if n.startswith(f"{name}.")}
    assert experts and routers and not set(experts) & set(routers)

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             logging_steps=4, report_to=[], use_cpu=True, save_strategy="no", optim="adamw_torch")
    trainer = add_moe_callbacks(Trainer(model=model, args=args, train_dataset=_rows()), ExpertStatsCallback(),
                                NonFiniteGuardCallback())
    poison = _Poison(model, steps=[3])
    trainer.add_callback(poison)
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    for row, layer in enumerate(layers):
        fractions = torch.tensor([logged[f"moe/layer{layer.index}/expert{e}_fraction"] for e in range(4)])
        assert fractions.sum().item() == pytest.approx(1.0)
        assert torch.allclose(fractions, counts[row] / counts[row].sum(), atol=1e-6), (fractions, counts[row])
    assert logged["moe/nonfinite_skipped_steps"] == 1.0
    # Frozen experts bit-identical, routers trained.
    parameters = dict(model.named_parameters())
    assert all(torch.equal(parameters[n], value) for n, value in experts.items())
    assert any(not torch.equal(parameters[n], value) for n, value in routers.items())
    # The poisoned step changed no weight and no optimizer state.
    (weights_before, state_before), (weights_after, state_after) = poison.before[3], poison.after[3]
    assert all(torch.equal(weights_after[n], value) for n, value in weights_before.items())
    assert state_before.keys() == state_after.keys() and state_before
    for key, values in state_before.items():
        for name, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_after[key][name])), (key, name)


def test_model_without_router_is_named_in_a_warning(caplog):
    dense = AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMALL))
    with caplog.at_level(logging.WARNING):
        assert find_moe_layers(dense, warn=True) == []
    assert "model_type='llama'" in caplog.text and "no recognisable MoE router" in caplog.text


def test_trainer_runs_reporters_before_user_callbacks_so_add_moe_callbacks_reorders(tmp_path):
    """No public hook places a callback ahead of the `report_to` integrations: pinned here."""
    model = AutoModelForCausalLM.from_config(FAMILIES["mixtral"]())
    args = TrainingArguments(output_dir=str(tmp_path), report_to=["tensorboard"], use_cpu=True)
    stats = ExpertStatsCallback()
    stock = Trainer(model=model, args=args, callbacks=[stats])
    names = [type(cb).__name__ for cb in stock.callback_handler.callbacks]
    assert names.index("TensorBoardCallback") < names.index("ExpertStatsCallback")
    stats = ExpertStatsCallback()
    ordered = add_moe_callbacks(Trainer(model=model, args=args), stats)
    names = [type(cb).__name__ for cb in ordered.callback_handler.callbacks]
    assert names[:3] == ["DefaultFlowCallback", "ExpertStatsCallback", "TensorBoardCallback"]
    assert stats.peers is ordered.callback_handler.callbacks


def test_finetune_command_takes_training_arguments_and_trains_a_builtin_moe(tmp_path):
    from hf_moe.cli import parse_command
    from hf_moe.data import build_mixture
    from hf_moe.recipes import evaluate_model

    from .conftest import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = FAMILIES["qwen3_moe"]()
    config.vocab_size = len(tokenizer)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "qwen3")
    tokenizer.save_pretrained(tmp_path / "qwen3")
    run, (args, training_args) = parse_command([
        "finetune", str(tmp_path / "qwen3"), "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--lr_scheduler_type", "linear", "--gradient_checkpointing", "true",
        "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
        "--train_per_family", "2", "--eval_per_family", "1", "--max_length", "48", "--freeze", "router"])
    assert (args.freeze, training_args.lr_scheduler_type, training_args.gradient_checkpointing) == \
        ("router", "linear", True)
    assert training_args.optim == "adamw_torch_fused" and training_args.max_steps == 2  # finetune's defaults apply
    run(args, training_args)
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    report = evaluate_model(tuned, tokenizer, {"heldout": build_mixture(0, 1, seed=0)["heldout"]}, max_new_tokens=2)
    assert report["expert_specialisation"]


def test_training_card_names_the_frozen_router_of_gpt_oss():
    """gpt-oss names its router `mlp.router` (not `mlp.gate`): the card's "frozen MoE parts" must still see it."""
    from transformers import GptOssConfig

    from hf_moe.hub.training import frozen_parts

    config = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["full_attention"] * 2)
    model = AutoModelForCausalLM.from_config(config)
    assert frozen_parts(model) == "none"
    freeze_moe(model, "router")
    assert frozen_parts(model) == "router"
    freeze_moe(model, "experts")
    assert frozen_parts(model) == "router, experts"
