"""Behaving like a transformers built-in: tuple outputs, the cache argument (its old name deprecated as in the
built-ins), no deprecation messages, parallel plans that name only what the model has, padding-free expert capacity,
static cache and torch.compile (defects found by transformers' common model tests, issue 7)."""

import json
import logging
import os
import re
import warnings
from contextlib import nullcontext
from itertools import chain

import pytest
import torch
import transformers
from packaging import version
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DynamicCache,
    GenerationMixin,
    LlamaConfig,
)
from transformers.utils import logging as hf_logging

from hf_moe.modeling import MODEL_CLASSES
from hf_moe.modeling.modeling_hf_moe import _CACHE_NAME

from .conftest import MODEL_TYPES, tiny_config

# transformers 5.24 renamed the KV-cache argument `past_key_values` to `cache`; its built-ins still take the old name
# with a deprecation warning, which its common test `test_bc_cache_name_forward` requires. Before 5.24 the old name is
# the current one and passes silently.
CACHE_ARGUMENT_RENAMED = version.parse(version.parse(transformers.__version__).base_version) >= version.parse("5.24")


def _ids(batch=2, length=7, seed=0):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification])
def test_return_dict_false_gives_the_tuple_of_the_output_fields_on_every_head(model_type, auto_class):
    model = auto_class.from_config(tiny_config(model_type)).eval()
    ids = _ids()
    with torch.no_grad():
        as_dict = model(ids)
        as_tuple = model(ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert len(as_tuple) == len(as_dict.to_tuple())
    torch.testing.assert_close(as_tuple[0], as_dict[0])
    if auto_class is not AutoModelForSequenceClassification:  # transformers' generic head itself needs return_dict
        model.config.return_dict = False  # a config default of False must not break the causal-LM head either
        with torch.no_grad():
            from_config = model(ids)
        assert isinstance(from_config, tuple)
        torch.testing.assert_close(from_config[0], as_dict[0])


def test_generation_mixin_is_listed_on_each_causal_lm_class():
    for classes in MODEL_CLASSES.values():
        causal_lm = classes["AutoModelForCausalLM"]
        assert GenerationMixin in causal_lm.__bases__, causal_lm.__name__
        assert causal_lm.can_generate()


def test_the_cache_argument_is_accepted_under_both_names(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, eval_capacity_factor=None)).eval()
    ids = _ids(length=9)
    with torch.no_grad():
        full = model(ids).logits[:, -3:]
        prefix = model(ids[:, :6], use_cache=True)
        cache = getattr(prefix, _CACHE_NAME)
        assert cache is not None and cache.get_seq_length() == 6
        continued = model(ids[:, 6:], cache=cache).logits  # transformers >= 5.24's name
        cache.crop(-3)  # back to the 6 prefix tokens
        with pytest.warns(FutureWarning, match="past_key_values") if CACHE_ARGUMENT_RENAMED else nullcontext():
            continued_old_name = model(ids[:, 6:], past_key_values=cache).logits  # 5.23's name
    torch.testing.assert_close(continued, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(continued_old_name, full, atol=1e-5, rtol=1e-4)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _deprecation_messages(run) -> list[str]:
    """Python warnings and transformers log lines mentioning a deprecation, raised while `run()` executes."""
    logging.Logger.warning_once.cache_clear()  # transformers logs some messages once per process
    handler = _Records()
    logger = hf_logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        logger.removeHandler(handler)
    found = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    return found + [message for message in handler.messages if "deprecat" in message.lower()]


def test_the_deprecation_capture_sees_the_old_cache_name():
    """Sanity check of the capture below: on transformers >= 5.24 the old output field name logs a deprecation."""
    if _CACHE_NAME != "cache":
        pytest.skip("transformers < 5.24 has no `cache` rename")
    model = AutoModelForCausalLM.from_config(tiny_config("hf_moe")).eval()
    with torch.no_grad():
        output = model(_ids(), use_cache=True)
    assert _deprecation_messages(lambda: output.past_key_values)


def test_forward_and_generate_emit_no_deprecation_message(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0

    def run():
        with torch.no_grad():
            model(ids, attention_mask=mask, use_cache=True)
            model(ids, labels=ids)
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                           cache_implementation="static")

    assert _deprecation_messages(run) == []


# ------------------------------------------------------------------------------------------------ old cache name
HEADS = {"AutoModel": AutoModel, "AutoModelForCausalLM": AutoModelForCausalLM,
         "AutoModelForSequenceClassification": AutoModelForSequenceClassification}


def _old_cache_name_messages(model, ids) -> tuple[list[str], torch.Tensor]:
    """The deprecation messages of one forward call with `past_key_values=`, and its first output."""
    outputs = []

    def run():
        with torch.no_grad():
            outputs.append(model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)[0])

    return _deprecation_messages(run), outputs[0]


