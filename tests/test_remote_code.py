"""A saved folder loads with trust_remote_code=True in a process where hf_moe cannot be imported."""

import json
import shutil
from pathlib import Path

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


def test_a_saved_folder_carries_every_code_file_and_the_remote_model_runs_the_shipped_code(tmp_path):
    from transformers.dynamic_module_utils import get_relative_import_files

    model = AutoModelForCausalLM.from_config(tiny_config("hf_mh_moe")).train()
    ids = torch.randint(3, 97, (2, 6))
    model.save_pretrained(tmp_path)
    assert sorted(CODE_FILES) == ["configuration_hf_moe.py", "experts_kernels_hf_moe.py", "modeling_hf_moe.py",
                                  "routing_hf_moe.py"]
    assert sorted(path.name for path in tmp_path.glob("*.py")) == sorted(CODE_FILES)
    # What transformers' remote-code loader copies into its module cache with the modeling file.
    assert sorted(path.rpartition("/")[2] for path in get_relative_import_files(str(tmp_path / "modeling_hf_moe.py"))
                  ) == ["configuration_hf_moe.py", "experts_kernels_hf_moe.py", "routing_hf_moe.py"]
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
shipped = [name for name in sys.modules if name.endswith((".experts_kernels_hf_moe", ".routing_hf_moe"))]
torch.save({"loss": loss.detach(), "grad": model.model.layers[layer].mlp.experts.gate_up_proj.grad,
            "shipped": shipped}, result_path)
"""
    remote = run_without_hf_moe(script, str(tmp_path), json.dumps(ids.tolist()), str(layer))
    assert len(remote["shipped"]) == 2 and all(name.startswith("transformers_modules.") for name in remote["shipped"])
    assert (remote["loss"] - expected.detach()).abs().item() < 1e-6
    assert (remote["grad"] - expected_grad).abs().max().item() < 1e-6


def test_no_model_file_holds_a_collective():
    """Collectives and training state are hf_moe's training add-ons', not the remote code's: the source text of
    every file in modeling/ names no torch.distributed."""
    import hf_moe.modeling

    folder = Path(hf_moe.modeling.__file__).parent
    paths = sorted(folder.glob("*.py"))
    assert {path.name for path in paths} >= set(CODE_FILES)
    for path in paths:
        text = path.read_text()
        for needle in ("torch.distributed", "from torch import distributed", "all_reduce", "all_gather"):
            assert needle not in text, (path.name, needle)


_GLOBAL_BATCH_WITHOUT_HF_MOE = """
import json, logging, sys, torch
from transformers import AutoModelForCausalLM
global_folder, micro_folder, ids, result_path = sys.argv[1:5]
ids = torch.tensor(json.loads(ids))
warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger().addHandler(handler)
results = {}
for name, folder in (("global", global_folder), ("micro", micro_folder)):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        model.eval()(input_ids=ids, labels=ids)  # not a training forward: no scope, no warning
    model.train()
    results[name] = [model(input_ids=ids, labels=ids).aux_loss.detach() for _ in range(2)]
    results[name + "_hook"] = model.optimizer_step_hook
torch.save({**results, "warnings": warnings}, result_path)
"""


def test_global_batch_scope_without_hf_moe_balances_each_forward_call_and_says_so_once(tmp_path):
    """Remote code without hf_moe has no optimizer-step hook: `global_batch` counts f_e over the forward call's own
    tokens (exactly the micro-batch loss) and warns once."""
    config = tiny_config("hf_moe", router_aux_loss_scope="global_batch", router_jitter_noise=0.0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "global")
    shutil.copytree(tmp_path / "global", tmp_path / "micro")
    saved = json.loads((tmp_path / "micro" / "config.json").read_text())
    (tmp_path / "micro" / "config.json").write_text(json.dumps({**saved, "router_aux_loss_scope": "micro_batch"}))
    ids = torch.randint(3, 97, (2, 8))

    remote = run_without_hf_moe(_GLOBAL_BATCH_WITHOUT_HF_MOE, str(tmp_path / "global"), str(tmp_path / "micro"),
                                json.dumps(ids.tolist()))

    assert remote["global_hook"] is None and remote["micro_hook"] is None
    assert all(torch.equal(g, m) for g, m in zip(remote["global"], remote["micro"], strict=True))
    scope_warnings = [message for message in remote["warnings"] if "global_batch" in message]
    assert len(scope_warnings) == 1 and "micro-batch scope" in scope_warnings[0], remote["warnings"]
