"""Quantised loading that really quantises the fused experts, LoRA on experts, adapters, merging and QLoRA."""

import importlib.metadata
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, MixtralConfig

from hf_moe.cli import main
from hf_moe.data import build_mixture
from hf_moe.moe_layers import find_moe_layers
from hf_moe.quantization import expert_parameters, resident_weight_bytes, unquantized_expert_parameters
from hf_moe.quantization.experts import _quant_state
from hf_moe.quantization.lora import adapted_parameters, attach_moe_lora, merge_lora, moe_lora_config
from hf_moe.quantization.quantizer import fits_cpu_kernel
from hf_moe.recipes import evaluate_model

from .conftest import MODEL_TYPES, byte_tokenizer, tiny_config

FOUR_BIT = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
IDS = torch.tensor([[5, 17, 42, 8, 66, 23, 9, 71], [3, 44, 12, 90, 31, 7, 58, 26]])
# Tiny, yet every Linear4bit fits bitsandbytes' fused CPU kernel (in_features a multiple of the block size 64,
# out_features of 32), so the tests below run that kernel where the CPU has it, as a real model would.
FUSED_KERNEL_SIZES = dict(hidden_size=64, intermediate_size=128)
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["generic", "avx512bf16"])
def cpu_4bit_path(request, monkeypatch):
    """The CPU path of every bitsandbytes `Linear4bit` created during the test, whatever this CPU would pick.

    generic: dequantise, then matmul in the compute dtype. avx512bf16: at the first eval forward without gradients the
    weight is repacked for bitsandbytes' fused kernel, which computes in bfloat16; bitsandbytes registers that kernel
    only on CPUs with AVX512-BF16, so elsewhere this parameter is skipped (the repacking itself runs on every CPU in
    `test_hf_moe_4bit_layers_that_the_fused_cpu_kernel_cannot_take_use_the_generic_path`).
    """
    import bitsandbytes.functional
    import bitsandbytes.nn.modules

    fused = request.param == "avx512bf16"
    if fused and not bitsandbytes.functional.has_avx512bf16():
        pytest.skip("bitsandbytes has its fused CPU 4-bit kernel only on CPUs with AVX512-BF16")
    # Linear4bit.__init__ sets `support_avx512bf16_for_cpu = has_avx512bf16()` (bitsandbytes 0.50).
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: fused)
    assert bool(bitsandbytes.nn.Linear4bit(64, 32).support_avx512bf16_for_cpu) is fused
    return request.param


def _linear4bit_layers(model, packed_for_fused_kernel: bool | None = None) -> list[str]:
    """Names of the Linear4bit layers of `model`; with `packed_for_fused_kernel`, only those whose weight bitsandbytes
    has (True) or has not (False) repacked for its fused CPU kernel."""
    return [name for name, module in model.named_modules() if type(module).__name__ == "Linear4bit" and (
        packed_for_fused_kernel is None
        or getattr(module.weight.quant_state, "packing_format_for_cpu", False) == packed_for_fused_kernel)]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """{model type: folder of a tiny random float32 model}."""
    folders = {}
    for model_type in MODEL_TYPES:
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(model_type)
        AutoModelForCausalLM.from_config(tiny_config(model_type, **FUSED_KERNEL_SIZES)).save_pretrained(folder)
        folders[model_type] = folder
    return folders


@pytest.fixture(scope="module")
def upcycled_folder(tmp_path_factory):
    """A tiny random Llama (sizes as `FUSED_KERNEL_SIZES`) with a byte tokenizer, upcycled into a 4-expert top-2
    hf_moe folder; the dense model is in the sibling folder `dense`."""
    from hf_moe import upcycle

    root = tmp_path_factory.mktemp("upcycled")
    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         **FUSED_KERNEL_SIZES)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    return upcycle(str(root / "dense"), str(root / "moe"), num_experts=4, top_k=2)


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


def test_4bit_from_pretrained_quantises_every_expert_and_keeps_router_and_norms_in_float(tiny_folders, model_type,
                                                                                         cpu_4bit_path):
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
    assert _linear4bit_layers(quantized, packed_for_fused_kernel=cpu_4bit_path == "avx512bf16") == \
        _linear4bit_layers(quantized)
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


