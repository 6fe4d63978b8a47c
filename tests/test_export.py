"""Export to native Mixtral / Qwen2-MoE / Qwen3-MoE: the exported folder, loaded by stock transformers in a fresh
process in which hf_moe cannot be imported, computes the hf_moe model's function; what no target reproduces exactly
is refused with the blocking feature named and nothing written."""

import json
import re

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from hf_moe import ExportRefusedError, export
from hf_moe.checkpoints.compare import compare_outputs, model_outputs
from hf_moe.cli import main
from hf_moe.export import TARGETS, choose_target, load_natively

from .conftest import tiny_config

INPUTS = [[1, 5, 9, 13, 20, 33, 7, 8, 41, 3], [4, 4, 90, 17, 2, 60]]  # longer than the sliding windows below
MAX_NEW_TOKENS = 8

# name: (model type, config overrides, --to, expected target). Together they cover every mapping of the README table.
CASES = {
    # renormalised top-k on every layer; a rope_theta and eps that differ from Mixtral's defaults
    "mixtral": ("hf_moe", dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}, rms_norm_eps=1e-5),
                "mixtral", "mixtral"),
    # upcycled Switch (straight-through top-1 = weight 1), sliding window on every layer, tied embeddings, head_dim
    "mixtral_top1_sliding_tied": ("hf_switch", dict(norm_topk_prob=True, straight_through_topk=True,
                                                    eval_capacity_factor=None, sparse_layer_interval=1,
                                                    sliding_window=4, tie_word_embeddings=True, head_dim=16),
                                  "auto", "mixtral"),
    # q/k norm, dense layers between sparse ones, raw softmax weights, q/k/v/o biases, explicit head_dim
    "qwen3_moe": ("hf_moe", dict(use_qk_norm=True, sparse_layers=[0, 2], norm_topk_prob=False, head_dim=12,
                                 attention_bias=True, attention_output_bias=True, moe_intermediate_size=24),
                  "auto", "qwen3_moe"),
    # q/k/v bias, shared experts, dense layers, sliding window on some layers only
    "qwen2_moe_shared": ("hf_moe", dict(attention_bias=True, num_shared_experts=2, sparse_layers=[1, 2],
                                        moe_intermediate_size=16, sliding_window=3,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
                         "auto", "qwen2_moe"),
    # Switch (top-1, p * E(x)) every other layer, dropless inference: Qwen2-MoE with a zero-width shared expert
    "qwen2_moe_switch": ("hf_switch", dict(eval_capacity_factor=None), "auto", "qwen2_moe"),
}
PER_EXPERT_NAMES = {
    "mixtral": re.compile(r"model\.layers\.\d+\.block_sparse_moe\.(gate|experts\.\d+\.w[123])\.weight"),
    "qwen2_moe": re.compile(r"model\.layers\.\d+\.mlp\.(gate|experts\.\d+\.(gate|up|down)_proj|shared_expert\."
                            r"(gate|up|down)_proj|shared_expert_gate)\.weight"),
    "qwen3_moe": re.compile(r"model\.layers\.\d+\.mlp\.(gate|experts\.\d+\.(gate|up|down)_proj)\.weight"),
}