@pytest.mark.parametrize("auto_class", list(HEADS), ids=list(HEADS))
def test_the_old_cache_argument_name_warns_exactly_like_the_builtins(model_type, auto_class):
    config = tiny_config(model_type, eval_capacity_factor=None)
    model = HEADS[auto_class].from_config(config).eval()
    builtin = HEADS[auto_class].from_config(LlamaConfig(**{key: getattr(config, key) for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "pad_token_id")})).eval()
    ids = _ids()
    messages, output = _old_cache_name_messages(model, ids)
    builtin_messages, _ = _old_cache_name_messages(builtin, ids)
    if CACHE_ARGUMENT_RENAMED:
        assert len(messages) == 1, messages
        assert "`past_key_values` is deprecated" in messages[0] and "Use `cache` instead" in messages[0]
    else:
        assert messages == []
    # The same message as the built-in head, up to the class name.
    assert [m.replace(type(model).__name__, "<head>") for m in messages] == [
        m.replace(type(builtin).__name__, "<head>") for m in builtin_messages]
    # ... and the old name still feeds the cache.
    with torch.no_grad():
        expected = model(ids, **{_CACHE_NAME: DynamicCache(config=model.config)}, use_cache=True)[0]
    torch.testing.assert_close(output, expected)


# ------------------------------------------------------------------------------------------------ parallel plans
def _generic_name(name: str) -> str:
    """A parameter or module name with its layer numbers replaced by `*`, as transformers matches plan entries."""
    return re.sub(r"\.\d+(\.|$)", lambda match: ".*" + match.group(1), name)


def _unused_plan_entries(model, plan: dict[str, str]) -> set[str]:
    """The entries of `plan` that name no parameter, buffer or module of `model`, by the rule of transformers' common
    test `test_tp_plan_matches_params`: an entry may name a parameter, the module that owns one, or any module."""
    parameters = {_generic_name(name) for name, _ in chain(model.named_parameters(), model.named_buffers())}
    owners = {name.rsplit(".", 1)[0] for name in parameters if "." in name}
    modules = {_generic_name(name) for name, _ in model.named_modules()}
    return {pattern for pattern in plan if pattern not in parameters | owners | modules}


LAYOUTS = {  # tiny configs have 3 layers
    "all_sparse": dict(sparse_layers=[0, 1, 2]),
    "mixed": dict(sparse_layers=[1]),
    "dense_prefix": dict(first_k_dense_layers=1, sparse_layer_interval=1),
    "all_dense": dict(sparse_layers=[]),
    "default": {},  # all sparse for hf_moe and hf_mh_moe, every other layer for hf_switch
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_parallel_plan_entry_matches_the_model(model_type, layout):
    config = tiny_config(model_type, **LAYOUTS[layout])
    # What the common test sets to get a dense layer in built-in MoE models; hf_moe's own fields are used instead.
    config.first_k_dense_replace, config.mlp_only_layers = 1, [0]
    for head in HEADS.values():
        model = head.from_config(config)
        assert model.tp_plan, type(model).__name__
        assert _unused_plan_entries(model, model.tp_plan) == set(), type(model).__name__
        assert _unused_plan_entries(model, model.ep_plan) == set(), type(model).__name__


@pytest.mark.parametrize("layout", ["mixed", "all_sparse", "all_dense"])
def test_parallel_plans_cover_the_dense_mlps_and_the_experts_that_exist(model_type, layout):
    config = tiny_config(model_type, **LAYOUTS[layout])
    tp_plan, ep_plan = config.base_model_tp_plan, config.base_model_ep_plan
    has_dense, has_sparse = layout != "all_sparse", layout != "all_dense"
    assert tp_plan["layers.*.self_attn.q_proj"] == "colwise" and tp_plan["layers.*.self_attn.o_proj"] == "rowwise"
    assert ("layers.*.mlp.gate_proj" in tp_plan) == has_dense
    assert ("layers.*.mlp.down_proj" in tp_plan) == has_dense
    assert (tp_plan.get("layers.*.mlp.experts") == "moe_tp_experts") == has_sparse
    assert (ep_plan.get("layers.*.mlp.experts") == "ep_dispatch_experts") == has_sparse
    assert (ep_plan.get("layers.*.mlp.experts.gate_up_proj") == "grouped_gemm") == has_sparse


def test_parallel_plans_are_not_saved_and_follow_the_reloaded_config(model_type, tmp_path):
    config = tiny_config(model_type, sparse_layers=[1])
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not {"base_model_tp_plan", "base_model_ep_plan", "base_model_pp_plan"} & saved.keys()
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert reloaded.base_model_tp_plan == config.base_model_tp_plan
    assert reloaded.base_model_ep_plan == config.base_model_ep_plan
    all_sparse = tiny_config(model_type, sparse_layers=[0, 1, 2])
    all_sparse.save_pretrained(tmp_path)
    assert "layers.*.mlp.gate_proj" not in AutoConfig.from_pretrained(tmp_path).base_model_tp_plan


# ------------------------------------------------------------------------------------------------ Switch capacity
def _binding_switch(**overrides):
    """A Switch model whose capacity binds (factor 0.5 in training and evaluation), without jitter noise."""
    config = tiny_config("hf_switch", capacity_factor=0.5, eval_capacity_factor=0.5, router_jitter_noise=0.0,
                         sparse_layers=[0, 1, 2], **overrides)
    return AutoModelForCausalLM.from_config(config)


def _left_pad(sequences, length, pad_id=0):
    ids = torch.full((len(sequences), length), pad_id)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, length - len(sequence):] = sequence
        mask[row, length - len(sequence):] = 1
    return ids, mask


