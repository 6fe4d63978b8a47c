"""A saved folder loads with trust_remote_code=True in a process where hf_moe cannot be imported."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from .conftest import MODEL_TYPES, tiny_config

REMOTE_LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_moe"] = None  # any `import hf_moe` now raises ImportError
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    folder, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
    try:
        import hf_moe  # noqa: F401
        raise SystemExit("hf_moe is importable; the test would prove nothing")
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    torch.save({
        "logits": model(input_ids=ids).logits,
        "generated": model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0),
        "classes": [type(model).__name__, type(base).__name__, type(classifier).__name__],
        "experts_implementation": model.config._experts_implementation,
    }, folder + "/remote_result.pt")
    """
)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_saved_folder_loads_as_remote_code_without_hf_moe(model_type, tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    ids = torch.randint(3, 97, (2, 6))
    expected_logits = model(input_ids=ids).logits
    expected_generation = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    model.save_pretrained(tmp_path)

    result = subprocess.run([sys.executable, "-c", REMOTE_LOADER, str(tmp_path), json.dumps(ids.tolist())],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "remote_result.pt")
    prefix = {"hf_moe": "Moe", "hf_switch": "Switch", "hf_mh_moe": "MHMoe"}[model_type]
    assert remote["classes"] == [f"{prefix}ForCausalLM", f"{prefix}Model", f"{prefix}ForSequenceClassification"]
    assert remote["experts_implementation"] == "eager"
    assert (remote["logits"] - expected_logits).abs().max().item() < 1e-6
    assert torch.equal(remote["generated"], expected_generation)
