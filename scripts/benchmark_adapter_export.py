"""What `hf_moe.adapters.export_adapter` costs and whether its outputs hold, on an existing base model and peft LoRA
adapter (LoRA on the routed experts, and on attention): `python scripts/benchmark_adapter_export.py --model_dir
out/smol-moe-4x2 --adapter_dir runs/smol-moe-4x2-lora --output_dir out/adapter-export-benchmark`.

Per layout (per-expert, fused, merged):

1. Export time: `export_adapter(adapter_dir, output_dir/<layout>, layout, base=model_dir)` timed `--repeats` times
   (wall clock, in this process; the output folder is removed between repeats, outside the timing; the first repeat
   pays for cold imports and page cache, hence the median); the last output is kept.
2. Size on disk: the bytes of every file in the output folder, the bytes of its safetensors files and their tensor
   count (next to those of the adapter itself).
3. Per-expert: what `hf-moe adapter check OUT --engine vllm --base MODEL` prints and its exit status, for the export
   and for the adapter as trained (peft's fused layout, which vLLM's default MoE LoRA loader rejects). The command
   line's own `hf_moe.cli.main` runs in this process, its standard output captured.
4. Fused: whether the export's tensors are bit-identical to the adapter's (a peft adapter already is fused).
5. Merged: the merged model against the adapted model (`PeftModel.from_pretrained(base, adapter_dir)`), both float32
   and in eval mode: greedy answers (`--max_new_tokens`, chat template, one left-padded batch) to `--prompts`,
   counted identical per prompt; and the max |delta logit| of one forward over that batch's final sequences (the
   prompts and the adapted model's answers, real tokens only). The base model alone (the adapter disabled) is
   measured the same way, to show that the adapter changes the answers at all.

Writes `output_dir/results.json` and `output_dir/results.md` (tables, also printed). Commands and results:
docs/adapters.md.
"""

import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

import hf_moe  # registers the Auto classes
from hf_moe.adapters import LAYOUTS, export_adapter

PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Explain in one sentence why the sky is blue.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Write the word 'tiger' in uppercase.",
    "Is 17 even or odd?",
    "How many legs does a spider have?",
)


@dataclass
class AdapterExportBenchmarkArguments:
    model_dir: str = field(metadata={"help": "the base model folder the adapter was trained on"})
    adapter_dir: str = field(metadata={"help": "the peft LoRA adapter folder (LoRA on the experts)"})
    output_dir: str = field(default="out/adapter-export-benchmark", metadata={
        "help": "where the exports (<layout>/), results.json and results.md go"})
    prompts: str | None = field(default=None, metadata={
        "help": "a .json list of prompt strings, or a text file with one prompt a line; empty = 8 built-in chat "
                "prompts"})
    repeats: int = field(default=3, metadata={"help": "timed exports per layout (the median is reported)"})
    layouts: str = field(default="per-expert,fused,merged", metadata={"help": "comma-separated layouts to export"})
    max_new_tokens: int = field(default=24, metadata={"help": "greedy tokens per prompt (merged vs adapted)"})
    engine: str = field(default="vllm", metadata={"help": "the engine `hf-moe adapter check` checks for"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing exports in output_dir"})

    def __post_init__(self):
        unknown = set(self.layout_names) - set(LAYOUTS)
        if unknown or not self.layout_names:
            raise ValueError(f"`layouts`={self.layouts!r} is invalid: comma-separated {LAYOUTS}")
        if min(self.repeats, self.max_new_tokens) < 1:
            raise ValueError("`repeats` and `max_new_tokens` must be positive")

    @property
    def layout_names(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.layouts.split(",") if part.strip())


_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def read_prompts(path: str | None) -> list[str]:
    if not path:
        return list(PROMPTS)
    text = Path(path).read_text(encoding="utf-8")
    prompts = json.loads(text) if path.endswith(".json") else [line for line in text.splitlines() if line.strip()]
    if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(f"`prompts`={path!r}: expected a JSON list of strings or one prompt a line")
    return prompts


# ---------------------------------------------------------------------------------------------------------- sizes
def folder_size(folder: Path) -> dict:
    """Bytes of every file under `folder`, and the tensors and bytes of its safetensors files."""
    files = [path for path in folder.rglob("*") if path.is_file()]
    tensors = weight_bytes = 0
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                tensors += len(list(handle.keys()))
            weight_bytes += path.stat().st_size
    return {"files": len(files), "bytes": sum(path.stat().st_size for path in files), "tensors": tensors,
            "safetensors_bytes": weight_bytes}


def adapter_size(adapter: Path) -> dict:
    """The adapter's own files (a training output folder also holds tokenizer files, training_args.bin, ...)."""
    weights = adapter / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        tensors = len(list(handle.keys()))
    own = [weights, adapter / "adapter_config.json"]
    return {"files": len(own), "bytes": sum(path.stat().st_size for path in own), "tensors": tensors,
            "safetensors_bytes": weights.stat().st_size}


def same_tensors(first: Path, second: Path) -> dict:
    """How many tensors of two safetensors files have the same name and are bit-identical."""
    with safe_open(str(first), framework="pt") as a, safe_open(str(second), framework="pt") as b:
        names_a, names_b = set(a.keys()), set(b.keys())
        identical = sum(torch.equal(a.get_tensor(name), b.get_tensor(name)) for name in names_a & names_b)
    return {"tensors": len(names_a), "exported_tensors": len(names_b), "same_names": len(names_a & names_b),
            "bit_identical": identical}


# ---------------------------------------------------------------------------------------------------------- steps
def time_exports(args: AdapterExportBenchmarkArguments, layout: str, output: Path) -> dict:
    seconds, exported = [], None
    for repeat in range(args.repeats):
        if output.exists():
            if repeat == 0 and not args.overwrite:
                raise FileExistsError(f"{output} exists: pass --overwrite to replace it")
            shutil.rmtree(output)
        start = time.perf_counter()
        exported = export_adapter(args.adapter_dir, output, layout, base=args.model_dir)
        seconds.append(time.perf_counter() - start)
        log(f"{layout} export {repeat + 1}/{args.repeats}: {seconds[-1]:.2f} s")
    return {"seconds": seconds, "median_s": statistics.median(seconds), "ranks": exported.ranks,
            "size": folder_size(output)}


def adapter_check(adapter: Path, base: str, engine: str) -> dict:
    """`hf-moe adapter check ADAPTER --engine ENGINE --base BASE`: its standard output and exit status."""
    from hf_moe.cli import main

    stdout = io.StringIO()
    status = 0
    with contextlib.redirect_stdout(stdout):
        try:
            main(["adapter", "check", str(adapter), "--engine", engine, "--base", str(base)])
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
    return {"command": f"hf-moe adapter check {adapter} --engine {engine} --base {base}", "exit_status": status,
            "output": stdout.getvalue().rstrip("\n")}


def chat_batch(tokenizer, prompts: list[str]):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False) for prompt in prompts]
    return tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)


