"""Smoke test of `scripts/grpo_routing_replay.py` on the tiny hf_moe: two GRPO steps per mode, the JSON and the
figure written, R3 (`routing_replay="rollout"`) logging no routing mismatch and replaying the completion tokens."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "grpo_routing_replay.py"


def _script():
    spec = importlib.util.spec_from_file_location("grpo_routing_replay", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grpo_routing_replay_script_tiny(tmp_path, capsys):
    script = _script()
    figure = tmp_path / "figure.png"
    args = script.GRPORunArguments(model="tiny", modes="none,rollout", max_steps=2, output_dir=str(tmp_path / "out"),
                                   figure=str(figure), max_completion_length=8, num_prompts=16)
    script.main(args)

    report = json.loads((tmp_path / "out" / "grpo_routing_replay.json").read_text())
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(report["modes"]) == {"none", "rollout"}
    for mode, result in report["modes"].items():
        assert result["steps"] == 2
        assert result["rollout_decode_dtypes"] == ["bfloat16"]  # bf16 autocast reaches the cached rollout
        curves = result["curves"]
        for key in ("clip_ratio/region_mean", "kl", "moe/routing_mismatch"):
            assert [step for step, _ in curves[key]] == [1, 2], (mode, key)
        assert curves["reward"] and all(math.isfinite(value) for _, value in curves["reward"])
    rollout = report["modes"]["rollout"]
    assert all(value == 0.0 for _, value in rollout["curves"]["moe/routing_mismatch"])
    assert all(value > 0.9 for _, value in rollout["curves"]["moe/replayed_tokens"])
    assert report["modes"]["none"]["curves"]["moe/replayed_tokens"] == []  # no replay, mismatch only measured
    assert "| rollout | 2 |" in capsys.readouterr().out

    # --from_json: the tables and the figure again from the finished run, no training
    again = script.main(script.GRPORunArguments(from_json=str(tmp_path / "out" / "grpo_routing_replay.json"),
                                                output_dir=str(tmp_path / "again"), figure=str(tmp_path / "again.png")))
    assert again["table"] == report["table"] and (tmp_path / "again.png").is_file()
