"""`accelerate launch ... -m hf_moe.cli finetune` on 2 CPU processes (gloo) against one process with the same global
batch: DDP (`--multi_gpu`) gives the same logged losses and the same (global) expert load, logged by one process;
FSDP2 (an accelerate config file with `fsdp_version: 2`) trains the same steps to the same losses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_moe.recipes import build_trainer

from .conftest import finetune_arguments

COMMON = dict(train_per_family=4, eval_per_family=1, max_steps=3, learning_rate=1e-3, warmup_steps=0,
              logging_steps=1, save_steps=3, max_length=64, router_aux_loss_scope="global_batch",
              router_aux_loss_coef=0.1, report_to="tensorboard")


FSDP2_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
"""

# No `deepspeed_moe_layer_cls_names`: hf_moe makes the sparse blocks ZeRO-3 leaves itself (hf_moe/training/zero3.py).
ZERO3_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_machines: 1
num_processes: 2
mixed_precision: 'no'
deepspeed_config:
  zero_stage: 3
  zero3_init_flag: false
  zero3_save_16bit_model: true
  offload_optimizer_device: none
  offload_param_device: none
  gradient_accumulation_steps: 1
"""


def _cli_flags(fields: dict) -> list[str]:
    return [item for key, value in fields.items() for item in (f"--{key}", str(value))]


def _training_logs(log_history: list[dict]) -> list[dict]:
    return [entry for entry in log_history if "loss" in entry]


def _launch_finetune(model_path, output, launch_flags: list[str], batch_per_device: int = 2,
                     program=("-m", "hf_moe.cli", "finetune")) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_flags, "--main_process_port", "0",
               *program, str(model_path), "--output_dir", str(output),
               "--per_device_train_batch_size", str(batch_per_device), *_cli_flags(COMMON)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    return _training_logs(state["log_history"])


@pytest.fixture(scope="module")
def ddp_run(tiny_upcycled, tmp_path_factory):
    output = tmp_path_factory.mktemp("ddp") / "run"
    flags = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no"]
    return output, _launch_finetune(tiny_upcycled, output, flags)


def _one_process_logs(model_path, output_dir, **overrides) -> list[dict]:
    fields = {**COMMON, "report_to": "none", **overrides}
    trainer = build_trainer(*finetune_arguments(model_path=str(model_path), output_dir=str(output_dir), **fields))
    trainer.train()
    return _training_logs(trainer.state.log_history)


def test_ddp_finetune_matches_one_process_with_the_same_global_batch(tiny_upcycled, tmp_path, ddp_run):
    output, ddp_logs = ddp_run
    one_logs = _launch_finetune(tiny_upcycled, tmp_path / "one", ["--num_processes", "1", "--num_machines", "1",
                                                                  "--mixed_precision", "no", "--dynamo_backend", "no"],
                                batch_per_device=4)
    assert len(ddp_logs) == len(one_logs) == 3
    for ddp, one in zip(ddp_logs, one_logs, strict=True):
        assert ddp["loss"] == pytest.approx(one["loss"], abs=1e-5)
    # ExpertStatsCallback sums its counts over the processes: the logged load is the global load. The reference: one
    # process, micro-batches of 2 rows (the first step routes with the initial weights whatever the scope; the load
    # and the entropy count real tokens only, and the rows are padded the same way).
    first_step = _one_process_logs(tiny_upcycled, tmp_path / "ga2", per_device_train_batch_size=2,
                                   gradient_accumulation_steps=2, max_steps=1, save_steps=1)[0]
    keys = [key for key in first_step if key.endswith("_fraction") or key.endswith("router_entropy")]
    assert len(keys) > 8
    for key in keys:
        assert ddp_logs[0][key] == pytest.approx(first_step[key], abs=1e-6), key
    # Logged once: only the main process's reporter writes an event file.
    assert len(list((output / "runs").rglob("events.out.tfevents*"))) == 1


def test_fsdp2_from_an_accelerate_config_trains_like_ddp(tiny_upcycled, tmp_path, ddp_run):
    config = tmp_path / "fsdp2.yaml"
    config.write_text(FSDP2_CONFIG)
    output = tmp_path / "fsdp2"
    fsdp_logs = _launch_finetune(tiny_upcycled, output, ["--config_file", str(config)])
    _, ddp_logs = ddp_run
    assert [entry["loss"] for entry in fsdp_logs] == pytest.approx([entry["loss"] for entry in ddp_logs], abs=1e-4)
    # The gathered final model loads and runs.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.router_aux_loss_scope == "global_batch"


def test_deepspeed_zero3_with_leaf_sparse_blocks_trains_like_ddp(tiny_upcycled, tmp_path, ddp_run):
    pytest.importorskip("deepspeed")  # the `deepspeed` extra (in `dev`)
    config = tmp_path / "zero3.yaml"
    config.write_text(ZERO3_CONFIG)
    output = tmp_path / "zero3"
    worker = Path(__file__).with_name("zero3_worker.py")
    zero3_logs = _launch_finetune(tiny_upcycled, output, ["--config_file", str(config)], program=(str(worker),))
    _, ddp_logs = ddp_run
    assert [entry["loss"] for entry in zero3_logs] == pytest.approx([entry["loss"] for entry in ddp_logs], abs=1e-4)
    for rank in (0, 1):
        report = json.loads((output / f"zero3_report-{rank}.json").read_text())
        assert report["leaf_modules"] == ["MoeSparseBlock"]
        shards = report["expert_shards"]
        assert len(shards) == 4  # 2 layers x (gate_up_proj, down_proj)
        for name, (local, full) in shards.items():
            assert local == -(-full // 2), name  # each process holds half of every expert tensor


def test_sparse_block_classes_for_zero3_leaves():
    from transformers import AutoModelForCausalLM, MixtralConfig

    from hf_moe.training.zero3 import sparse_block_classes

    from .conftest import tiny_config

    names = {model_type: [cls.__name__ for cls in sparse_block_classes(
        AutoModelForCausalLM.from_config(tiny_config(model_type)))] for model_type in ("hf_moe", "hf_mh_moe")}
    assert names == {"hf_moe": ["MoeSparseBlock"], "hf_mh_moe": ["MHMoeSparseBlock"]}
    mixtral = AutoModelForCausalLM.from_config(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32,
                                                             num_hidden_layers=1, num_attention_heads=4,
                                                             num_key_value_heads=2, num_local_experts=4))
    assert [cls.__name__ for cls in sparse_block_classes(mixtral)] == ["MixtralSparseMoeBlock"]