def _packed(sequences):
    """One row with the sequences back to back and restarting position ids: the same real tokens, no padding."""
    ids = torch.cat(sequences).unsqueeze(0)
    position_ids = torch.cat([torch.arange(len(sequence)) for sequence in sequences]).unsqueeze(0)
    return ids, position_ids


def _real_logits(logits, sequences):
    return torch.cat([logits[row, -len(sequence):] for row, sequence in enumerate(sequences)])


@pytest.mark.parametrize("training", [True, False], ids=["train_capacity", "eval_capacity"])
def test_switch_padding_never_occupies_capacity(training):
    model = _binding_switch().train(training)
    sequences = [_ids(1, 9, seed=1)[0], _ids(1, 5, seed=2)[0], _ids(1, 12, seed=3)[0]]
    capacity_drops = []
    handle = model.model.layers[0].mlp.gate.register_forward_hook(
        lambda module, args, output: capacity_drops.append(int((output[1] == 0).sum())))
    with torch.no_grad():
        packed_ids, packed_positions = _packed(sequences)
        # transformers reads packed sequences from restarting position ids only when no cache is in play.
        unpadded = model(packed_ids, position_ids=packed_positions, use_cache=False).logits[0]
        padded_ids, padded_mask = _left_pad(sequences, 12)
        padded = model(padded_ids, attention_mask=padded_mask).logits
        extra_ids, extra_mask = _left_pad(sequences, 12 + 16)
        extra_padded = model(extra_ids, attention_mask=extra_mask).logits
        # The same padding as a 4-D boolean mask (query may attend key: causal and key not padding).
        causal = torch.ones(12, 12, dtype=torch.bool).tril()
        mask_4d = (causal[None] & padded_mask.bool()[:, None, :])[:, None]
        with_4d_mask = model(padded_ids, attention_mask=mask_4d).logits
    handle.remove()
    assert capacity_drops[0] > 0  # the capacity binds, so padding competing for it would change the outputs
    # Padding rows get weight 0 too; the real tokens drop exactly as many assignments in every layout.
    assert capacity_drops[1] - (padded_mask == 0).sum() == capacity_drops[0]
    torch.testing.assert_close(_real_logits(padded, sequences), unpadded, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_real_logits(extra_padded, sequences), unpadded, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_real_logits(with_4d_mask, sequences), unpadded, atol=1e-5, rtol=1e-4)


def test_switch_left_padded_generation_does_not_depend_on_the_amount_of_padding():
    model = _binding_switch().eval()
    sequences = [_ids(1, 4, seed=4)[0], _ids(1, 8, seed=5)[0]]
    generated, scores = [], []
    for length in (8, 8 + 16):
        ids, mask = _left_pad(sequences, length)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        generated.append(out.sequences[:, length:])
        scores.append(torch.stack(out.logits))
    torch.testing.assert_close(generated[0], generated[1])
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ static cache, compile
# Inductor needs about a minute of CPU per model on the 2-core CI machine, so the suite traces with dynamo's full
# graph capture plus AOT autograd ("aot_eager": any graph break or data-dependent shape still fails) and
# `HF_MOE_TEST_COMPILE_BACKEND=inductor` runs the same tests through inductor; `hf-moe benchmark`'s decoding table
# always does.
COMPILE_BACKEND = os.environ.get("HF_MOE_TEST_COMPILE_BACKEND", "aot_eager")


