"""A saved folder loads with trust_remote_code=True in a process where hf_moe cannot be imported."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_moe.checkpoints.names import CODE_FILES
from hf_moe.remote_check import load_as_remote_code, run_without_hf_moe

from .conftest import MODEL_TYPES, tiny_config


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_saved_folder_loads_as_remote_code_without_hf_moe(model_type, tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    ids = torch.randint(3, 97, (2, 6))
    expected_logits = model(input_ids=ids).logits
    expected_generation = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    model.save_pretrained(tmp_path)

    remote = load_as_remote_code(tmp_path, ids, max_new_tokens=8)

    prefix = {"hf_moe": "Moe", "hf_switch": "Switch", "hf_mh_moe": "MHMoe"}[model_type]
    assert remote["classes"] == [f"{prefix}ForCausalLM", f"{prefix}Model", f"{prefix}ForSequenceClassification"]
    assert all(module.startswith("transformers_modules.") for module in remote["modules"])
    assert remote["experts_implementation"] == "eager"
    assert (remote["logits"] - expected_logits).abs().max().item() < 1e-6
    assert torch.equal(remote["generated"], expected_generation)


def test_without_auto_map_the_folder_does_not_load_so_hf_moe_is_really_absent(tmp_path):
    AutoModelForCausalLM.from_config(tiny_config("hf_moe")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["auto_map"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="as remote code failed"):
        load_as_remote_code(tmp_path, torch.tensor([[3, 4]]))


def test_a_saved_folder_carries_every_code_file_and_the_remote_model_runs_the_shipped_kernels(tmp_path):
    from transformers.dynamic_module_utils import get_relative_import_files

    model = AutoModelForCausalLM.from_config(tiny_config("hf_mh_moe")).train()
    ids = torch.randint(3, 97, (2, 6))
    model.save_pretrained(tmp_path)
    assert sorted(CODE_FILES) == ["configuration_hf_moe.py", "experts_kernels_hf_moe.py", "modeling_hf_moe.py"]
    assert sorted(path.name for path in tmp_path.glob("*.py")) == sorted(CODE_FILES)
    # What transformers' remote-code loader copies into its module cache with the modeling file.
    assert sorted(path.rpartition("/")[2] for path in get_relative_import_files(str(tmp_path / "modeling_hf_moe.py"))
                  ) == ["configuration_hf_moe.py", "experts_kernels_hf_moe.py"]
    expected = model(input_ids=ids, labels=ids).loss
    expected.backward()
    layer = model.config.sparse_layer_indices[0]
    expected_grad = model.model.layers[layer].mlp.experts.gate_up_proj.grad

    script = """
import json, sys, torch
from transformers import AutoModelForCausalLM
folder, ids, layer, result_path = sys.argv[1], torch.tensor(json.loads(sys.argv[2])), int(sys.argv[3]), sys.argv[4]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).train()
loss = model(input_ids=ids, labels=ids).loss
loss.backward()  # on CPU: the shipped CpuSwiGLUExperts
kernels = [name for name in sys.modules if name.endswith(".experts_kernels_hf_moe")]
torch.save({"loss": loss.detach(), "grad": model.model.layers[layer].mlp.experts.gate_up_proj.grad,
            "kernels": kernels}, result_path)
"""
    remote = run_without_hf_moe(script, str(tmp_path), json.dumps(ids.tolist()), str(layer))
    assert len(remote["kernels"]) == 1 and remote["kernels"][0].startswith("transformers_modules.")
    assert (remote["loss"] - expected.detach()).abs().item() < 1e-6
    assert (remote["grad"] - expected_grad).abs().max().item() < 1e-6