@torch.no_grad()
def greedy(model, batch, max_new_tokens: int, pad_token_id: int) -> torch.Tensor:
    sequences = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id,
                               temperature=None, top_p=None, top_k=None)
    return sequences[:, batch["input_ids"].shape[1]:]


@torch.no_grad()
def logits_on(model, sequences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=sequences, attention_mask=mask).logits


def compare_answers(reference: torch.Tensor, other: torch.Tensor, tokenizer) -> dict:
    identical = [torch.equal(a, b) for a, b in zip(reference, other, strict=True)]
    first_difference = []
    for a, b in zip(reference, other, strict=True):
        differing = (a != b).nonzero()
        first_difference.append(None if differing.numel() == 0 else int(differing[0]))
    return {"identical": sum(identical), "prompts": len(identical), "first_differing_token": first_difference,
            "answers": tokenizer.batch_decode(other, skip_special_tokens=True)}


def merged_vs_adapted(args: AdapterExportBenchmarkArguments, merged_dir: Path, prompts: list[str]) -> dict:
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = chat_batch(tokenizer, prompts)
    base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(base, args.adapter_dir).eval()
    log("adapted model: generating")
    adapted_answers = greedy(adapted, batch, args.max_new_tokens, pad)
    # The batch every model is scored on: the prompts and the adapted model's answers (tokens after an EOS masked).
    sequences = torch.cat([batch["input_ids"], adapted_answers], dim=1)
    eos = tokenizer.eos_token_id
    after_eos = (adapted_answers == eos).int().cumsum(dim=1) - (adapted_answers == eos).int() > 0
    mask = torch.cat([batch["attention_mask"], (~after_eos).long()], dim=1)
    adapted_logits = logits_on(adapted, sequences, mask)
    with adapted.disable_adapter():
        log("base model (adapter disabled): generating")
        base_answers = greedy(adapted, batch, args.max_new_tokens, pad)
        base_logits = logits_on(adapted, sequences, mask)
    del adapted, base
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    log("merged model: generating")
    merged_answers = greedy(merged, batch, args.max_new_tokens, pad)
    merged_logits = logits_on(merged, sequences, mask)
    real = mask.bool()

    def delta(logits: torch.Tensor) -> float:
        return float((logits - adapted_logits).abs()[real].max())

    return {"prompts": prompts, "max_new_tokens": args.max_new_tokens,
            "batch_shape": list(sequences.shape), "scored_positions": int(real.sum()),
            "adapted_answers": tokenizer.batch_decode(adapted_answers, skip_special_tokens=True),
            "merged": {**compare_answers(adapted_answers, merged_answers, tokenizer),
                       "max_abs_logit_diff": delta(merged_logits)},
            "base": {**compare_answers(adapted_answers, base_answers, tokenizer),
                     "max_abs_logit_diff": delta(base_logits)},
            "adapted_logit_abs_max": float(adapted_logits.abs()[real].max())}


