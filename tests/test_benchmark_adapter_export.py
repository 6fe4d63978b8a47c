"""scripts/benchmark_adapter_export.py on a tiny upcycled model with a random LoRA on its experts and attention (1
repeat, 2 prompts, 3 new tokens): every layout is exported, timed and sized, the merged model answers as the adapted
one, and `hf-moe adapter check` flags the fused adapter for vLLM and passes its per-expert export."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark_adapter_export.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("benchmark_adapter_export", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_adapter_export_measures_every_layout(script, tiny_upcycled, tmp_path, capsys):
    from hf_moe.quantization.lora import attach_moe_lora

    torch.manual_seed(0)
    adapted = attach_moe_lora(AutoModelForCausalLM.from_pretrained(tiny_upcycled), r=2,
                              targets="attention,experts", init_lora_weights=False)  # every B non-zero
    adapted.save_pretrained(tmp_path / "adapter")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["What is 2 + 2?", "Say hi."]))

    output = tmp_path / "bench"
    returned = script.main(["--model_dir", str(tiny_upcycled), "--adapter_dir", str(tmp_path / "adapter"),
                            "--output_dir", str(output), "--prompts", str(prompts), "--repeats", "1",
                            "--max_new_tokens", "3"])
    results = json.loads((output / "results.json").read_text())
    assert results["layouts"].keys() == returned["layouts"].keys() == {"per-expert", "fused", "merged"}
    assert {"cpu", "cpu_count", "torch", "transformers", "peft", "hf_moe"} <= results["environment"].keys()
    for layout, measured in results["layouts"].items():
        assert len(measured["seconds"]) == 1 and measured["median_s"] > 0
        assert measured["size"]["bytes"] > 0 and measured["size"]["tensors"] > 0, layout
        assert (output / layout).is_dir()
    assert results["fused_vs_adapter"]["bit_identical"] == results["fused_vs_adapter"]["tensors"] > 0
    comparison = results["merged_vs_adapted"]
    assert comparison["merged"]["identical"] == comparison["merged"]["prompts"] == 2
    assert comparison["merged"]["max_abs_logit_diff"] <= 1e-4
    assert comparison["base"]["max_abs_logit_diff"] > 1e-3  # the random adapter changes the logits
    assert results["check_adapter"]["exit_status"] == 1 and "reject" in results["check_adapter"]["output"]
    assert results["check_per_expert"]["exit_status"] == 0 and "clean" in results["check_per_expert"]["output"]
    printed = capsys.readouterr().out
    assert "| merged export | 2 / 2 |" in printed and "| per-expert |" in printed