def test_upcycled_4bit_model_equals_the_dense_model_in_stock_transformers_4bit(upcycled_folder, cpu_4bit_path):
    # Upcycled experts are copies of the dense MLP, so quantising them must reproduce bitsandbytes' own Linear4bit
    # on the dense model: a defect in the 3-D expert quantisation (block layout, scales, dtype) shows up here.
    dense = AutoModelForCausalLM.from_pretrained(upcycled_folder.parent / "dense", dtype=torch.float32,
                                                 quantization_config=FOUR_BIT)
    assert type(dense.model.layers[0].mlp.gate_proj).__name__ == "Linear4bit"
    # The 4-bit experts dequantise and multiply in the compute dtype on every path (bitsandbytes has no fused kernel
    # for 3-D tensors), as its generic Linear4bit path does: the dense MLP takes that path here too. Attention takes
    # the path under test in both models.
    for layer in dense.model.layers:
        for projection in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            projection.support_avx512bf16_for_cpu = False
    moe = AutoModelForCausalLM.from_pretrained(upcycled_folder, dtype=torch.float32, quantization_config=FOUR_BIT)
    assert unquantized_expert_parameters(moe) == []
    full = AutoModelForCausalLM.from_pretrained(upcycled_folder, dtype=torch.float32)
    with torch.no_grad():
        dense_logits, moe_logits, full_logits = (m(IDS).logits for m in (dense, moe, full))
    assert (moe_logits - dense_logits).abs().max().item() <= 1e-4
    assert (moe_logits - full_logits).abs().max().item() > 1e-3  # 4-bit did change the model
    assert _linear4bit_layers(moe, packed_for_fused_kernel=cpu_4bit_path == "avx512bf16") == _linear4bit_layers(moe)


def test_qlora_adapters_save_and_reload_to_the_same_logits(tiny_folders, tmp_path, cpu_4bit_path):
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


def test_peft_fixes_no_delta_accumulation_and_gradients_reach_both_expert_tensors(tiny_folders, cpu_4bit_path):
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


