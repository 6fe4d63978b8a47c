"""The three decoders end to end: heads, losses, save/load, caching, padded generation, gradients, dtypes."""

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_moe import MoeCausalLMOutput

from .conftest import MODEL_TYPES, tiny_config


def _model(model_type, **overrides):
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()


def _ids(batch=2, seq=7, vocab=97):
    return torch.randint(3, vocab, (batch, seq))


def test_causal_lm_shapes_and_loss_terms(model_type):
    model = _model(model_type)
    ids = _ids()
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert isinstance(out, MoeCausalLMOutput)
    assert out.logits.shape == (2, 7, 97)
    config = model.config
    expected = out.lm_loss + config.router_aux_loss_coef * out.aux_loss + config.router_z_loss_coef * out.z_loss
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.lm_loss.item() == pytest.approx(torch.log(torch.tensor(97.0)).item(), rel=0.1)  # random init
    assert 0.9 < out.aux_loss.item() < config.num_experts
    sparse = config.sparse_layer_indices
    rows = 2 * 7 * config.num_subtokens
    assert [tuple(r.shape) for r in out.router_logits] == [(rows, config.num_experts)] * len(sparse)


def test_router_logits_only_on_request_but_aux_losses_whenever_labels_are_given(model_type):
    model = _model(model_type)
    ids = _ids()
    out = model(input_ids=ids, labels=ids)
    assert out.router_logits is None and out.aux_loss is not None and out.z_loss is not None
    out = model(input_ids=ids)
    assert out.loss is None and out.aux_loss is None


def test_base_model_and_sequence_classification_heads(model_type):
    config = tiny_config(model_type, num_labels=3)
    base = AutoModel.from_config(config)
    ids = _ids()
    assert base(input_ids=ids).last_hidden_state.shape == (2, 7, 32)
    classifier = AutoModelForSequenceClassification.from_config(config)
    labels = torch.tensor([0, 2])
    out = classifier(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 3)
    assert out.loss.item() == pytest.approx(torch.nn.functional.cross_entropy(out.logits, labels).item(), rel=1e-6)


def test_save_and_load_round_trip_gives_identical_logits(model_type, tmp_path):
    model = _model(model_type)
    ids = _ids()
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    # Same weights; the reloaded tensors may sit at other memory alignments, so BLAS may round differently.
    assert (reloaded(input_ids=ids).logits - expected).abs().max().item() < 1e-6


