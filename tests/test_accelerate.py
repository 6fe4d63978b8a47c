"""`accelerate launch --multi_gpu --num_processes 2 -m hf_moe.cli finetune` (DDP, 2 CPU processes, gloo) against one
process with the same global batch: the same logged losses and the same (global) expert load, logged by one
process. One launch."""

import json
import os
import subprocess
import sys

import pytest

from hf_moe.training import FinetuneArguments, build_trainer

COMMON = dict(train_per_family=4, eval_per_family=1, max_steps=3, learning_rate=1e-3, warmup_steps=0,
              logging_steps=1, save_steps=3, max_length=64, router_aux_loss_scope="global_batch",
              router_aux_loss_coef=0.1, report_to="tensorboard")


def _cli_flags(fields: dict) -> list[str]:
    return [item for key, value in fields.items() for item in (f"--{key}", str(value))]


def _training_logs(log_history: list[dict]) -> list[dict]:
    return [entry for entry in log_history if "loss" in entry]


@pytest.fixture(scope="module")
def ddp_run(tiny_upcycled, tmp_path_factory):
    output = tmp_path_factory.mktemp("ddp") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               "-m", "hf_moe.cli", "finetune", str(tiny_upcycled), "--output_dir", str(output),
               "--per_device_train_batch_size", "2", *_cli_flags(COMMON)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    return output, _training_logs(state["log_history"])


def _one_process_logs(model_path, output_dir, **overrides) -> list[dict]:
    fields = {**COMMON, "report_to": "none", **overrides}
    trainer = build_trainer(FinetuneArguments(model_path=str(model_path), output_dir=str(output_dir), **fields))
    trainer.train()
    return _training_logs(trainer.state.log_history)


def test_ddp_finetune_matches_one_process_with_the_same_global_batch(tiny_upcycled, tmp_path, ddp_run):
    output, ddp_logs = ddp_run
    one_logs = _one_process_logs(tiny_upcycled, tmp_path / "one", per_device_train_batch_size=4)
    assert len(ddp_logs) == len(one_logs) == 3
    for ddp, one in zip(ddp_logs, one_logs, strict=True):
        assert ddp["loss"] == pytest.approx(one["loss"], abs=1e-5)
    # ExpertStatsCallback sums its counts over the processes: the logged load is the global load. The recorder counts
    # padded rows too, so the reference pads the same way: one process, micro-batches of 2 rows (the first step
    # routes with the initial weights whatever the scope).
    first_step = _one_process_logs(tiny_upcycled, tmp_path / "ga2", per_device_train_batch_size=2,
                                   gradient_accumulation_steps=2, max_steps=1, save_steps=1)[0]
    keys = [key for key in first_step if key.endswith("_fraction") or key.endswith("router_entropy")]
    assert len(keys) > 8
    for key in keys:
        assert ddp_logs[0][key] == pytest.approx(first_step[key], abs=1e-6), key
    # Logged once: only the main process's reporter writes an event file.
    assert len(list((output / "runs").rglob("events.out.tfevents*"))) == 1