def test_qlora_finetune_from_the_command_line_lowers_held_out_loss(upcycled_folder, tmp_path, cpu_4bit_path):
    tokenizer = byte_tokenizer()
    heldout = {"heldout": build_mixture(0, 6, seed=0)["heldout"]}
    base = AutoModelForCausalLM.from_pretrained(upcycled_folder, dtype=torch.float32, quantization_config=FOUR_BIT)
    before = evaluate_model(base, tokenizer, heldout, max_new_tokens=1)["heldout"]["loss"]
    output = tmp_path / "qlora"
    main(["finetune", str(upcycled_folder), "--load_in_4bit", "--lora_r", "4", "--lora_targets", "attention,experts",
          "--output_dir", str(output), "--max_steps", "12", "--train_per_family", "8", "--eval_per_family", "2",
          "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--learning_rate", "5e-2",
          "--warmup_steps", "0", "--logging_steps", "10", "--save_steps", "100", "--eval_steps", "100",
          "--max_length", "64", "--report_to", "none"])
    assert (output / "adapter_config.json").exists() and not (output / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(upcycled_folder, dtype=torch.float32, quantization_config=FOUR_BIT)
    adapted = PeftModel.from_pretrained(base, output)
    assert len(adapted_parameters(adapted)) == 2 * base.config.num_hidden_layers  # experts adapted too
    after = evaluate_model(adapted, tokenizer, heldout, max_new_tokens=1)["heldout"]["loss"]
    assert after < before - 0.1, (before, after)


def _has_fused_cpu_kernel() -> bool:
    import bitsandbytes.functional

    return bool(bitsandbytes.functional.has_avx512bf16())


@pytest.mark.parametrize(("out_features", "in_features", "fits"),
                         [(32, 64, True), (64, 128, True), (32, 32, False), (96, 96, False), (16, 64, False)])
def test_fits_cpu_kernel_agrees_with_what_bitsandbytes_can_repack(out_features, in_features, fits):
    """Pins the bitsandbytes limit that `keep_cpu_kernel_to_supported_layers` works around: when bitsandbytes repacks
    any shape (this test then fails), the guard can go."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                              quant_type="nf4").to("cpu").eval()
    assert fits_cpu_kernel(layer) is fits
    layer.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        if fits:
            layer(torch.randn(2, in_features))
            assert layer.weight.quant_state.packing_format_for_cpu
        else:
            with pytest.raises((RuntimeError, AssertionError), match="is invalid for input of size|divisible"):
                layer(torch.randn(2, in_features))


@pytest.mark.parametrize("sizes", [{}, dict(hidden_size=64, intermediate_size=96, num_key_value_heads=1)],
                         ids=["hidden_size32", "16_kv_features"])
def test_hf_moe_4bit_layers_that_the_fused_cpu_kernel_cannot_take_use_the_generic_path(model_type, sizes, monkeypatch,
                                                                                     tmp_path):
    """On an AVX512-BF16 CPU (simulated: the repacking is plain torch) bitsandbytes repacks every Linear4bit at the
    first eval forward and fails on a layer narrower than its tiles ("shape '[32, 0]' is invalid for input of size
    16" for 32 x 32); hf_moe models keep such layers on the generic path, and the others are repacked."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(model_type, **sizes)).save_pretrained(tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantization_config=FOUR_BIT)
    layers = {name: module for name, module in quantized.named_modules() if type(module).__name__ == "Linear4bit"}
    # bitsandbytes' CPU packing: tiles of 32 output rows, and whole 64-input blocks of scales per row.
    narrow = [name for name, layer in layers.items() if layer.out_features % 32 or layer.in_features % 64]
    assert narrow
    with torch.no_grad():
        quantized(IDS)
    assert _linear4bit_layers(quantized, packed_for_fused_kernel=False) == narrow
    if sizes:  # here only k_proj, v_proj (16 outputs) and Switch's dense down_proj (96 inputs) are narrow
        assert all(name.endswith(("k_proj", "v_proj", "mlp.down_proj")) for name in narrow)
        assert len(narrow) < len(layers)


@pytest.mark.skipif(not _has_fused_cpu_kernel(), reason="bitsandbytes' fused CPU 4-bit kernel needs AVX512-BF16")
def test_fused_cpu_kernel_gives_the_logits_of_the_generic_path_and_leaves_the_experts_alone(tiny_folders,
                                                                                            model_type):
    quantized = AutoModelForCausalLM.from_pretrained(tiny_folders[model_type], dtype=torch.float32,
                                                     quantization_config=FOUR_BIT)
    layers = [module for module in quantized.modules() if type(module).__name__ == "Linear4bit"]
    experts = {name: getattr(module, parameter).clone() for name, module, parameter in expert_parameters(quantized)}
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        generic = quantized(IDS).logits
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        fused = quantized(IDS).logits
    assert _linear4bit_layers(quantized, packed_for_fused_kernel=True) == _linear4bit_layers(quantized)
    # The fused kernel computes in bfloat16 (2^-8 relative steps); the generic path in float32.
    assert 0 < (fused - generic).abs().max().item() <= 0.02
    # hf_moe's 4-bit experts (a dequantising parametrization, no Linear4bit) are neither repacked nor changed.
    for name, module, parameter in expert_parameters(quantized):
        assert not hasattr(_quant_state(module, parameter), "packing_format_for_cpu"), name
        assert torch.equal(getattr(module, parameter), experts[name]), name



# The releases on which the upstream bugs below were seen (each test run with --runxfail, failing its assertion).
UPSTREAM_BUGS_SEEN_ON = "transformers 5.23–5.25 with bitsandbytes 0.50"


def _upstream_bug(description: str) -> pytest.MarkDecorator:
    """A strict xfail for a bug of transformers / bitsandbytes, not of hf_moe: once an upgrade fixes it the test passes,
    strict turns that into a failure, and the mark (and any workaround) can go. Only the assertion counts as the bug;
    any other error fails the test. The reason names the releases seen with the bug and the ones installed."""
    installed = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("transformers", "bitsandbytes"))
    return pytest.mark.xfail(strict=True, raises=AssertionError,
                             reason=f"{description} (seen on {UPSTREAM_BUGS_SEEN_ON}; installed: {installed})")