def test_saved_config_has_an_auto_map_for_every_auto_class(model_type, tmp_path):
    import json

    _model(model_type).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}
    assert auto_map["AutoConfig"].startswith("configuration_hf_moe.")
    assert all(v.startswith("modeling_hf_moe.") for k, v in auto_map.items() if k != "AutoConfig")
    assert all((tmp_path / name).exists() for name in ("modeling_hf_moe.py", "configuration_hf_moe.py",
                                                       "routing_hf_moe.py", "experts_kernels_hf_moe.py"))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_cached_generation_equals_uncached(model_type):
    # Capacity drops depend on how many tokens a forward call sees, so cached and uncached decoding agree only when
    # routing is dropless at inference (the default for hf_moe / hf_mh_moe; set for Switch here).
    model = _model(model_type, eval_capacity_factor=None)
    ids = _ids(batch=2, seq=5)
    cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_padded_batch_generates_the_same_as_each_row_alone_with_router_logits_on(model_type):
    # transformers issue 30731: output_router_logits=True crashed padded generate at the first decode step.
    model = _model(model_type, eval_capacity_factor=None, output_router_logits=True)
    short, long = _ids(1, 4)[0], _ids(1, 7)[0]
    padded = torch.zeros(2, 7, dtype=torch.long)
    padded[0, 3:], padded[1] = short, long
    mask = (torch.arange(7)[None] >= torch.tensor([[3], [0]])).long()
    batch = model.generate(padded, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone_short = model.generate(short[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone_long = model.generate(long[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(batch[0, 3:], alone_short[0])
    assert torch.equal(batch[1], alone_long[0])


def test_gradients_reach_router_and_experts(model_type):
    model = _model(model_type, router_type="noisy_topk").train()
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    sparse = model.model.layers[model.config.sparse_layer_indices[0]].mlp
    for name in ("gate.weight", "gate.noise_weight", "experts.gate_up_proj", "experts.down_proj"):
        grad = sparse.get_parameter(name).grad
        assert grad is not None and grad.abs().sum().item() > 0, name
    if model_type == "hf_mh_moe":
        assert sparse.head_proj.weight.grad.abs().sum().item() > 0
        assert sparse.merge_proj.weight.grad.abs().sum().item() > 0


def test_aux_loss_alone_trains_the_router(model_type):
    model = _model(model_type).train()
    out = model(input_ids=_ids(), output_router_logits=True)
    out.aux_loss.backward()
    sparse = model.model.layers[model.config.sparse_layer_indices[0]].mlp
    assert sparse.gate.weight.grad.abs().sum().item() > 0


def test_bf16_forward_is_finite_and_close_to_float32(model_type):
    model = _model(model_type, eval_capacity_factor=None)
    ids = _ids()
    expected = model(input_ids=ids).logits
    logits = model.to(torch.bfloat16)(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float() - expected).abs().max().item() < 0.1


ROUTER_STATE = {"e_score_correction_bias": dict(router_bias_update_rate=1e-3),
                "expert_choice_threshold": dict(router_type="expert_choice")}


@pytest.mark.parametrize("buffer", sorted(ROUTER_STATE))
@pytest.mark.parametrize("cast", ["to", "half", "bfloat16"])
def test_casting_the_model_keeps_the_router_state_in_float32(buffer, cast):
    """Selection-bias steps (1e-3) and threshold moves are below a bfloat16 step near 1: a cast would lose them."""
    model = _model("hf_moe", **ROUTER_STATE[buffer])
    for layer in model.model.layers:
        getattr(layer.mlp.gate, buffer).fill_(0.2501)  # 0.25 in bfloat16 and in float16 (step 2^-11 there)
        if buffer == "expert_choice_threshold":
            layer.mlp.gate.expert_choice_threshold_updates.fill_(1)  # estimated: the forward routes by it
    low = torch.float16 if cast == "half" else torch.bfloat16
    model = model.to(low) if cast == "to" else getattr(model, cast)()
    buffers = [getattr(layer.mlp.gate, buffer) for layer in model.model.layers]
    assert {b.dtype for b in buffers} == {torch.float32} and all(b.eq(0.2501).all() for b in buffers)
    assert model.model.layers[0].mlp.gate.weight.dtype == low
    logits = model(input_ids=_ids()).logits
    assert logits.dtype == low and torch.isfinite(logits).all()


@pytest.mark.parametrize("buffer", sorted(ROUTER_STATE))
def test_a_bfloat16_model_saves_and_loads_its_router_state_in_float32(buffer, tmp_path):
    model = _model("hf_moe", **ROUTER_STATE[buffer])
    for layer in model.model.layers:
        getattr(layer.mlp.gate, buffer).fill_(0.2501)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    buffers = [getattr(layer.mlp.gate, buffer) for layer in loaded.model.layers]
    assert {b.dtype for b in buffers} == {torch.float32} and all(b.eq(0.2501).all() for b in buffers)


def test_gradient_checkpointing_gives_the_same_gradients(model_type):
    model = _model(model_type, capacity_factor=None, router_jitter_noise=0.0).train()
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, grad in expected.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-6), name


def test_decoder_options_of_the_llama_family():
    # Qwen2 q/k/v bias, Qwen3 q/k norm, Mistral sliding window, explicit head_dim, tied embeddings, rope scaling.
    model = _model("hf_moe", attention_bias=True, use_qk_norm=True, sliding_window=3, head_dim=16,
                   tie_word_embeddings=True, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                              "rope_theta": 10000.0})
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.bias is not None and attention.o_proj.bias is None and attention.q_proj.out_features == 64
    assert hasattr(attention, "q_norm") and attention.sliding_window == 3
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = _ids(1, 9)
    full = model(input_ids=ids).logits
    # With a window of 3, the last position cannot see the first token.
    changed = ids.clone()
    changed[0, 0] = 5 if ids[0, 0] != 5 else 6
    assert not torch.allclose(model(input_ids=changed).logits[0, 1], full[0, 1])
    assert torch.allclose(model(input_ids=changed).logits[0, -1], full[0, -1], atol=1e-6)


def test_eager_and_sdpa_attention_agree(model_type):
    model = _model(model_type)
    ids = _ids()
    sdpa = model(input_ids=ids).logits
    model.set_attn_implementation("eager")
    assert (model(input_ids=ids).logits - sdpa).abs().max().item() < 1e-5


def test_default_experts_implementation_is_the_own_forward_and_backends_can_be_switched():
    model = _model("hf_moe")
    assert model.config._experts_implementation == "eager"
    ids = _ids()
    expected = model(input_ids=ids).logits
    for implementation in ("grouped_mm", "batched_mm"):
        model.set_experts_implementation(implementation)
        assert model.config._experts_implementation == implementation
        assert (model(input_ids=ids).logits - expected).abs().max().item() < 1e-5


def test_switch_init_is_scaled_down():
    switch = _model("hf_switch", hidden_size=256, intermediate_size=512, num_attention_heads=4)
    std = switch.model.layers[0].mlp.gate_proj.weight.std().item()
    assert std == pytest.approx((0.1 / 256) ** 0.5 * 0.88, rel=0.1)  # truncated at 2 std shrinks it by ~0.88


def test_no_split_modules_keep_decoder_layers_whole_under_device_map_auto(model_type):
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    model = _model(model_type, num_hidden_layers=4)
    layer_bytes = compute_module_sizes(model)["model.layers.0"]
    # Room for about two decoder layers per device: the model has to be split, between layers only.
    device_map = infer_auto_device_map(model, max_memory={0: 2.5 * layer_bytes, 1: 2.5 * layer_bytes,
                                                          "cpu": 100 * layer_bytes},
                                       no_split_module_classes=model._no_split_modules)
    assert len(set(device_map.values())) >= 2, device_map
    for name in device_map:
        parts = name.split(".")
        assert not ("layers" in parts and len(parts) > parts.index("layers") + 2), f"layer split: {name}"


def test_peft_lora_reaches_the_fused_experts_and_attention(model_type):
    from peft import LoraConfig, get_peft_model

    model = _model(model_type, capacity_factor=None).train()
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = get_peft_model(model, config)
    ids = _ids()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert any("experts" in n for n in lora) and any("q_proj" in n for n in lora)
    assert all(p.grad is not None for n, p in lora.items() if "lora_B" in n)
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_without_sparse_layers_the_decoder_is_transformers_llama_bit_for_bit():
    """Norm, rotary embedding and attention are Llama's (imported, not copied): a model without sparse layers is a
    Llama with the same parameter names and the same logits, exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = tiny_config("hf_moe", sparse_layers=[], tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_parameters=config.rope_parameters, tie_word_embeddings=False,
        attention_bias=False)).eval()
    llama.load_state_dict(model.state_dict(), strict=True)  # the same parameter names
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        for attention in ("eager", "sdpa"):
            model.set_attn_implementation(attention)
            llama.set_attn_implementation(attention)
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                               llama(input_ids=ids, attention_mask=mask).logits), attention