# ---------------------------------------------------------------------------------------------------------- report
def environment() -> dict:
    import peft
    import safetensors

    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "safetensors": safetensors.__version__, "hf_moe": hf_moe.__version__}


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"


def markdown(results: dict) -> str:
    lines = [f"| layout | export time, median of {results['repeats']} (s) | each (s) | files | on disk, all files | "
             "safetensors | tensors | ranks |", "|---|---|---|---|---|---|---|---|"]
    source = results["adapter"]
    lines.append(f"| adapter as trained (peft, fused; its 2 own files) | - | - | {source['files']} | "
                 f"{_mib(source['bytes'])} ({source['bytes']} B) | {_mib(source['safetensors_bytes'])} "
                 f"({source['safetensors_bytes']} B) | {source['tensors']} | - |")
    for layout, measured in results["layouts"].items():
        size = measured["size"]
        each = ", ".join(f"{value:.2f}" for value in measured["seconds"])
        ranks = ", ".join(f"{name} {rank}" for name, rank in measured["ranks"].items())
        lines.append(f"| {layout} | {measured['median_s']:.2f} | {each} | {size['files']} | {_mib(size['bytes'])} "
                     f"({size['bytes']} B) | {_mib(size['safetensors_bytes'])} ({size['safetensors_bytes']} B) | "
                     f"{size['tensors']} | {ranks} |")
    if "fused_vs_adapter" in results:
        same = results["fused_vs_adapter"]
        lines += ["", f"Fused export vs the adapter's own tensors: {same['bit_identical']} of {same['tensors']} "
                      f"bit-identical ({same['same_names']} names in common, {same['exported_tensors']} exported)."]
    if "merged_vs_adapted" in results:
        comparison = results["merged_vs_adapted"]
        lines += ["", f"Greedy answers ({comparison['max_new_tokens']} new tokens, {len(comparison['prompts'])} "
                      f"chat prompts) and logits on one batch {comparison['batch_shape']} "
                      f"({comparison['scored_positions']} real positions; adapted model's max |logit| "
                      f"{comparison['adapted_logit_abs_max']:.2f}), against the adapted model "
                      "(PeftModel on the base):", "",
                  "| model | identical answers | max abs delta logit |", "|---|---|---|"]
        for name, label in (("merged", "merged export"), ("base", "base, adapter disabled")):
            row = comparison[name]
            lines.append(f"| {label} | {row['identical']} / {row['prompts']} | {row['max_abs_logit_diff']:.3g} |")
    for key, label in (("check_adapter", "the adapter as trained"), ("check_per_expert", "the per-expert export")):
        if key in results:
            check = results[key]
            lines += ["", f"`{check['command']}` ({label}): exit status {check['exit_status']}", "", "```text",
                      check["output"], "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(AdapterExportBenchmarkArguments).parse_args_into_dataclasses(args=argv)
    prompts = read_prompts(args.prompts)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {"model_dir": args.model_dir, "adapter_dir": args.adapter_dir, "repeats": args.repeats,
               "environment": environment(), "adapter": adapter_size(Path(args.adapter_dir)), "layouts": {}}
    for layout in args.layout_names:
        results["layouts"][layout] = time_exports(args, layout, output_dir / layout)
    if "fused" in args.layout_names:
        results["fused_vs_adapter"] = same_tensors(Path(args.adapter_dir) / "adapter_model.safetensors",
                                                   output_dir / "fused" / "adapter_model.safetensors")
    if "per-expert" in args.layout_names:
        log("adapter check")
        results["check_adapter"] = adapter_check(Path(args.adapter_dir), args.model_dir, args.engine)
        results["check_per_expert"] = adapter_check(output_dir / "per-expert", args.model_dir, args.engine)
    if "merged" in args.layout_names:
        results["merged_vs_adapted"] = merged_vs_adapted(args, output_dir / "merged", prompts)
    results["markdown"] = markdown(results)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (output_dir / "results.md").write_text(results["markdown"] + "\n", encoding="utf-8")
    print(results["markdown"])
    log(f"results written to {output_dir / 'results.json'} and {output_dir / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