@pytest.mark.parametrize("compiled_type", MODEL_TYPES)
def test_compiled_static_cache_greedy_generation_equals_eager(compiled_type):
    """`generate` with a static cache and its decoding step compiled with fullgraph=True (no graph break allowed)
    gives the eager dynamic-cache tokens; the Switch model keeps its default capacity, with left padding."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_config(tiny_config(compiled_type, num_hidden_layers=2)).eval()
    assert model._can_compile_fullgraph
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    settings = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default", backend=COMPILE_BACKEND)
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told to
    with torch.no_grad():
        eager = model.generate(ids, **settings)
        compiled = model.generate(ids, **settings, cache_implementation="static", compile_config=compile_config)
    assert hasattr(model, "_compiled_call")  # the decoding steps really ran compiled
    torch.testing.assert_close(compiled, eager)


# ---------------------------------------------------------------------------------------------- sparse-block benchmark
# `hf-moe benchmark`'s block table on tiny sizes: which rows and numbers it must produce, whatever the machine's speed.
BENCHMARK_SIZES = dict(hidden_size=64, moe_intermediate_size=64, num_tokens=32, repeats=1, decode=False)
BENCHMARK_ROWS = {  # block -> the references its row is timed against
    "hf_moe top-2": ("dense", "mixtral"),
    "hf_switch top-1, capacity 1.25": ("dense", "mixtral"),
    "hf_mh_moe h=4, top-4 of 78, expert 24": ("dense",),
    "hf_moe expert choice, c=2 (fwd: threshold rule; fwd+bwd: batch selection)": ("dense", "top_k"),
}


@pytest.fixture(scope="module")
def block_benchmark_rows():
    from hf_moe.recipes.benchmark_blocks import SparseBlockBenchmarkArguments, benchmark_sparse_blocks

    return benchmark_sparse_blocks(SparseBlockBenchmarkArguments(**BENCHMARK_SIZES))


def test_block_benchmark_has_a_row_per_block_with_positive_finite_times_and_ratios(block_benchmark_rows):
    import math

    assert [row["block"] for row in block_benchmark_rows] == list(BENCHMARK_ROWS)
    for row, references in zip(block_benchmark_rows, BENCHMARK_ROWS.values(), strict=True):
        modes = ("forward", "forward_backward")
        timed = {f"{mode}_s" for mode in modes} | {f"{name}_{mode}{suffix}" for reference in references
                                                   for mode in modes
                                                   for name, suffix in ((reference, "_s"), (f"vs_{reference}", ""))}
        compared = {"max_abs_difference_vs_mixtral"} if row["block"] == "hf_moe top-2" else set()
        assert set(row) == {"block"} | timed | compared, row["block"]
        assert all(math.isfinite(row[name]) and row[name] > 0 for name in timed), row


def test_block_benchmark_top_k_block_gives_the_output_of_the_mixtral_block_it_is_timed_against(block_benchmark_rows):
    # Same weights, same routing (softmax, top-2, renormalised): any difference would mean the comparison loaded the
    # weights into the wrong places (the load is non-strict) or the two blocks compute different functions.
    assert block_benchmark_rows[0]["max_abs_difference_vs_mixtral"] <= 1e-6


def test_block_benchmark_ratios_are_medians_of_the_per_round_time_ratios(monkeypatch):
    from hf_moe.recipes import benchmark_blocks

    # Per-round seconds: the dense ratios are 3, 1 and 0.5 (median 1.0, while the ratio of the medians is 2.0);
    # Mixtral, timed like the block in every round, must come out at exactly 1.
    rounds = {"block": [3.0, 1.0, 2.0], "dense": [1.0, 1.0, 4.0], "mixtral": [3.0, 1.0, 2.0]}
    monkeypatch.setattr(benchmark_blocks, "paired_median_seconds",
                        lambda candidates, repeats: {name: rounds[name] for name in candidates})
    arguments = benchmark_blocks.SparseBlockBenchmarkArguments(**{**BENCHMARK_SIZES, "repeats": 3}, blocks="hf_moe")
    row = benchmark_blocks.benchmark_sparse_blocks(arguments)[0]
    for mode in ("forward", "forward_backward"):
        assert (row[f"{mode}_s"], row[f"dense_{mode}_s"], row[f"mixtral_{mode}_s"]) == (2.0, 1.0, 2.0)
        assert (row[f"vs_dense_{mode}"], row[f"vs_mixtral_{mode}"]) == (1.0, 1.0)


def test_block_benchmark_estimates_the_expert_choice_thresholds_before_timing_the_forward():
    # The forward row times the causal threshold rule; without estimated thresholds it would time the top-k fallback.
    from hf_moe.modeling import MoeConfig
    from hf_moe.modeling.modeling_hf_moe import MoeSparseBlock
    from hf_moe.recipes.benchmark_blocks import _estimate_thresholds, _randomize

    config = MoeConfig(hidden_size=64, num_attention_heads=1, moe_intermediate_size=64, num_experts=8,
                       experts_implementation="eager", router_type="expert_choice", expert_capacity_factor=2.0)
    block = _randomize(MoeSparseBlock(config), seed=0)
    _estimate_thresholds(block, torch.randn(1, 32, 64, generator=torch.Generator().manual_seed(0)))
    assert block.gate.expert_choice_threshold_updates.item() == 3
    assert (block.gate.expert_choice_threshold > 0).all()  # every expert's cutoff estimated
