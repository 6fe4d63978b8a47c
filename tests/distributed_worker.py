"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (CPU, gloo); not collected by pytest.

`python distributed_worker.py WORKDIR` reads the tiny models and the one-process references the test wrote to WORKDIR
and writes `result_rank<r>.json` with the largest differences it found and the local shapes of the expert tensors:

- `DistributedConfig` tensor parallel (tp_size=2) and expert parallel + FSDP (ep_size=2, fsdp_size=2) for each
  architecture: logits and gradients of the same batch against one process.
- Global-batch load balancing over data-parallel processes in a plain loop: rank r takes rows 4r..4r+3 of the
  8-row batch; the aux loss and the gradients (summed over ranks, as DDP does) against one process with all 8 rows.
- Auxiliary-loss-free balancing (tests/test_balancing.py): 3 SGD steps, each of 8 rows split over 2 ranks x 2
  micro-batches of 2; the selection biases against one process with 8 rows per step, and the all-reduce calls made
  by the forwards and by `SelectionBiasBalancer.step`.
"""

import datetime
import faulthandler
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import hf_moe  # noqa: F401  (registers the Auto classes)
from hf_moe.training.optimizer_step import begin_optimizer_step

PARALLEL_MODES = {"tp": dict(tp_size=2), "ep_fsdp": dict(ep_size=2, fsdp_size=2)}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank, whether it is a plain tensor or a sharded DTensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _local_shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.to_local().shape if hasattr(tensor, "to_local") else tensor.shape)


def check_parallel_plan(folder: Path, mode: str) -> dict:
    reference = load_file(str(folder / "reference.safetensors"))
    batch = load_file(str(folder / "batch.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(**PARALLEL_MODES[mode]),
                                                 dtype=torch.float32)
    model.eval()  # no jitter noise or dropout: the same function as the reference
    out = model(**batch)
    out.loss.backward()
    result = {"logits": (_full(out.logits) - reference["logits"]).abs().max().item(), "grads": 0.0}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            difference = (_full(parameter.grad) - reference[f"grad.{name}"]).abs().max().item()
            result["grads"] = max(result["grads"], difference)
    experts = model.model.layers[model.config.sparse_layer_indices[0]].mlp.experts
    result["gate_up_proj_local_shape"] = _local_shape(experts.gate_up_proj)
    result["down_proj_local_shape"] = _local_shape(experts.down_proj)
    return result


def check_global_batch_balancing(folder: Path) -> dict:
    reference = load_file(str(folder / "reference.safetensors"))
    batch = load_file(str(folder / "batch.safetensors"))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    rows = slice(rank * 4, rank * 4 + 4)
    local = {key: value[rows] for key, value in batch.items()}
    # What OptimizerStepCallback and the Trainer do: the step's token counts over all processes.
    begin_optimizer_step(model, num_router_tokens=batch["attention_mask"].sum().item())
    num_items = batch["labels"][:, 1:].ne(-100).sum()
    out = model(**local, num_items_in_batch=num_items)
    (out.loss * world).backward()  # the Trainer scales by the world size; DDP then averages the gradients
    weighted_aux = out.aux_loss.detach() * local["attention_mask"].sum() / batch["attention_mask"].sum()
    dist.all_reduce(weighted_aux)
    result = {"aux_loss": (weighted_aux - reference["aux_loss"]).abs().item(), "grads": 0.0}
    for name, parameter in model.named_parameters():
        grad = parameter.grad.clone()
        dist.all_reduce(grad)
        difference = (grad / world - reference[f"grad.{name}"]).abs().max().item()
        result["grads"] = max(result["grads"], difference)
    return result


def check_selection_bias(folder: Path) -> dict:
    from hf_moe.moe_layers import find_moe_layers, selection_bias
    from hf_moe.training import SelectionBiasBalancer

    reference = load_file(str(folder / "reference.safetensors"))
    batch = load_file(str(folder / "batch.safetensors"))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    balancer = SelectionBiasBalancer(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = {"count": 0}
    all_reduce = dist.all_reduce

    def counted_all_reduce(*args, **kwargs):
        calls["count"] += 1
        return all_reduce(*args, **kwargs)

    in_forwards, per_step = 0, []
    for step in range(3):
        rows_of_step = {key: value[8 * step:8 * step + 8] for key, value in batch.items()}
        num_items = rows_of_step["labels"][:, 1:].ne(-100).sum()  # the step's label tokens on all ranks
        dist.all_reduce = counted_all_reduce
        for micro in range(2):  # this rank's 4 rows as 2 micro-batches of 2
            rows = slice(4 * rank + 2 * micro, 4 * rank + 2 * micro + 2)
            out = model(**{key: value[rows] for key, value in rows_of_step.items()}, num_items_in_batch=num_items)
            (out.loss * world).backward()
        in_forwards += calls["count"]
        dist.all_reduce = all_reduce
        for parameter in model.parameters():  # what DDP does: average the gradients
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad /= world
        optimizer.step()
        optimizer.zero_grad()
        calls["count"] = 0
        dist.all_reduce = counted_all_reduce
        balancer.step()
        dist.all_reduce = all_reduce
        per_step.append(calls["count"])
        calls["count"] = 0
    biases = [selection_bias(model, layer).reshape(-1) for layer in find_moe_layers(model)]
    difference = max((b - reference[f"bias.{i}"]).abs().max().item() for i, b in enumerate(biases))
    return {"bias": difference, "moved": max(b.abs().max().item() for b in biases),
            "all_reduce_in_forwards": in_forwards, "all_reduce_per_step": per_step}


def main(workdir: Path) -> None:
    faulthandler.dump_traceback_later(240, exit=True)  # a stuck collective fails the test with the stacks
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    results = {}
    for folder in sorted(path for path in workdir.iterdir() if path.is_dir()):
        kind, _, model_type = folder.name.partition("-")
        print(f"rank {dist.get_rank()}: {folder.name}", flush=True)
        if kind in PARALLEL_MODES:
            results[folder.name] = check_parallel_plan(folder, kind)
        elif kind == "global_batch":
            results[folder.name] = check_global_batch_balancing(folder)
        elif kind == "selection_bias":
            results[folder.name] = check_selection_bias(folder)
    (workdir / f"result_rank{dist.get_rank()}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    faulthandler.cancel_dump_traceback_later()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
