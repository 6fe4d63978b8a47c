"""A saved folder loads with trust_remote_code=True in a process where hf_moe cannot be imported."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_moe.remote_check import load_as_remote_code

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
    import json

    AutoModelForCausalLM.from_config(tiny_config("hf_moe")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["auto_map"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="as remote code failed"):
        load_as_remote_code(tmp_path, torch.tensor([[3, 4]]))
