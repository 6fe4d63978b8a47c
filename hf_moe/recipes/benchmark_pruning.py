"""Pruning against merging, measured: a fine-tuned MoE pruned (REAP, routing frequency, EAN) and merged (HC-SMoE) to
several expert budgets; for each, held-out loss and exact match on the embedded task mixture relative to the
unpruned model, weights on disk and greedy decoding speed. One calibration pass serves every variant."""

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..checkpoints.compare import SAMPLE_PROMPTS, chat_prompt_ids, pad_token_id
from ..data import build_mixture
from ..pruning import measure_saliency, prune
from ..pruning.calibration import calibration_inputs
from ..pruning.merge import cosine_distances
from ..pruning.plan import keep_count
from ..pruning.prune import open_source
from .evaluate import evaluate_model

VARIANTS = ("reap", "frequency", "ean_sum", "ean_mean", "merge")


@dataclass
class PruningBenchmarkArguments:
    model_path: str = field(default="runs/smol-drop-ft", metadata={
        "help": "a fine-tuned MoE folder with its tokenizer (docs/pruning.md: how the measured one was made)"})
    output_dir: str = field(default="runs/benchmark-pruning", metadata={
        "help": "the pruned folders and benchmark.json go here (replaced)"})
    keep: str = field(default="0.75,0.5", metadata={"help": "comma-separated budgets (counts or ratios)"})
    variants: str = field(default="reap,frequency,merge", metadata={
        "help": "comma-separated: reap | frequency | ean_sum | ean_mean (pruning by that saliency) | merge "
                "(HC-SMoE)"})
    calibration: str | None = field(default=None, metadata={"help": "default: the embedded task mixture (train)"})
    calibration_samples: int = 64
    max_length: int = 256
    eval_per_family: int = field(default=5, metadata={"help": "evaluation examples per task family"})
    train_per_family: int = field(default=200, metadata={
        "help": "as in finetune: the validation prompts are drawn disjoint from that many training prompts"})
    decode_tokens: int = field(default=32, metadata={"help": "greedy tokens per decoding-speed run"})
    repeats: int = field(default=3, metadata={
        "help": "decoding-speed rounds, every model once per round (interleaved); the median counts"})
    seed: int = 0

    def __post_init__(self):
        unknown = [variant for variant in self.variants.split(",") if variant not in VARIANTS]
        if unknown:
            raise ValueError(f"`variants` has {unknown}: choose from {VARIANTS}")


@torch.no_grad()
def decode_seconds(folder: Path, tokenizer, new_tokens: int) -> float:
    """Seconds to greedily decode `new_tokens` tokens (forced) on one chat prompt, batch 1, float32 (one warm-up)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = chat_prompt_ids(tokenizer, SAMPLE_PROMPTS[1])
    options = dict(do_sample=False, pad_token_id=pad_token_id(tokenizer))
    model.generate(ids, max_new_tokens=2, **options)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
    return time.perf_counter() - start


def expert_diversity(saliency) -> list[dict]:
    """How different the experts of each sparse layer are on the calibration data: the busiest expert's share of the
    routed assignments over the mean share, and (with mean outputs) the mean pairwise cosine similarity of the
    experts' mean outputs (1: the same direction)."""
    rows = []
    for row, layer in enumerate(saliency.layers):
        share = saliency.frequency[row] / saliency.frequency[row].sum()
        entry = {"layer": layer, "load_max_over_mean": float(share.max() / share.mean())}
        if saliency.output_sum is not None:
            similarity = 1 - cosine_distances(saliency.mean_outputs()[row])
            count = similarity.shape[0]
            off_diagonal = similarity.sum() - similarity.diagonal().sum()
            entry["mean_output_cosine"] = float(off_diagonal / (count * (count - 1)))
        rows.append(entry)
    return rows


def _weights_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def _measure(name: str, experts: int, folder: Path, tokenizer, splits: dict) -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    report = evaluate_model(model, tokenizer, splits)
    return {"variant": name, "experts": experts, "weights_mb": _weights_bytes(folder) / 1e6,
            **{f"{split}_{metric}": report[split][metric] for split in splits for metric in ("loss", "exact_match")}}


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
    rows = [_measure("unpruned", source.num_experts, source.folder, tokenizer, splits)]
    folders = [source.folder]
    for keep in args.keep.split(","):
        count = keep_count(keep, source.num_experts, source.top_k, source.groups)
        for variant in args.variants.split(","):
            merge = variant == "merge"
            method = "reap" if merge else variant
            folder = prune(source.folder, output_dir / f"{variant}-{count}", keep=count, method=method, merge=merge,
                           saliency=saliency, overwrite=True)
            rows.append(_measure(f"{'HC-SMoE merge' if merge else method} {count}/{source.num_experts}", count,
                                 folder, tokenizer, splits))
            folders.append(folder)
    # Decoding speed: every model once per round, rounds interleaved, so a change in the machine's load reaches all
    # of them alike; the median round counts.
    seconds = [[] for _ in folders]
    for _ in range(args.repeats):
        for times, folder in zip(seconds, folders, strict=True):
            times.append(decode_seconds(folder, tokenizer, args.decode_tokens))
    for row, times in zip(rows, seconds, strict=True):
        row["decode_tokens_per_s"] = args.decode_tokens / statistics.median(times)
    reference = rows[0]
    for row in rows:
        row["weights_relative"] = row["weights_mb"] / reference["weights_mb"]
        for split in splits:
            row[f"{split}_loss_delta"] = row[f"{split}_loss"] - reference[f"{split}_loss"]
            row[f"{split}_exact_match_relative"] = (row[f"{split}_exact_match"] / reference[f"{split}_exact_match"]
                                                    if reference[f"{split}_exact_match"] else None)
    result = {"model": args.model_path, "calibration": description, "calibration_sequences": len(inputs),
              "calibration_seconds": calibration_seconds, "eval_per_family": args.eval_per_family,
              "sparse_layers": source.layers, "expert_diversity": expert_diversity(saliency), "rows": rows}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "benchmark.json").write_text(json.dumps(result, indent=1))
    return result


def format_table(result: dict) -> str:
    from ..text_table import table

    columns = {"variant": "variant", "weights_mb": "weights MB", "validation_loss": "val loss",
               "validation_loss_delta": "Δ val loss", "heldout_loss": "held-out loss",
               "heldout_loss_delta": "Δ held-out loss", "validation_exact_match": "val EM",
               "heldout_exact_match": "held-out EM", "decode_tokens_per_s": "decode tok/s"}
    return table(result["rows"], columns)
