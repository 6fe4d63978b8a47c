"""`hf-moe adapter check` / `check_adapter`: which expert LoRA tensors vLLM, SGLang or peft would ignore, reject or
misapply, one exact line per problem; and `hf-moe adapter export` followed by `hf-moe adapter check` at the command
line (status 0 clean, 1 problems, 2 bad input).

Adapters are saved by peft (`target_parameters` on both expert parameters, `target_modules` on attention) for tiny
random bases, then exported per expert, or edited by hand into what other tools write (unsloth's lora_B grouped by
expert, a missing expert, transposed or swapped factors, peft 0.18's layout, hf_moe QLoRA's reversed nesting).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_moe.adapters import check_adapter, export_adapter
from hf_moe.adapters.check import PEFT_CONVERTS_PER_EXPERT
from hf_moe.adapters.names import FAMILIES as ADAPTER_FAMILIES
from hf_moe.cli import main as cli_main

from .test_builtin_moe import FAMILIES

BUILT = ("qwen3_moe", "mixtral", "gpt_oss", "qwen2_moe")
PREFIX = "base_model.model.model.layers"
UNSLOTH_CARD = ("This qwen3_moe model was trained 2x faster with [Unsloth](https://github.com/unslothai/unsloth) and "
                "Huggingface's TRL library.\n")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """{family: folder} with `base`, `adapter` (peft's fused) and, except gpt-oss, `per-expert` (exported)."""
    root = tmp_path_factory.mktemp("check")
    for family in BUILT:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(FAMILIES[family]()).save_pretrained(root / family / "base")
        model = AutoModelForCausalLM.from_pretrained(root / family / "base")
        config = LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        get_peft_model(model, config).save_pretrained(root / family / "adapter")
        if family != "gpt_oss":
            export_adapter(root / family / "adapter", root / family / "per-expert", "per-expert")
    return {family: root / family for family in BUILT}


def edited(source: Path, output: Path, tensors=None, config: dict | None = None, card: str | None = None) -> Path:
    """A copy of the adapter at `source` with its tensors passed through `tensors` and its config updated."""
    output.mkdir()
    saved = load_file(str(source / "adapter_model.safetensors"))
    saved = tensors(saved) if tensors else saved
    save_file({key: tensor.contiguous() for key, tensor in saved.items()}, str(output / "adapter_model.safetensors"))
    (output / "adapter_config.json").write_text(json.dumps({**json.loads((source / "adapter_config.json").read_text()),
                                                            **(config or {})}))
    if card is not None:
        (output / "README.md").write_text(card)
    return output


def fused_keys(layer: int) -> list[tuple[str, str]]:
    """(key, parameter) of a layer's fused tensors, as peft saves them (gate_up_proj the inner wrapper)."""
    return [(f"{PREFIX}.{layer}.mlp.experts{nesting}.lora_{factor}.weight", parameter)
            for nesting, parameter in ((".base_layer", "gate_up_proj"), ("", "down_proj")) for factor in "AB"]


def export_fix(adapter: Path, layout: str, extra: str = "") -> str:
    return f"hf-moe adapter export {adapter} OUT --layout {layout}{extra}"


# ------------------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("family, names", [("mixtral", "w1/w3/w2"), ("qwen3_moe", "gate_proj/up_proj/down_proj")])
def test_vllm_rejects_every_fused_tensor_on_a_per_expert_family_and_sglang_ignores_them(built, family, names):
    adapter = built[family] / "adapter"
    result = check_adapter(adapter, "vllm")
    assert (result.served_as, result.engine_reads, result.ok) == (family, ("per-expert",), False)
    assert result.lines() == [
        f"{key}: vllm would reject it: vLLM reads {family} expert LoRA per expert (2-D MoE LoRA: experts.<e>.{names}, "
        f"gate and up separate); a fused experts LoRA ({parameter}) is no module it knows and fails the adapter's "
        f"load (fix: {export_fix(adapter, 'per-expert')})" for layer in (0, 1) for key, parameter in fused_keys(layer)]
    sglang = check_adapter(adapter, "sglang")
    assert sglang.lines() == [
        f"{key}: sglang would ignore it: SGLang reads expert LoRA per expert (experts.<e>.<projection>) and drops "
        f"peft's fused experts keys ({parameter}) with a warning (fix: {export_fix(adapter, 'per-expert')})"
        for layer in (0, 1) for key, parameter in fused_keys(layer)]
    assert check_adapter(adapter, "peft").lines() == []  # peft's own layout


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_the_per_expert_export_checks_clean_for_vllm_sglang_and_peft(built, family):
    for engine in ("vllm", "sglang", "peft"):
        result = check_adapter(built[family] / "per-expert", engine)
        assert result.ok and result.lines() == [], (engine, result.lines())
        assert {target.verdict for target in result.tensors} == {"ok"}
        assert result.summary() == (f"clean: {engine} reads all 48 expert tensors of {built[family] / 'per-expert'} "
                                    f"as trained on {family}")


def test_gpt_oss_fused_is_clean_for_vllm_and_per_expert_is_rejected(built, tmp_path):
    adapter = built["gpt_oss"] / "adapter"
    assert check_adapter(adapter, "vllm").ok and check_adapter(adapter, "peft").ok
    assert check_adapter(adapter, "vllm").engine_reads == ("fused",)
    # The per-expert layout (what vLLM's 2-D families read; hf-moe refuses to write it for gpt-oss): by hand.
    per_expert = tmp_path / "per-expert"
    per_expert.mkdir()
    shapes = {"gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}  # (in, out): H=32, I=48
    save_file({f"{PREFIX}.{layer}.mlp.experts.{expert}.{name}.lora_{factor}.weight":
               torch.randn((2, inputs) if factor == "A" else (outputs, 2))
               for layer in (0, 1) for expert in range(4) for name, (inputs, outputs) in shapes.items()
               for factor in "AB"}, str(per_expert / "adapter_model.safetensors"))
    (per_expert / "adapter_config.json").write_text(json.dumps({
        **json.loads((adapter / "adapter_config.json").read_text()), "target_parameters": None,
        "target_modules": list(shapes)}))
    assert check_adapter(per_expert, "vllm").lines() == [
        f"{PREFIX}.{layer}.mlp.experts.{{0..3}}.{{down,gate,up}}_proj.lora_{{A,B}}.weight: vllm would reject it: vLLM "
        "reads gpt_oss expert LoRA fused (3-D MoE LoRA, is_3d_moe_weight: experts.base_layer = gate_up_proj, experts "
        "= down_proj); per-expert experts.<e> modules are none it knows and fail the adapter's load "
        f"(fix: {export_fix(per_expert, 'fused')})" for layer in (0, 1)]
    assert check_adapter(per_expert, "peft").lines() == [
        f"{PREFIX}.{layer}.mlp.experts.{{0..3}}.{{down,gate,up}}_proj.lora_{{A,B}}.weight: peft would reject it: peft "
        "converts per-expert LoRA on load only for deepseek_v3, glm4_moe, mixtral, olmoe, qwen3_moe, not gpt_oss, and "
        "no target_modules entry names a module of the base: peft refuses to load it "
        f"(fix: {export_fix(per_expert, 'fused')})" for layer in (0, 1)]
    # No per-expert form exists for gpt-oss: SGLang's fix is the merged model.
    assert check_adapter(adapter, "sglang").lines()[0] == (
        f"{fused_keys(0)[0][0]}: sglang would ignore it: SGLang reads expert LoRA per expert (experts.<e>.<projection>)"
        f" and drops peft's fused experts keys (gate_up_proj) with a warning (fix: hf-moe adapter export {adapter} OUT"
        " --layout merged: serve the merged model)")
    # The fix vLLM names works.
    fused = export_adapter(per_expert, tmp_path / "fused", "fused")
    assert check_adapter(fused.path, "vllm").ok


def test_peft_ignores_per_expert_lora_on_qwen2_moe_which_its_converter_misses(built):
    adapter = built["qwen2_moe"] / "per-expert"
    assert check_adapter(adapter, "vllm").ok and check_adapter(adapter, "sglang").ok
    assert check_adapter(adapter, "peft").lines() == [
        f"{PREFIX}.{layer}.mlp.experts.{{0..3}}.{{down,gate,up}}_proj.lora_{{A,B}}.weight: peft would ignore it: peft "
        "converts per-expert LoRA on load only for deepseek_v3, glm4_moe, mixtral, olmoe, qwen3_moe, not qwen2_moe: "
        "its experts.<e> keys match no module, loaded with a warning, never applied "
        f"(fix: {export_fix(adapter, 'fused')})" for layer in (0, 1)]


def test_the_types_peft_converts_are_those_of_peft_itself():
    """Pinned against peft's private mapping (tests/test_adapters.py pins the Qwen2-MoE gap by loading)."""
    from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING

    converted = {model_type for model_type in ADAPTER_FAMILIES
                 if _MODEL_TO_CONVERSION_PATTERN.get(model_type) in _MOE_TARGET_MODULE_MAPPING}
    assert converted == set(PEFT_CONVERTS_PER_EXPERT)


# ------------------------------------------------------------------------------------------------ misapplied B
def test_unsloth_grouped_lora_b_is_misapplied_by_vllm_and_peft_with_or_without_its_marker(built, tmp_path):
    marked = edited(built["gpt_oss"] / "adapter", tmp_path / "marked", config={"lora_B_layout": "grouped_by_expert"})
    unmarked = edited(built["gpt_oss"] / "adapter", tmp_path / "unmarked", card=UNSLOTH_CARD)
    b_keys = [key for layer in (0, 1) for key, _ in fused_keys(layer) if ".lora_B." in key]
    for engine, name in (("vllm", "vLLM"), ("peft", "peft")):
        assert check_adapter(marked, engine).lines() == [
            f"{key}: {engine} would misapply it: adapter_config.json says lora_B_layout grouped_by_expert (column "
            f"e*r+k), but {name} reads lora_B rank-major (column k*E+e) whatever the marker says: each expert's delta "
            f"lands on other experts (fix: {export_fix(marked, 'fused')})" for key in b_keys]
        assert check_adapter(unmarked, engine).lines() == [
            f"{key}: {engine} would misapply it: an unsloth adapter without a lora_B_layout marker: unsloth before "
            f"2026-09-17 wrote lora_B grouped by expert (column e*r+k), {name} reads it rank-major (column k*E+e): "
            f"each expert's delta lands on other experts (fix: "
            f"{export_fix(unmarked, 'fused', ' --lora_B_layout grouped_by_expert')})" for key in b_keys]
        verdicts = {target.key: target.verdict for target in check_adapter(marked, engine).tensors}
        assert {key for key, verdict in verdicts.items() if verdict == "misapply"} == set(b_keys)
    # rank-major marked, or not unsloth's: clean. The fix (rewritten rank-major, marked) is clean too.
    assert check_adapter(edited(unmarked, tmp_path / "rank-major", config={"lora_B_layout": "rank_major"}), "vllm").ok
    fixed = export_adapter(unmarked, tmp_path / "fixed", "fused", lora_B_layout="grouped_by_expert")
    assert check_adapter(fixed.path, "vllm").ok and check_adapter(fixed.path, "peft").ok
    # On a per-expert family the fused tensors are rejected anyway; the fix reads B grouped by expert.
    qwen = edited(built["qwen3_moe"] / "adapter", tmp_path / "qwen", card=UNSLOTH_CARD)
    assert check_adapter(qwen, "vllm").lines()[0].endswith(
        f"(fix: {export_fix(qwen, 'per-expert', ' --lora_B_layout grouped_by_expert')})")


# ------------------------------------------------------------------------------------------------ incomplete
def test_a_per_expert_adapter_without_one_expert_is_rejected_by_vllm_and_peft(built, tmp_path):
    source = built["qwen3_moe"] / "per-expert"
    missing = edited(source, tmp_path / "missing", lambda saved: {
        key: value for key, value in saved.items() if ".layers.0.mlp.experts.2." not in key})
    no_expert_2 = "no gate_proj/up_proj/down_proj for expert 2 of the base's 4 experts in layer 0"
    refit = ("export the trained adapter again with every expert's gate, up and down; hf-moe adapter export refuses "
             "it as is")
    subject = f"{PREFIX}.0.mlp.experts.2.{{gate_proj,up_proj,down_proj}}"
    assert check_adapter(missing, "vllm").lines() == [
        f"{subject}: vllm would reject it: {no_expert_2}; vLLM stacks gate, up and down of every expert (pack_moe "
        f"asserts each) and fails the adapter's load (fix: {refit})"]
    assert check_adapter(missing, "peft").lines() == [
        f"{subject}: peft would reject it: {no_expert_2}; peft's converter stacks every expert's tensors (size "
        f"mismatch) (fix: {refit})"]
    assert check_adapter(missing, "sglang").ok  # SGLang gives expert 2 no LoRA: what the file holds
    with pytest.raises(ValueError, match=r"no LoRA for experts \[2\] of 4"):  # "refuses it as is"
        export_adapter(missing, tmp_path / "out", "fused")

    # No down_proj at all: vLLM still rejects it; the per-expert export writes a zero down_proj and fixes it.
    no_down = edited(source, tmp_path / "no-down",
                     lambda saved: {key: value for key, value in saved.items() if ".down_proj." not in key})
    assert check_adapter(no_down, "vllm").lines() == [
        f"{PREFIX}.{layer}.mlp.experts.{{0..3}}.down_proj: vllm would reject it: no down_proj for any of the base's 4 "
        f"experts in layer {layer}; vLLM stacks gate, up and down of every expert (pack_moe asserts each) and fails "
        f"the adapter's load (fix: {export_fix(no_down, 'per-expert')}, which writes a zero down_proj LoRA)"
        for layer in (0, 1)]
    assert check_adapter(no_down, "peft").ok and check_adapter(no_down, "sglang").ok
    assert check_adapter(export_adapter(no_down, tmp_path / "fixed", "per-expert").path, "vllm").ok


def test_vllm_rejects_a_fused_adapter_without_down_proj_on_gpt_oss(built, tmp_path):
    gate_up_only = edited(built["gpt_oss"] / "adapter", tmp_path / "gate-up",
                          lambda saved: {key: value for key, value in saved.items()
                                         if not key.endswith(("experts.lora_A.weight", "experts.lora_B.weight"))})
    assert check_adapter(gate_up_only, "vllm").lines() == [
        f"{PREFIX}.{layer}.mlp.experts.base_layer.lora_{{A,B}}.weight: vllm would reject it: layer {layer} has no "
        "down_proj LoRA; vLLM's 3-D MoE LoRA needs both gate_up_proj and down_proj of every adapted layer (fix: train "
        "both expert parameters (target_parameters gate_up_proj and down_proj), or hf-moe adapter export "
        f"{gate_up_only} OUT --layout merged: serve the merged model)" for layer in (0, 1)]
    assert check_adapter(gate_up_only, "peft").ok


def test_per_expert_names_of_another_block_or_family_than_vllms(built, tmp_path):
    """Mixtral per expert: vLLM reads `block_sparse_moe.experts.<e>.w1|w3|w2`; SGLang renames either family."""
    source = built["mixtral"] / "per-expert"
    under_mlp = edited(source, tmp_path / "mlp", lambda saved: {
        key.replace(".block_sparse_moe.", ".mlp."): value for key, value in saved.items()})
    assert check_adapter(under_mlp, "vllm").lines() == [
        f"{PREFIX}.{layer}.mlp.experts.{{0..3}}.{{w1,w2,w3}}.lora_{{A,B}}.weight: vllm would ignore it: vLLM's mixtral "
        "names its sparse block block_sparse_moe: keys under mlp.experts match no module "
        f"(fix: {export_fix(under_mlp, 'per-expert')})" for layer in (0, 1)]
    names = {".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}
    qwen_names = edited(source, tmp_path / "qwen-names", lambda saved: {
        next((key.replace(old, new) for old, new in names.items() if old in key), key): value
        for key, value in saved.items()})
    assert check_adapter(qwen_names, "vllm").lines() == [
        f"{PREFIX}.{layer}.block_sparse_moe.experts.{{0..3}}.{{down,gate,up}}_proj.lora_{{A,B}}.weight: vllm would "
        "reject it: vLLM's mixtral reads its experts as experts.<e>.w1/w3/w2; down_proj/gate_proj/up_proj name no LoRA "
        f"module it knows and fail the adapter's load (fix: {export_fix(qwen_names, 'per-expert')})"
        for layer in (0, 1)]
    assert check_adapter(under_mlp, "sglang").ok and check_adapter(qwen_names, "sglang").ok
    assert check_adapter(export_adapter(qwen_names, tmp_path / "fixed", "per-expert").path, "vllm").ok


def test_an_hf_moe_base_is_served_as_its_native_export_or_refused(tmp_path):
    from .conftest import tiny_config

    for model_type in ("hf_moe", "hf_mh_moe"):
        AutoModelForCausalLM.from_config(tiny_config(model_type)).save_pretrained(tmp_path / model_type)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / model_type)
        config = LoraConfig(r=2, lora_alpha=4, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                            target_modules=["q_proj"], init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(tmp_path / f"{model_type}-adapter")
    adapter = tmp_path / "hf_moe-adapter"
    result = check_adapter(adapter, "vllm")
    assert (result.model_type, result.served_as, len(result.lines())) == ("hf_moe", "mixtral", 12)
    assert "vLLM reads mixtral expert LoRA per expert (2-D MoE LoRA: experts.<e>.w1/w3/w2" in result.lines()[0]
    assert check_adapter(adapter, "peft").ok  # peft loads it on the hf_moe model itself
    assert check_adapter(export_adapter(adapter, tmp_path / "per-expert", "per-expert").path, "vllm").ok
    with pytest.raises(ValueError, match=r"^vLLM cannot serve this hf_mh_moe base: the per-expert form names"):
        check_adapter(tmp_path / "hf_mh_moe-adapter", "vllm")
    assert check_adapter(tmp_path / "hf_mh_moe-adapter", "peft").ok


# ------------------------------------------------------------------------------------------------ broken exports
def test_transposed_swapped_and_peft_018_exports_fail_the_check(built, tmp_path):
    per_expert = built["qwen3_moe"] / "per-expert"
    transposed = edited(per_expert, tmp_path / "transposed",
                        lambda saved: {key: value.T if ".experts." in key else value for key, value in saved.items()})
    fix = "write lora_A as (rank, in) and lora_B as (out, rank) per expert; hf-moe adapter export refuses it as is"
    for engine in ("vllm", "sglang", "peft"):
        assert check_adapter(transposed, engine).lines() == [
            f"{PREFIX}.{{0,1}}.mlp.experts.{{0..3}}.down_proj.lora_{{A,B}}.weight: {engine} would reject it: lora_A "
            f"(24, 2) / lora_B (2, 32) are transposed; expected lora_A (rank, 24) / lora_B (32, rank) (fix: {fix})",
            f"{PREFIX}.{{0,1}}.mlp.experts.{{0..3}}.{{gate,up}}_proj.lora_{{A,B}}.weight: {engine} would reject it: "
            f"lora_A (32, 2) / lora_B (2, 24) are transposed; expected lora_A (rank, 32) / lora_B (24, rank) "
            f"(fix: {fix})"], engine
    with pytest.raises(ValueError, match="rank mismatch"):  # "refuses it as is"
        export_adapter(transposed, tmp_path / "out", "fused")

    def swap(saved):
        return {(key.replace("lora_A", "lora_?").replace("lora_B", "lora_A").replace("lora_?", "lora_B")
                 if ".experts." in key else key): value for key, value in saved.items()}

    swapped = edited(per_expert, tmp_path / "swapped", swap)
    assert check_adapter(swapped, "vllm").lines()[0] == (
        f"{PREFIX}.{{0,1}}.mlp.experts.{{0..3}}.down_proj.lora_{{A,B}}.weight: vllm would reject it: lora_A (32, 2) / "
        f"lora_B (2, 24) hold B and A swapped; expected lora_A (rank, 24) / lora_B (32, rank) (fix: {fix})")

    fused = built["qwen3_moe"] / "adapter"
    expected = ("expected gate_up_proj lora_A (r*4, 32) / lora_B (48, r*4), down_proj lora_A (r*4, 24) / lora_B (32, "
                "r*4)")
    fused_transposed = edited(fused, tmp_path / "fused-transposed",
                              lambda saved: {key: value.T if ".experts." in key else value
                                             for key, value in saved.items()})
    assert check_adapter(fused_transposed, "peft").lines()[:2] == [
        f"{PREFIX}.0.mlp.experts.base_layer.lora_{{A,B}}.weight: peft would reject it: lora_A (32, 8) / lora_B (8, 48) "
        f"are gate_up_proj's factors transposed; {expected} (fix: write lora_A as (rank*E, in) and lora_B as (out, "
        "rank*E); hf-moe adapter export refuses it as is)",
        f"{PREFIX}.0.mlp.experts.lora_{{A,B}}.weight: peft would reject it: lora_A (24, 8) / lora_B (8, 32) are "
        f"down_proj's factors transposed; {expected} (fix: write lora_A as (rank*E, in) and lora_B as (out, rank*E); "
        "hf-moe adapter export refuses it as is)"]

    def peft_018(saved):  # (E, in, out) read positionally: lora_A (r*E, out), lora_B (in, r*E); H=32 != 2I=48
        shapes = {".experts.base_layer.lora_A.": (8, 48), ".experts.base_layer.lora_B.": (32, 8),
                  ".experts.lora_A.": (8, 32), ".experts.lora_B.": (24, 8)}
        return {key: next((torch.randn(shape) for part, shape in shapes.items() if part in key), value)
                for key, value in saved.items()}

    old = edited(fused, tmp_path / "peft-0.18", peft_018)
    assert check_adapter(old, "peft").lines()[0] == (
        f"{PREFIX}.0.mlp.experts.base_layer.lora_{{A,B}}.weight: peft would reject it: lora_A (8, 48) / lora_B (32, 8) "
        "are peft < 0.19's layout of gate_up_proj (lora_A's in-dim is the parameter's out-dim); peft >= 0.19 and vLLM "
        f"read {expected.removeprefix('expected ')} (fix: load it in peft 0.18 and save it with peft >= 0.19; hf-moe "
        "adapter export refuses peft < 0.19 adapters)")
    assert len(check_adapter(old, "peft").lines()) == 4

    # Rows that are not rank x E experts.
    uneven = edited(fused, tmp_path / "uneven", lambda saved: {
        key: value[:7] if key.endswith("layers.1.mlp.experts.lora_A.weight") else
        value[:, :7] if key.endswith("layers.1.mlp.experts.lora_B.weight") else value for key, value in saved.items()})
    assert check_adapter(uneven, "peft").lines() == [
        f"{PREFIX}.1.mlp.experts.lora_{{A,B}}.weight: peft would reject it: 7 rows are not rank x 4 experts of the "
        "base's layer 1 (fix: check --base: the adapter was trained on another model; hf-moe adapter export refuses it "
        "too)"]


def test_reversed_nesting_of_an_hf_moe_qlora_adapter_is_rejected_and_the_fused_export_fixes_it(built, tmp_path):
    def reverse(saved):  # down_proj inner (`experts.base_layer`), gate_up_proj outer, as on 4-bit experts
        def renamed(key):
            if ".experts.base_layer." in key:
                return key.replace(".experts.base_layer.", ".experts.")
            return key.replace(".experts.lora_", ".experts.base_layer.lora_")
        return {renamed(key): value for key, value in saved.items()}

    reversed_ = edited(built["gpt_oss"] / "adapter", tmp_path / "reversed", reverse)
    for engine, name in (("vllm", "vLLM"), ("peft", "peft")):
        assert check_adapter(reversed_, engine).lines() == [
            f"{PREFIX}.{layer}.mlp.experts.* (4 tensors): {engine} would reject it: {name} reads the inner wrapper "
            "(experts.base_layer) as gate_up_proj, as peft nests it on full-precision experts; here it is down_proj "
            "(hf_moe's QLoRA on 4-bit experts nests them the other way): the shapes do not fit "
            f"(fix: {export_fix(reversed_, 'fused')})" for layer in (0, 1)]
    fixed = export_adapter(reversed_, tmp_path / "fixed", "fused")
    assert check_adapter(fixed.path, "vllm").ok and check_adapter(fixed.path, "peft").ok


# ------------------------------------------------------------------------------------------------ the table
def test_the_table_lists_every_tensor_with_its_target(built, tmp_path):
    router = f"{PREFIX}.0.mlp.gate.lora_A.weight"
    adapter = edited(built["qwen3_moe"] / "adapter", tmp_path / "with-router",
                     lambda saved: {**saved, router: torch.zeros(2, 32)})
    result = check_adapter(adapter, "vllm")
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    rows = {target.key: target for target in result.tensors}
    assert set(rows) == set(saved) and all(rows[key].shape == tuple(saved[key].shape) for key in saved)
    assert [(target.layer, target.expert, target.projection, target.layout, target.verdict)
            for target in result.tensors[:4]] == [(0, "all", "gate_up", "fused", "reject"),
                                                  (0, "all", "gate_up", "fused", "reject"),
                                                  (0, "all", "down", "fused", "reject"),
                                                  (0, "all", "down", "fused", "reject")]
    assert (rows[router].layout, rows[router].projection, rows[router].verdict) == ("router", "gate", "unchecked")
    attention = rows[f"{PREFIX}.1.self_attn.v_proj.lora_B.weight"]
    assert (attention.layer, attention.expert, attention.projection, attention.layout, attention.verdict) == (
        1, None, "v_proj", "attention", "ok")
    per_expert = check_adapter(built["qwen3_moe"] / "per-expert", "vllm").tensors
    target = next(t for t in per_expert if t.key == f"{PREFIX}.1.mlp.experts.2.up_proj.lora_B.weight")
    assert (target.shape, target.layer, target.expert, target.projection, target.layout) == (
        (24, 2), 1, 2, "up", "per-expert")
    lines = result.table().splitlines()
    assert lines[0].split() == ["shape", "layer", "expert", "projection", "layout", "vllm", "tensor"]
    assert len(lines) == 2 + len(saved) and all(line.endswith(key) for line, key in zip(lines[2:], rows, strict=True))


# ------------------------------------------------------------------------------------------------ command line
def test_adapter_export_then_check_at_the_command_line(built, tmp_path, capsys):
    adapter, base = built["qwen3_moe"] / "adapter", built["qwen3_moe"] / "base"
    output = tmp_path / "served"
    cli_main(["adapter", "export", str(adapter), str(output), "--layout", "per-expert", "--base", str(base)])
    assert capsys.readouterr().out.startswith(f"per-expert adapter written to {output} (ranks: gate 2, up 2, down 2; "
                                              "56 tensors, ")

    cli_main(["adapter", "check", str(output), "--engine", "sglang", "--base", str(base)])  # clean: status 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{output} on {base} (qwen3_moe): sglang reads per-expert expert LoRA for qwen3_moe"
    assert out.rstrip().splitlines()[-1] == (f"clean: sglang reads all 48 expert tensors of {output} as trained on "
                                             "qwen3_moe")

    with pytest.raises(SystemExit) as exit_info:  # problems: the report, one line each, status 1
        cli_main(["adapter", "check", str(adapter)])
    out = capsys.readouterr().out
    assert exit_info.value.code == 1
    expected = check_adapter(adapter, "vllm")
    lines = out.rstrip().splitlines()
    assert lines[-1] == f"8 problem(s): vllm would reject 8 of 8 expert tensors of {adapter}"
    assert lines[-10:-2] == expected.lines() and lines[-2] == ""
    assert sum(line.rstrip().endswith(".weight") and " reject " in line for line in lines) == 8  # the table rows

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["adapter", "check", str(adapter), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert exit_info.value.code == 1
    assert report["ok"] is False and [problem["line"] for problem in report["problems"]] == expected.lines()
    assert len(report["tensors"]) == 16 and report["engine_reads"] == ["per-expert"]
    assert report["tensors"][0] == {"tensor": fused_keys(0)[0][0], "shape": "8x32", "layer": 0, "expert": "all",
                                    "projection": "gate_up", "layout": "fused", "vllm": "reject"}

    cli_main(["adapter", "check", str(output), "--json"])
    assert json.loads(capsys.readouterr().out)["ok"] is True


@pytest.mark.parametrize("argv, error", [
    (["adapter", "check", "{tmp}/nowhere"], "hf-moe adapter check: error: {tmp}/nowhere: no such adapter folder"),
    (["adapter", "check", "{adapter}", "--engine", "tgi"],
     "hf-moe adapter check: error: `engine`='tgi' is invalid: choose one of ('vllm', 'sglang', 'peft')"),
    (["adapter", "check", "{adapter}", "--base", "{tmp}"],
     "hf-moe adapter check: error: {tmp}: no config.json"),
    (["adapter", "export", "{adapter}", "{tmp}", "--layout", "fused"],
     "hf-moe adapter export: error: {tmp} already exists; choose another output folder or pass --overwrite"),
    (["adapter", "export", "{adapter}", "{tmp}/x", "--layout", "packed"],
     "hf-moe adapter export: error: `layout`='packed' is invalid: choose one of ('per-expert', 'fused', 'merged')"),
])
def test_adapter_commands_say_bad_input_in_one_line_with_status_2(built, tmp_path, capsys, argv, error):
    values = {"tmp": str(tmp_path), "adapter": str(built["qwen3_moe"] / "adapter")}
    with pytest.raises(SystemExit) as exit_info:
        cli_main([part.format(**values) for part in argv])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith(error.format(**values)), stderr


def test_the_same_base_by_default_and_by_name(built, tmp_path):
    """The base defaults to the adapter's base_model_name_or_path; a moved adapter needs `--base`."""
    adapter = built["mixtral"] / "adapter"
    assert check_adapter(adapter, "vllm").base == built["mixtral"] / "base"
    moved = edited(adapter, tmp_path / "moved", config={"base_model_name_or_path": "someone/mixtral"})
    with pytest.raises(ValueError, match="pass `base`"):
        check_adapter(moved, "vllm")
    result = check_adapter(moved, "vllm", base=built["mixtral"] / "base")
    base_option = f" --base {built['mixtral'] / 'base'}"
    assert result.lines()[0].endswith(f"(fix: {export_fix(moved, 'per-expert', base_option)})")
    shutil.rmtree(moved)
