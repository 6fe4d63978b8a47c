"""Time and peak memory of the streaming export against the in-memory route (load the hf_moe model, copy its
weights into the native model, `save_pretrained`), each run in a fresh process, interleaved, medians of repeats."""

import json
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM

from ..export import TARGETS, ExportArguments, run_export
from .benchmark_upcycle import check_workdir, read_through, scratch_folder


@dataclass
class ExportBenchmarkArguments:
    source: str = field(default="out/SmolLM2-135M-Instruct-hf_moe-8x2", metadata={
        "help": "hf_moe folder to export (default: what `hf-moe upcycle` writes)"})
    to: str = field(default="mixtral", metadata={"help": "target architecture"})
    shard_size: str = field(default="2GB", metadata={"help": "output shard size (both approaches)"})
    repeats: int = field(default=3, metadata={"help": "runs per approach (interleaved); medians are reported"})
    workdir: str | None = field(default=None, metadata={
        "help": "scratch folder, created if missing (default: a temporary one)"})

    def __post_init__(self):
        check_workdir(self.workdir)


def export_streaming(source: str, output_dir: str, to: str, shard_size: str) -> None:
    run_export(ExportArguments(source=source, output_dir=output_dir, to=to, max_shard_size=shard_size))


def export_in_memory(source: str, output_dir: str, to: str, shard_size: str) -> None:
    """The reference: the whole hf_moe model in memory, its weights assigned to the native model, `save_pretrained`.
    (transformers 5.x gives both the same fused expert names, so the state dict transfers as is.)"""
    model = AutoModelForCausalLM.from_pretrained(source)
    native = AutoModelForCausalLM.from_config(TARGETS[to].target_config(model.config), dtype=model.dtype)
    native.load_state_dict(model.state_dict(), strict=False, assign=True)
    native.save_pretrained(output_dir, max_shard_size=shard_size)


_PROBE = (
    "import json, resource, sys, time\n"
    "from hf_moe.recipes import benchmark_export as benchmark\n"
    "start = time.perf_counter()\n"
    "getattr(benchmark, sys.argv[1])(*sys.argv[2:])\n"
    "print(json.dumps({'seconds': time.perf_counter() - start,\n"
    "                  'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))\n"
)


def _measure(function: str, source: Path, output: Path, args: ExportBenchmarkArguments) -> dict:
    read_through(source)  # both approaches start with the checkpoint in the page cache
    completed = subprocess.run([sys.executable, "-c", _PROBE, function, str(source), str(output), args.to,
                                args.shard_size], capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{function} failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    shutil.rmtree(output)
    return result


def benchmark_export(args: ExportBenchmarkArguments) -> dict:
    source = Path(args.source)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a model folder; create it with `hf-moe upcycle` first")
    checkpoint_gib = sum(path.stat().st_size for path in source.glob("*.safetensors")) / 2**30
    runs = {"streaming": [], "in_memory": []}
    with scratch_folder(args.workdir) as scratch:
        for repeat in range(args.repeats):
            for approach in runs:
                output = scratch / f"{approach}-{repeat}"
                runs[approach].append(_measure(f"export_{approach}", source, output, args))
    report = {"source": str(source), "to": args.to, "checkpoint_gib": checkpoint_gib, "repeats": args.repeats}
    for approach, results in runs.items():
        report[approach] = {key: statistics.median(result[key] for result in results)
                            for key in ("seconds", "peak_rss_gib")}
        report[approach]["peak_rss_over_checkpoint"] = report[approach]["peak_rss_gib"] / checkpoint_gib
    report["time_ratio_in_memory_over_streaming"] = report["in_memory"]["seconds"] / report["streaming"]["seconds"]
    report["memory_ratio_in_memory_over_streaming"] = (report["in_memory"]["peak_rss_gib"]
                                                       / report["streaming"]["peak_rss_gib"])
    return report

