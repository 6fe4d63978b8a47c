"""Pruning against merging, measured: a fine-tuned MoE pruned (REAP, routing frequency) and merged (HC-SMoE) to
several expert budgets; for each, held-out loss and exact match on the embedded task mixture relative to the
unpruned model, weights on disk and greedy decoding speed. One calibration pass serves every variant."""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..checkpoints.compare import SAMPLE_PROMPTS, chat_prompt_ids, pad_token_id
from ..data import build_mixture
from ..pruning import keep_count, measure_saliency, open_source, prune
from ..pruning.calibration import calibration_inputs
from .evaluate import evaluate_model

VARIANTS = ("reap", "frequency", "ean", "merge")


@dataclass
class PruningBenchmarkArguments:
    model_path: str = field(default="runs/smol-drop-ft", metadata={
        "help": "a fine-tuned MoE folder with its tokenizer (docs/pruning.md: how the measured one was made)"})
    output_dir: str = field(default="runs/benchmark-pruning", metadata={
        "help": "the pruned folders and benchmark.json go here (replaced)"})
    keep: str = field(default="0.75,0.5", metadata={"help": "comma-separated budgets (counts or ratios)"})
    variants: str = field(default="reap,frequency,merge", metadata={
        "help": "comma-separated: reap | frequency | ean (pruning by that saliency) | merge (HC-SMoE, REAP "
                "representatives)"})
    calibration: str | None = field(default=None, metadata={"help": "default: the embedded task mixture (train)"})
    calibration_samples: int = 64
    max_length: int = 256
    eval_per_family: int = field(default=5, metadata={"help": "evaluation examples per task family"})
    train_per_family: int = field(default=200, metadata={
        "help": "as in finetune: the validation prompts are drawn disjoint from that many training prompts"})
    decode_tokens: int = field(default=32, metadata={"help": "greedy tokens per decoding-speed run"})
    repeats: int = field(default=3, metadata={"help": "decoding-speed runs per model; the fastest counts"})
    seed: int = 0

    def __post_init__(self):
        unknown = [variant for variant in self.variants.split(",") if variant not in VARIANTS]
        if unknown:
            raise ValueError(f"`variants` has {unknown}: choose from {VARIANTS}")


@torch.no_grad()
def decode_tokens_per_second(model, tokenizer, new_tokens: int, repeats: int) -> float:
    """Greedy decoding speed on one chat prompt: `new_tokens` tokens (forced), best of `repeats` runs."""
    ids = chat_prompt_ids(tokenizer, SAMPLE_PROMPTS[1])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=pad_token_id(tokenizer))
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


def _weights_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def _measure(name: str, experts: int, folder: Path, tokenizer, splits: dict, args) -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    report = evaluate_model(model, tokenizer, splits)
    return {"variant": name, "experts": experts, "weights_mb": _weights_bytes(folder) / 1e6,
            **{f"{split}_{metric}": report[split][metric] for split in splits for metric in ("loss", "exact_match")},
            "decode_tokens_per_s": decode_tokens_per_second(model, tokenizer, args.decode_tokens, args.repeats)}


def benchmark_pruning(args: PruningBenchmarkArguments) -> dict:
    """Rows for the unpruned model and every (budget, variant); losses and exact match also relative to it."""
    source = open_source(args.model_path)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    mixture = build_mixture(args.train_per_family, args.eval_per_family, seed=args.seed)
    splits = {"validation": mixture["validation"], "heldout": mixture["heldout"]}
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32).eval()
    inputs, description = calibration_inputs(tokenizer, args.calibration, args.calibration_samples, args.max_length,
                                             seed=args.seed)
    started = time.perf_counter()
    saliency = measure_saliency(model, inputs, with_outputs="merge" in args.variants, source=description)
    calibration_seconds = time.perf_counter() - started
    del model
    output_dir = Path(args.output_dir)
    rows = [_measure("unpruned", source.num_experts, source.folder, tokenizer, splits, args)]
    for keep in args.keep.split(","):
        count = keep_count(keep, source.num_experts)
        for variant in args.variants.split(","):
            merge = variant == "merge"
            method = "reap" if merge else variant
            folder = prune(source.folder, output_dir / f"{variant}-{count}", keep=count, method=method, merge=merge,
                           saliency=saliency, overwrite=True)
            rows.append(_measure(f"{'HC-SMoE merge' if merge else method} {count}/{source.num_experts}", count,
                                 folder, tokenizer, splits, args))
    reference = rows[0]
    for row in rows:
        row["weights_relative"] = row["weights_mb"] / reference["weights_mb"]
        for split in splits:
            row[f"{split}_loss_delta"] = row[f"{split}_loss"] - reference[f"{split}_loss"]
            row[f"{split}_exact_match_relative"] = (row[f"{split}_exact_match"] / reference[f"{split}_exact_match"]
                                                    if reference[f"{split}_exact_match"] else None)
    result = {"model": args.model_path, "calibration": description, "calibration_sequences": len(inputs),
              "calibration_seconds": calibration_seconds, "eval_per_family": args.eval_per_family,
              "sparse_layers": source.layers, "rows": rows}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "benchmark.json").write_text(json.dumps(result, indent=1))
    return result


def format_table(result: dict) -> str:
    from ..cli_output import table

    columns = {"variant": "variant", "weights_mb": "weights MB", "validation_loss": "val loss",
               "validation_loss_delta": "Δ val loss", "heldout_loss": "held-out loss",
               "heldout_loss_delta": "Δ held-out loss", "validation_exact_match": "val EM",
               "heldout_exact_match": "held-out EM", "decode_tokens_per_s": "decode tok/s"}
    return table(result["rows"], columns)
