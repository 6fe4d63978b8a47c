"""scripts/measure_routing_replay.py on tiny random models (2 prompts, 3 new tokens): the JSON it writes has every
measurement, and a training forward that replays the rollout's routing uses the rollout's experts everywhere."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "measure_routing_replay.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("measure_routing_replay", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["deepseek_v3", "hf_moe_tiny"])
def test_measure_routing_replay_writes_every_measurement_and_replay_leaves_no_difference(script, model, tmp_path,
                                                                                        capsys):
    output = tmp_path / "replay.json"
    returned = script.main(["--model", model, "--num_prompts", "2", "--max_new_tokens", "3", "--repeats", "1",
                            "--output_json", str(output)])
    results = json.loads(output.read_text(encoding="utf-8"))
    assert results["models"].keys() == {model} and returned["models"].keys() == {model}
    assert {"cpu", "cpu_count", "torch", "transformers"} <= results["environment"].keys()
    measured = results["models"][model]
    assert measured["prompts"] == 2 and measured["max_new_tokens"] == 3
    assert measured["comparisons"].keys() == {key for key, _ in script.COMPARISONS}
    for row in measured["comparisons"].values():
        assert {"completion_tokens_compared", "differing_token_share", "mean_layer_share", "max_layer_share",
                "layer_share", "prompt_differing_token_share", "max_abs_logp_diff",
                "mean_abs_logp_diff"} <= row.keys()
        assert len(row["layer_share"]) == measured["sparse_layers"]
        assert row["completion_tokens_compared"] > 0 and row["prompt_tokens_compared"] > 0
    for key in ("bf16_rollout_vs_fp32_training_replayed", "fp32_rollout_vs_fp32_training_replayed"):
        replayed = measured["comparisons"][key]
        assert replayed["differing_token_share"] == 0.0 and replayed["max_layer_share"] == 0.0
        assert replayed["prompt_differing_token_share"] == 0.0 and replayed["replayed_share"] > 0.5
    for timed in ("forward", "forward_backward"):
        speed = measured["speed"][timed]
        assert speed["without_replay_s"] > 0 and speed["with_replay_s"] > 0 and speed["ratio"] > 0
    assert "| bf16 rollout -> fp32 training, replay | 0.00% |" in capsys.readouterr().out
