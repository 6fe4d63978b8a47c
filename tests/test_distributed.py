"""Two CPU processes (gloo) against one: transformers' `DistributedConfig` tensor / expert + FSDP parallelism for the
three architectures, and global-batch load balancing over data-parallel processes. One `torchrun` launch runs every
case (tests/distributed_worker.py); the assertions read what each rank wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from hf_moe.training.optimizer_step import begin_optimizer_step, end_optimizer_steps

from .conftest import MODEL_TYPES, tiny_config

WORKER = Path(__file__).with_name("distributed_worker.py")


def varied_batch(rows: int = 8, width: int = 12, vocab: int = 97) -> dict[str, torch.Tensor]:
    """`rows` right-padded rows of different lengths (padding masked out of attention and labels)."""
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(5, vocab, (rows, width), generator=generator)
    lengths = torch.tensor([width - (3 * row) % (width - 3) for row in range(rows)])
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    input_ids = input_ids * attention_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100)}


def _save_case(folder: Path, model, batch: dict, reference: dict) -> None:
    model.save_pretrained(folder)
    save_file(batch, str(folder / "batch.safetensors"))
    grads = {f"grad.{name}": p.grad.contiguous() for name, p in model.named_parameters() if p.grad is not None}
    save_file({**reference, **grads}, str(folder / "reference.safetensors"))


def _parallel_plan_case(folder: Path, model_type: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    batch = varied_batch(rows=2)
    out = model(**batch)
    out.loss.backward()
    _save_case(folder, model, batch, {"logits": out.logits.detach().contiguous()})


def _global_batch_case(folder: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("hf_moe", router_aux_loss_scope="global_batch",
                                                         router_aux_loss_coef=1.0)).train()
    batch = varied_batch(rows=8)
    begin_optimizer_step(model, num_router_tokens=batch["attention_mask"].sum().item())
    out = model(**batch, num_items_in_batch=batch["labels"][:, 1:].ne(-100).sum())
    out.loss.backward()
    end_optimizer_steps(model)
    _save_case(folder, model, batch, {"aux_loss": out.aux_loss.detach()})


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    workdir = tmp_path_factory.mktemp("distributed")
    for model_type in MODEL_TYPES:
        for mode in ("tp", "ep_fsdp"):
            _parallel_plan_case(workdir / f"{mode}-{model_type}", model_type)
    _global_batch_case(workdir / "global_batch-hf_moe")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(workdir)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return [json.loads((workdir / f"result_rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("mode", ["tp", "ep_fsdp"])
def test_parallel_plans_match_one_process(two_process_results, mode, model_type):
    config = tiny_config(model_type)
    experts, hidden = config.num_experts, config.hidden_size // config.num_subtokens
    inner = config.moe_intermediate_size
    for rank, results in enumerate(two_process_results):
        result = results[f"{mode}-{model_type}"]
        assert result["logits"] < 1e-5, (rank, result)
        assert result["grads"] < 1e-5, (rank, result)
        if mode == "tp":  # experts split along their inner dimension
            assert result["gate_up_proj_local_shape"] == [experts, inner, hidden]
            assert result["down_proj_local_shape"] == [experts, hidden, inner // 2]
        else:  # each rank owns half of the experts
            assert result["gate_up_proj_local_shape"] == [experts // 2, 2 * inner, hidden]
            assert result["down_proj_local_shape"] == [experts // 2, hidden, inner]


def test_global_batch_balancing_over_processes_equals_one_process(two_process_results):
    for results in two_process_results:
        result = results["global_batch-hf_moe"]
        assert result["aux_loss"] < 1e-6, result
        assert result["grads"] < 1e-6, result
