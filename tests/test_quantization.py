"""Quantised loading that really quantises the fused experts, LoRA on experts, adapters, merging and QLoRA."""

import json
import logging

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from hf_moe.cli import main
from hf_moe.data import build_mixture
from hf_moe.moe_layers import find_moe_layers
from hf_moe.quantization import resident_weight_bytes, unquantized_expert_parameters
from hf_moe.quantization.lora import adapted_parameters, attach_moe_lora, merge_lora, moe_lora_config
from hf_moe.training import evaluate_model

from .conftest import MODEL_TYPES, byte_tokenizer, tiny_config

FOUR_BIT = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
IDS = torch.tensor([[5, 17, 42, 8, 66, 23, 9, 71], [3, 44, 12, 90, 31, 7, 58, 26]])


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """{model type: folder of a tiny random float32 model}."""
    folders = {}
    for model_type in MODEL_TYPES:
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(model_type)
        AutoModelForCausalLM.from_config(tiny_config(model_type)).save_pretrained(folder)
        folders[model_type] = folder
    return folders


def _expert_tensor_shapes(model) -> dict[str, torch.Size]:
    """The fused 3-D expert tensors of a full-precision model, found by name and shape alone (independently of
    hf_moe.quantization): {qualified name: shape}."""
    return {name: parameter.shape for name, parameter in model.named_parameters()
            if ".experts." in name and parameter.dim() == 3}


