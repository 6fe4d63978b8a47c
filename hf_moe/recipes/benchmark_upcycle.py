"""Time and peak memory of streaming upcycling against loading the dense model with transformers and expanding it
in memory, on a synthetic dense Llama checkpoint (~1.1B parameters by default, TinyLlama's shape)."""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from ..checkpoints.names import meta_model
from ..checkpoints.safetensors_writer import ShardedSafetensorsWriter, parse_size
from ..checkpoints.writing import check_complete
from ..upcycling.arguments import UpcycleArguments, prepare
from ..upcycling.upcycle import run_upcycle, upcycled_tensors


@dataclass
class UpcycleBenchmarkArguments:
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 22
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    vocab_size: int = 32000
    num_experts: int = 8
    shard_size: str = field(default="2GB", metadata={"help": "input and output shard size"})
    workdir: str | None = field(default=None, metadata={
        "help": "scratch folder, created if missing (default: a temporary one)"})

    def __post_init__(self):
        check_workdir(self.workdir)


def check_workdir(workdir: str | None) -> None:
    """At parsing: a `workdir` that exists must be a folder (a missing one is created by `scratch_folder`)."""
    if workdir is not None and Path(workdir).exists() and not Path(workdir).is_dir():
        raise NotADirectoryError(f"`workdir`={workdir!r}: not a folder; give a folder for the scratch files (created "
                                 "if missing), or leave it out for a temporary one")


@contextmanager
def scratch_folder(workdir: str | None) -> Iterator[Path]:
    """A temporary folder inside `workdir` (created with its parents if missing, as a work folder is expected to be;
    None: the system's temporary folder), removed with its contents afterwards; `workdir` itself stays."""
    if workdir is not None:
        check_workdir(workdir)
        Path(workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        yield Path(scratch)


def write_synthetic_dense(folder: Path, args: UpcycleBenchmarkArguments) -> int:
    """A random bfloat16 Llama checkpoint written shard by shard; returns its parameter count."""
    config = LlamaConfig(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
                         num_key_value_heads=args.num_key_value_heads, vocab_size=args.vocab_size, dtype="bfloat16")
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    shapes = {name: tensor.shape for name, tensor in meta_model(config).state_dict().items()}
    writer = ShardedSafetensorsWriter(folder, parse_size(args.shard_size))
    for name, shape in shapes.items():
        writer.add(name, (torch.randn(shape) * 0.02).to(torch.bfloat16))
    writer.finish()
    return sum(shape.numel() for shape in shapes.values())


def upcycle_streaming(source: str, output_dir: str, num_experts: int, shard_size: str) -> None:
    run_upcycle(UpcycleArguments(source=source, output_dir=output_dir, num_experts=num_experts,
                                 max_shard_size=shard_size))


def upcycle_in_memory(source: str, output_dir: str, num_experts: int, shard_size: str) -> None:
    """The reference: the whole dense model through transformers, the whole expanded model in memory, then
    `save_pretrained`."""
    args = UpcycleArguments(source=source, output_dir=output_dir, num_experts=num_experts)
    _, config, _ = prepare(args)
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    state = dict(upcycled_tensors(dense.state_dict().items(), config, args))
    model = meta_model(config)
    check_complete(set(state), model, source)
    model.load_state_dict(state, assign=True)
    model.save_pretrained(output_dir, max_shard_size=shard_size)


_PROBE = (
    "import json, resource, sys, time\n"
    "from hf_moe.recipes import benchmark_upcycle as benchmark\n"
    "start = time.perf_counter()\n"
    "getattr(benchmark, sys.argv[1])(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])\n"
    "print(json.dumps({'seconds': time.perf_counter() - start,\n"
    "                  'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))\n"
)


def read_through(folder: Path) -> None:
    """Read every file once so both approaches start with the dense checkpoint in the page cache."""
    for path in folder.iterdir():
        with path.open("rb") as handle:
            while handle.read(1 << 26):
                pass


def _measure(function: str, source: Path, output: Path, args: UpcycleBenchmarkArguments) -> dict:
    read_through(source)
    completed = subprocess.run([sys.executable, "-c", _PROBE, function, str(source), str(output),
                                str(args.num_experts), args.shard_size], capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{function} failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["output_gib"] = sum(p.stat().st_size for p in output.glob("*.safetensors")) / 2**30
    return result


def benchmark_upcycling(args: UpcycleBenchmarkArguments) -> dict:
    """Both approaches, each in a fresh process (peak RSS is the process's maximum resident set)."""
    with scratch_folder(args.workdir) as scratch:
        start = time.perf_counter()
        parameters = write_synthetic_dense(scratch / "dense", args)
        report = {"dense_parameters_billion": parameters / 1e9, "synthetic_write_seconds": time.perf_counter() - start,
                  "dense_gib": sum(p.stat().st_size for p in (scratch / "dense").glob("*.safetensors")) / 2**30}
        report["streaming"] = _measure("upcycle_streaming", scratch / "dense", scratch / "streamed", args)
        shutil.rmtree(scratch / "streamed")
        report["in_memory"] = _measure("upcycle_in_memory", scratch / "dense", scratch / "in_memory", args)
        shutil.rmtree(scratch / "in_memory")
    report["memory_ratio_in_memory_over_streaming"] = (report["in_memory"]["peak_rss_gib"]
                                                       / report["streaming"]["peak_rss_gib"])
    report["time_ratio_in_memory_over_streaming"] = report["in_memory"]["seconds"] / report["streaming"]["seconds"]
    return report