def _save_tiny(model_type: str, folder, **overrides):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():  # norms away from 1 so that a missed norm weight cannot go unnoticed
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case exported, and all exports loaded natively in ONE fresh process without hf_moe."""
    root = tmp_path_factory.mktemp("export")
    folders, references = {}, {}
    for name, (model_type, overrides, to, _) in CASES.items():
        source = _save_tiny(model_type, root / name, **overrides)
        folders[name] = export(str(source), str(root / f"{name}-native"), to=to, max_shard_size="30KB")
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        references[name] = model_outputs(model, [torch.tensor([ids]) for ids in INPUTS], MAX_NEW_TOKENS, 0)
    jobs = [dict(folder=folder, inputs=INPUTS, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=0)
            for folder in folders.values()]
    natives = dict(zip(folders, load_natively(jobs), strict=True))
    return folders, references, natives


@pytest.mark.parametrize("case", CASES)
def test_export_loads_natively_with_the_same_function(exported, case):
    folders, references, natives = exported
    native, expected_target = natives[case], CASES[case][3]
    assert native["class"] == TARGETS[expected_target].architecture
    assert native["module"].startswith(f"transformers.models.{expected_target}.")
    assert not native["hf_moe_imported"]
    assert native["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    report = compare_outputs(references[case], native)
    assert report["max_abs_logit_difference"] <= 1e-5, report
    assert report["identical_generations"] == len(INPUTS), report


@pytest.mark.parametrize("case", CASES)
def test_export_writes_the_per_expert_layout_sharded_without_code(exported, case):
    folders, _, natives = exported
    target = CASES[case][3]
    names = natives[case]["tensor_names"]
    block_names = [name for name in names if ".mlp." in name or ".block_sparse_moe." in name]
    sparse_names = [name for name in block_names if not re.search(r"\.mlp\.(gate|up|down)_proj\.", name)]
    assert sparse_names and all(PER_EXPERT_NAMES[target].fullmatch(name) for name in sparse_names), sparse_names
    assert not any("gate_up_proj" in name for name in names)
    folder = folders[case]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == target and "auto_map" not in config
    assert not list(folder.glob("*.py"))
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 1


def test_export_maps_every_config_field(exported):
    folders, _, _ = exported
    mixtral = json.loads((folders["mixtral"] / "config.json").read_text())
    assert mixtral["rope_parameters"]["rope_theta"] == 500.0 and mixtral["rms_norm_eps"] == 1e-5
    assert (mixtral["pad_token_id"], mixtral["bos_token_id"], mixtral["eos_token_id"]) == (0, 1, 2)
    tied = json.loads((folders["mixtral_top1_sliding_tied"] / "config.json").read_text())
    assert (tied["sliding_window"], tied["tie_word_embeddings"], tied["head_dim"], tied["num_experts_per_tok"]) == (
        4, True, 16, 1)
    qwen3 = json.loads((folders["qwen3_moe"] / "config.json").read_text())
    assert (qwen3["mlp_only_layers"], qwen3["norm_topk_prob"], qwen3["attention_bias"], qwen3["head_dim"]) == (
        [1], False, True, 12)
    qwen2 = json.loads((folders["qwen2_moe_shared"] / "config.json").read_text())
    assert (qwen2["shared_expert_intermediate_size"], qwen2["mlp_only_layers"], qwen2["qkv_bias"]) == (32, [0], True)
    assert qwen2["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert qwen2["sliding_window"] == 3


def test_qwen2_shared_expert_with_zero_gate_and_doubled_down_proj_is_the_ungated_one(tmp_path):
    source = _save_tiny("hf_moe", tmp_path / "moe", num_shared_experts=2, moe_intermediate_size=16)
    folder = export(str(source), str(tmp_path / "qwen2"), to="qwen2_moe")
    hf_moe_block = AutoModelForCausalLM.from_pretrained(source).model.layers[0].mlp
    qwen2_block = AutoModelForCausalLM.from_pretrained(folder).model.layers[0].mlp
    hidden = torch.randn(50, 32) * 3
    with torch.no_grad():
        ungated = hf_moe_block.shared_experts(hidden)
        gated = torch.sigmoid(qwen2_block.shared_expert_gate(hidden)) * qwen2_block.shared_expert(hidden)
    assert ungated.abs().max() > 0
    assert torch.equal(gated, ungated)  # bit for bit: sigmoid(0) = 0.5 and the factor 2 are exact


def test_export_carries_tokenizer_generation_config_and_a_card(tiny_upcycled, tmp_path):
    folder = export(str(tiny_upcycled), str(tmp_path / "mixtral"))
    for file_name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / file_name).is_file(), file_name
    assert "chat_template" in (folder / "tokenizer_config.json").read_text() or (
        folder / "chat_template.jinja").is_file()
    card = ModelCard.load(folder / "README.md").data
    assert (card.library_name, card.pipeline_tag) == ("transformers", "text-generation")
    assert {"mixture-of-experts", "mixtral"} <= set(card.tags)
    assert card.base_model is None  # the source is a local folder: never a local path
    with_id = export(str(tiny_upcycled), str(tmp_path / "with-id"), base_model="me/smol-moe")
    assert ModelCard.load(with_id / "README.md").data.base_model == "me/smol-moe"


def test_export_refuses_to_replace_a_folder_unless_overwrite(tiny_upcycled, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(FileExistsError):
        export(str(tiny_upcycled), str(target))
    assert list(target.iterdir()) == []
    export(str(tiny_upcycled), str(target), overwrite=True)
    assert (target / "config.json").is_file()


# ------------------------------------------------------------------------------------------------ refusals
REFUSALS = {
    # name: (model type, overrides, --to, words the error must contain)
    "mh_moe": ("hf_mh_moe", {}, "auto", ["MH-MoE"]),
    "eval_capacity": ("hf_switch", {}, "auto", ["`eval_capacity_factor`=2.0", "eval_capacity_factor=None"]),
    "noisy_topk": ("hf_moe", dict(router_type="noisy_topk"), "auto", ["noisy top-k"]),
    "qk_norm_and_shared_experts": ("hf_moe", dict(use_qk_norm=True, num_shared_experts=1), "auto",
                                   ["q/k norm", "shared experts"]),
    "mixtral_without_renormalisation": ("hf_moe", dict(norm_topk_prob=False), "mixtral",
                                        ["`norm_topk_prob`=False", "qwen2_moe or qwen3_moe"]),
    "mixtral_dense_layers": ("hf_moe", dict(sparse_layers=[0, 2]), "mixtral", ["dense layers [1]"]),
    "qwen3_without_qk_norm": ("hf_moe", {}, "qwen3_moe", ["no q/k norm"]),
    "qwen2_output_bias": ("hf_moe", dict(attention_bias=True, attention_output_bias=True), "qwen2_moe",
                          ["`attention_output_bias`=True"]),
    "o_bias_without_qkv_bias": ("hf_moe", dict(attention_output_bias=True), "auto",
                                ["`attention_bias`=False with `attention_output_bias`=True"]),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_export_refuses_what_no_target_reproduces_and_writes_nothing(tmp_path, case):
    model_type, overrides, to, words = REFUSALS[case]
    tiny_config(model_type, **overrides).save_pretrained(tmp_path / "moe")  # refused before any weight is read
    output = tmp_path / "native"
    with pytest.raises(ExportRefusedError) as refusal:
        export(str(tmp_path / "moe"), str(output), to=to)
    for word in words:
        assert word in str(refusal.value), str(refusal.value)
    assert not output.exists()
    assert [path.name for path in tmp_path.iterdir()] == ["moe"]


def test_capacity_that_cannot_bind_is_exported():
    # capacity = ceil(c * tokens * k / E) >= tokens when c * k >= E: no expert can overflow.
    config = tiny_config("hf_switch", eval_capacity_factor=4.0, norm_topk_prob=True, sparse_layer_interval=1)
    assert choose_target(config).name == "mixtral"


def test_cli_export_and_refusal(tiny_upcycled, tmp_path, capsys):
    main(["export", str(tiny_upcycled), str(tmp_path / "cli"), "--to", "qwen2_moe"])
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["model_type"] == "qwen2_moe"
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # a refusal is a user error: one line, status 2
        main(["export", str(tiny_upcycled), str(tmp_path / "refused"), "--to", "qwen3_moe"])
    error = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and error.startswith("hf-moe export: error:") and "no q/k norm" in error
    assert "\n" not in error and not (tmp_path / "refused").exists()
    with pytest.raises(SystemExit) as bad:
        main(["export", str(tiny_upcycled), str(tmp_path / "bad"), "--to", "llama"])
    assert bad.value.code == 2 and "`to`='llama'" in capsys.readouterr().err