def _lora_gradients(model, evaluate_first: bool) -> dict[str, torch.Tensor]:
    """The LoRA gradients of one training forward of `model` (a LoRA-wrapped 4-bit model), after an eval forward
    without gradients or not."""
    _randomise_lora_b(model)
    if evaluate_first:
        with torch.no_grad():
            model.eval()(IDS)
    model.train()(IDS, labels=IDS).loss.backward()
    return {name: parameter.grad for name, parameter in model.named_parameters() if "lora_" in name}


def test_an_eval_forward_does_not_change_qlora_gradients(tiny_folders, cpu_4bit_path, request):
    if cpu_4bit_path == "avx512bf16":
        request.applymarker(_upstream_bug(
            "bitsandbytes: an eval forward without gradients repacks each Linear4bit for the fused CPU kernel, and "
            "later training forwards run that kernel, which has no backward: no gradient flows through the frozen "
            "4-bit layers (`hf-moe finetune` evaluates every `eval_steps`)"))

    def attention_lora_gradients(evaluate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the same LoRA A initialisation both times
        model = attach_moe_lora(AutoModelForCausalLM.from_pretrained(tiny_folders["hf_moe"], dtype=torch.float32,
                                                                     quantization_config=FOUR_BIT),
                                r=2, targets="attention")
        return _lora_gradients(model, evaluate_first)

    trained, trained_after_eval = attention_lora_gradients(False), attention_lora_gradients(True)
    for name, gradient in trained.items():
        assert torch.allclose(trained_after_eval[name], gradient, atol=1e-6, rtol=1e-4), name


def test_the_finetune_recipe_keeps_qlora_gradients_after_an_eval_forward(tiny_folders, cpu_4bit_path):
    """`hf-moe finetune --load_in_4bit` evaluates between steps: its model keeps every Linear4bit on the generic path,
    so the gradients after an evaluation are those without one (the failure above, on AVX512-BF16 CPUs)."""
    from hf_moe.recipes import load_for_finetuning

    def attention_lora_gradients(evaluate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the same LoRA A initialisation both times
        model = load_for_finetuning(str(tiny_folders["hf_moe"]), load_in_4bit=True, lora_r=2, lora_targets="attention")
        return _lora_gradients(model, evaluate_first)

    trained, trained_after_eval = attention_lora_gradients(False), attention_lora_gradients(True)
    assert trained and all(gradient is not None for gradient in trained.values())
    for name, gradient in trained.items():
        assert trained_after_eval[name] is not None and torch.allclose(trained_after_eval[name], gradient, atol=1e-6,
                                                                        rtol=1e-4), name


def test_dequantize_after_an_eval_forward_gives_the_full_precision_model(tiny_folders, model_type, cpu_4bit_path,
                                                                         request):
    """`model.dequantize()` (hf_moe's quantizer: experts too) gives plain layers and experts holding the 4-bit values,
    whether or not the model ran before."""
    if cpu_4bit_path == "avx512bf16":
        request.applymarker(_upstream_bug(
            "transformers' `dequantize()` reads a Linear4bit weight repacked for bitsandbytes' fused CPU kernel as if "
            "it were in the standard layout (stock models too)"))

    def dequantized_logits(run_first: bool) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(tiny_folders[model_type], dtype=torch.float32,
                                                     quantization_config=FOUR_BIT)
        if run_first:
            with torch.no_grad():
                model(IDS)
        model.dequantize(dtype=torch.float32)
        assert not _linear4bit_layers(model)
        assert len(unquantized_expert_parameters(model)) == len(expert_parameters(model)) > 0
        with torch.no_grad():
            return model(IDS).logits

    assert torch.equal(dequantized_logits(run_first=True), dequantized_logits(run_first=False))



class _Marked(Exception):
    """Raised by `_MarkRecorder.applymarker`: stops a test right where it marks itself."""


class _MarkRecorder:
    """Stands in for pytest's `request` to read the mark a test applies to itself."""

    def applymarker(self, mark):
        raise _Marked(mark)


@pytest.mark.parametrize("marked_test, arguments", [
    (test_an_eval_forward_does_not_change_qlora_gradients, {}),
    (test_dequantize_after_an_eval_forward_gives_the_full_precision_model, {"model_type": "hf_moe"}),
])
def test_upstream_bug_xfails_are_strict_and_name_the_versions_seen_and_installed(marked_test, arguments):
    with pytest.raises(_Marked) as marked:
        marked_test(tiny_folders=None, cpu_4bit_path="avx512bf16", request=_MarkRecorder(), **arguments)
    mark = marked.value.args[0].mark
    installed = {name: importlib.metadata.version(name) for name in ("transformers", "bitsandbytes")}
    assert (mark.name, mark.kwargs["strict"], mark.kwargs["raises"]) == ("xfail", True, AssertionError)
    assert mark.kwargs["reason"].endswith(
        f"(seen on transformers 5.23–5.25 with bitsandbytes 0.50; installed: transformers {installed['transformers']}, "
        f"bitsandbytes {installed['bitsandbytes']})")


# argv: "with hf_moe" | "without hf_moe", output file, input ids (JSON), model folders. Loads each folder in 4-bit,
# with or without `import hf_moe` (and an hf_moe config built, which activates hf_moe's 4-bit experts quantizer), and
# saves what the load produced and what a forward gives (logits, or the error).
STOCK_4BIT_LOAD = """
import json
import sys
import torch
if sys.argv[1] == "with hf_moe":
    import hf_moe

    hf_moe.MoeConfig()
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

results = {}
for folder in sys.argv[4:]:
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=config)
    modules = [(name, f"{type(module).__module__}.{type(module).__qualname__}",
                getattr(module, "support_avx512bf16_for_cpu", None)) for name, module in model.named_modules()]
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    try:
        with torch.no_grad():
            output = model(torch.tensor(json.loads(sys.argv[3]))).logits
    except Exception as error:
        output = f"{type(error).__name__}: {error}"
    results[folder] = {"quantizer": type(model.hf_quantizer).__name__, "modules": modules, "state": state,
                       "output": output}
torch.save(results, sys.argv[2])
"""


def test_importing_hf_moe_leaves_stock_4bit_loading_unchanged(tmp_path):
    tiny = dict(vocab_size=97, num_hidden_layers=2, num_attention_heads=4, **FUSED_KERNEL_SIZES)
    # A dense model, one with fused experts, and one whose k_proj / v_proj (16 outputs) bitsandbytes' fused CPU kernel
    # cannot take: on AVX512-BF16 CPUs its forward fails in stock transformers, and must fail alike with hf_moe.
    configs = {
        "llama": LlamaConfig(num_key_value_heads=2, **tiny),
        "mixtral": MixtralConfig(num_local_experts=4, num_key_value_heads=2, **tiny),
        "llama-narrow-kv": LlamaConfig(num_key_value_heads=1, **tiny),
    }
    folders = [str(tmp_path / name) for name in configs]
    for folder, config in zip(folders, configs.values(), strict=True):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    loads = {}
    for importer in ("without hf_moe", "with hf_moe"):
        output = tmp_path / f"{importer}.pt"
        subprocess.run([sys.executable, "-c", STOCK_4BIT_LOAD, importer, str(output), json.dumps(IDS.tolist()),
                        *folders], cwd=REPO_ROOT, check=True, timeout=600)
        loads[importer] = torch.load(output, weights_only=False)
    for folder in folders:
        stock, with_hf_moe = loads["without hf_moe"][folder], loads["with hf_moe"][folder]
        assert (stock["quantizer"], with_hf_moe["quantizer"]) == ("Bnb4BitHfQuantizer", "Bnb4BitExpertsHfQuantizer")
        assert with_hf_moe["modules"] == stock["modules"]
        assert any(module_type.endswith("Linear4bit") for _, module_type, _ in stock["modules"])
        assert with_hf_moe["state"].keys() == stock["state"].keys()
        for name, tensor in stock["state"].items():
            assert torch.equal(with_hf_moe["state"][name], tensor), name
        if isinstance(stock["output"], str):
            assert with_hf_moe["output"] == stock["output"]
        else:
            assert torch.equal(with_hf_moe["output"], stock["output"])
    assert isinstance(loads["without hf_moe"][folders[0]]["output"], torch.Tensor)


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