def _randomise_lora_b(peft_model) -> None:
    """LoRA B starts at zero (the adapter is a no-op); give it values so adapters change the logits."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)


def test_4bit_from_pretrained_quantises_every_expert_and_keeps_router_and_norms_in_float(tiny_folders, model_type):
    full = AutoModelForCausalLM.from_pretrained(tiny_folders[model_type], dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(tiny_folders[model_type], dtype=torch.float32,
                                                     quantization_config=FOUR_BIT)
    experts = _expert_tensor_shapes(full)
    sparse_layers = [layer for layer in find_moe_layers(full) if layer.experts_name]
    assert len(experts) == 2 * len(sparse_layers) > 0
    state = quantized.state_dict()
    for name, shape in experts.items():
        # Packed: two 4-bit codes per byte, with block scales beside them; nothing left in float.
        assert state[name].dtype == torch.uint8, name
        assert state[name].numel() == shape.numel() // 2, name
        assert f"{name}.absmax" in state, name
    assert unquantized_expert_parameters(quantized) == []
    for layer in find_moe_layers(quantized):
        assert layer.router.weight.dtype == torch.float32
    norms = [module for name, module in quantized.named_modules() if name.endswith("norm")]
    assert norms and all(norm.weight.dtype == torch.float32 for norm in norms)
    assert type(quantized.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert resident_weight_bytes(quantized) < 0.5 * resident_weight_bytes(full)
    with torch.no_grad():
        difference = (quantized(IDS).logits - full(IDS).logits).abs().max().item()
    assert 0 < difference < 0.5  # quantised, yet the same model
    with pytest.raises(Exception, match="cannot be saved|not serializable|serializ"):
        quantized.save_pretrained(tiny_folders[model_type].parent / f"{model_type}-4bit-save")


def test_8bit_warning_names_every_unquantised_expert_tensor(tiny_folders, caplog):
    full = AutoModelForCausalLM.from_pretrained(tiny_folders["hf_moe"], dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="hf_moe"):
        AutoModelForCausalLM.from_pretrained(tiny_folders["hf_moe"], dtype=torch.float32,
                                             quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    warning = "\n".join(record.getMessage() for record in caplog.records if record.name.startswith("hf_moe"))
    assert "full precision" in warning and "load_in_4bit" in warning
    for name in _expert_tensor_shapes(full):
        assert name in warning


def test_lora_helper_attaches_to_every_expert_tensor(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    experts = _expert_tensor_shapes(model)
    r = 2
    peft_model = attach_moe_lora(model, r=r, targets="experts")
    assert sorted(adapted_parameters(peft_model)) == sorted(experts)
    # One (A, B) pair per expert: r * E * (d1 + d2) parameters for an (E, d1, d2) tensor.
    expected = sum(r * shape[0] * (shape[1] + shape[2]) for shape in experts.values())
    lora = {name: parameter for name, parameter in peft_model.named_parameters() if "lora_" in name}
    assert sum(parameter.numel() for parameter in lora.values()) == expected
    assert all(".experts." in name for name in lora)
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert trainable == set(lora)


def test_lora_targets_attention_and_router_are_selectable():
    model = AutoModelForCausalLM.from_config(tiny_config("hf_moe"))
    attention = moe_lora_config(model, r=2, targets="attention")
    assert not attention.target_parameters
    assert len(attention.target_modules) == 4 * model.config.num_hidden_layers
    assert all(name.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj", "o_proj")
               for name in attention.target_modules)
    routers = {f"base_model.model.{layer.router_name}" for layer in find_moe_layers(model)}
    peft_model = attach_moe_lora(model, r=2, targets="attention,router")
    adapted = {name.split(".lora_")[0] for name, _ in peft_model.named_parameters() if "lora_" in name}
    assert routers <= adapted and not any(".experts" in name for name in adapted)
    with pytest.raises(ValueError, match="lora_targets.*mlp"):
        moe_lora_config(model, targets="attention,mlp")


def test_upcycled_4bit_model_equals_the_dense_model_in_stock_transformers_4bit(tiny_upcycled):
    # Upcycled experts are copies of the dense MLP, so quantising them must reproduce bitsandbytes' own Linear4bit
    # on the dense model: a defect in the 3-D expert quantisation (block layout, scales, dtype) shows up here.
    dense = AutoModelForCausalLM.from_pretrained(tiny_upcycled.parent / "dense", dtype=torch.float32,
                                                 quantization_config=FOUR_BIT)
    assert type(dense.model.layers[0].mlp.gate_proj).__name__ == "Linear4bit"
    moe = AutoModelForCausalLM.from_pretrained(tiny_upcycled, dtype=torch.float32, quantization_config=FOUR_BIT)
    assert unquantized_expert_parameters(moe) == []
    full = AutoModelForCausalLM.from_pretrained(tiny_upcycled, dtype=torch.float32)
    with torch.no_grad():
        dense_logits, moe_logits, full_logits = (m(IDS).logits for m in (dense, moe, full))
    assert (moe_logits - dense_logits).abs().max().item() <= 1e-4
    assert (moe_logits - full_logits).abs().max().item() > 1e-3  # 4-bit did change the model


def test_qlora_adapters_save_and_reload_to_the_same_logits(tiny_folders, tmp_path):
    folder = tiny_folders["hf_moe"]
    model = attach_moe_lora(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                 quantization_config=FOUR_BIT),
                            r=2, targets="attention,experts,router")
    _randomise_lora_b(model)
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=FOUR_BIT)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS).logits, expected, atol=1e-6, rtol=0)


def test_merged_model_equals_adapted_model_and_is_a_plain_folder(tiny_folders, tmp_path, model_type):
    folder = tiny_folders[model_type]
    model = attach_moe_lora(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                            r=2, targets="attention,experts,router")
    _randomise_lora_b(model)
    with torch.no_grad():
        adapted = model(IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    merge_lora(folder, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == model_type
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        merged_logits, base_logits = merged(IDS).logits, base(IDS).logits
    assert (merged_logits - adapted).abs().max().item() <= 1e-5
    assert (base_logits - adapted).abs().max().item() > 1e-2  # the adapters did change the model


def test_peft_fixes_no_delta_accumulation_and_gradients_reach_both_expert_tensors(tiny_folders):
    """Pins hf_moe.quantization.peft_compat: on 4-bit experts, peft 0.21 alone stacks one more LoRA delta per forward
    and leaves the inner (gate_up_proj) LoRA without gradient."""
    model = attach_moe_lora(AutoModelForCausalLM.from_pretrained(tiny_folders["hf_moe"], dtype=torch.float32,
                                                                 quantization_config=FOUR_BIT),
                            r=2, targets="experts")
    _randomise_lora_b(model)
    with torch.no_grad():
        first, second, third = (model(IDS).logits for _ in range(3))
    assert torch.equal(first, second) and torch.equal(first, third)
    model(IDS, labels=IDS).loss.backward()
    lora = {name: parameter for name, parameter in model.named_parameters() if "lora_" in name}
    wrappers = {name.split(".lora_")[0] for name in lora}
    assert len(wrappers) == 2 * model.config.num_hidden_layers  # gate_up_proj (inner) and down_proj (outer)
    for name, parameter in lora.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_qlora_finetune_from_the_command_line_lowers_held_out_loss(tiny_upcycled, tmp_path):
    tokenizer = byte_tokenizer()
    heldout = {"heldout": build_mixture(0, 6, seed=0)["heldout"]}
    base = AutoModelForCausalLM.from_pretrained(tiny_upcycled, dtype=torch.float32, quantization_config=FOUR_BIT)
    before = evaluate_model(base, tokenizer, heldout, max_new_tokens=1)["heldout"]["loss"]
    output = tmp_path / "qlora"
    main(["finetune", str(tiny_upcycled), "--load_in_4bit", "--lora_r", "4", "--lora_targets", "attention,experts",
          "--output_dir", str(output), "--max_steps", "12", "--train_per_family", "8", "--eval_per_family", "2",
          "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--learning_rate", "5e-2",
          "--warmup_steps", "0", "--logging_steps", "10", "--save_steps", "100", "--eval_steps", "100",
          "--max_length", "64", "--report_to", "none"])
    assert (output / "adapter_config.json").exists() and not (output / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_upcycled, dtype=torch.float32, quantization_config=FOUR_BIT)
    adapted = PeftModel.from_pretrained(base, output)
    assert len(adapted_parameters(adapted)) == 2 * base.config.num_hidden_layers  # experts adapted too
    after = evaluate_model(adapted, tokenizer, heldout, max_new_tokens=1)["heldout"]["loss"]
    assert after < before - 0.1, (before, after)


def test_finetune_options_parse_next_to_the_common_debug_and_json_flags():
    """TrainingArguments has its own `--debug OPTION` (finetune shows tracebacks with HF_MOE_DEBUG=1); `hf-moe
    finetune` used to fail with an argparse conflict."""
    from hf_moe.cli import parse_command

    _, (args, training_args) = parse_command(["finetune", "model", "--load_in_4bit", "--lora_r", "4", "--lora_targets",
                                              "attention,experts", "--json"])
    assert (args.model_path, args.load_in_4bit, args.lora_r, args.lora_targets) == \
        ("model", True, 4, "attention,experts")
    _, (_, training_args) = parse_command(["finetune", "model", "--debug", "underflow_overflow"])
    assert [str(option.value) for option in training_args.debug] == ["underflow_overflow"]
