"""A small-scale replication of FLAN-MoE's claim (arXiv 2305.14705): from the same dense start, instruction-tune
the dense model, its upcycled MoE and its upcycled Switch for the same number of steps on the embedded mixture."""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig

from ..checkpoints.names import meta_model
from ..upcycling import open_dense_checkpoint, upcycle
from .evaluate import EvaluateArguments, run_evaluate
from .finetune import FinetuneArguments, FinetuneTrainingArguments, run_finetune

UPCYCLED_TOP_K = 2  # experts per token of the upcycled hf_moe (the upcycled Switch routes to 1)


@dataclass
class ReplicationArguments:
    output_dir: str = field(default="runs/replication")
    max_steps: int = 40
    per_device_train_batch_size: int = 8
    learning_rate: float = 1e-4
    num_experts: int = 8
    train_per_family: int = 200
    eval_per_family: int = 10
    seed: int = 0

    def __post_init__(self):
        """At parsing: a bad count would otherwise fail only after the dense start is converted and written."""
        for name in ("max_steps", "per_device_train_batch_size", "train_per_family", "eval_per_family"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}`={getattr(self, name)!r} is invalid: a positive integer is required")
        if self.num_experts < UPCYCLED_TOP_K:
            raise ValueError(f"`num_experts`={self.num_experts!r} is invalid: choose {UPCYCLED_TOP_K} or more (the "
                             f"upcycled hf_moe routes each token to its top {UPCYCLED_TOP_K} experts)")


def run_replication(args: ReplicationArguments) -> list[dict]:
    """Rows of (model, parameters, train seconds, validation loss / exact match, held-out loss / exact match)."""
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    start = root / "start-dense"
    if not start.exists():
        open_dense_checkpoint(None).save_as_folder(start)
    starts = {"dense (continued)": start}
    for arch in ("hf_moe", "hf_switch"):
        folder = root / f"start-{arch}"
        if not folder.exists():
            upcycle(str(start), str(folder), arch=arch, num_experts=args.num_experts,
                    top_k=UPCYCLED_TOP_K if arch == "hf_moe" else 1, seed=args.seed)
        starts[f"upcycled {arch}"] = folder

    rows = [_evaluate_row("dense, before tuning", start, args, train_seconds=0.0)]
    for name, folder in starts.items():
        run_dir = root / f"tuned-{folder.name.removeprefix('start-')}"
        began = time.perf_counter()
        run_finetune(FinetuneArguments(model_path=str(folder), train_per_family=args.train_per_family,
                                       eval_per_family=args.eval_per_family),
                     FinetuneTrainingArguments(output_dir=str(run_dir), max_steps=args.max_steps,
                                               per_device_train_batch_size=args.per_device_train_batch_size,
                                               learning_rate=args.learning_rate, save_steps=args.max_steps,
                                               eval_steps=args.max_steps, logging_steps=max(1, args.max_steps // 8),
                                               seed=args.seed, data_seed=args.seed))
        rows.append(_evaluate_row(name, run_dir, args, train_seconds=time.perf_counter() - began))
    (root / "results.json").write_text(json.dumps(rows, indent=1))
    (root / "results.md").write_text(format_rows(rows))
    return rows


def _evaluate_row(name: str, folder: Path, args: ReplicationArguments, train_seconds: float) -> dict:
    report = run_evaluate(EvaluateArguments(model_path=str(folder), report_dir=str(folder / "evaluation"),
                                            eval_per_family=args.eval_per_family,
                                            train_per_family=args.train_per_family, seed=args.seed))
    parameters = _parameter_count(folder)
    return {"model": name, "parameters_m": parameters / 1e6, "train_seconds": train_seconds,
            "validation_loss": report["validation"]["loss"],
            "validation_exact_match": report["validation"]["exact_match"],
            "heldout_loss": report["heldout"]["loss"], "heldout_exact_match": report["heldout"]["exact_match"],
            "heldout_exact_match_per_family": report["heldout"]["exact_match_per_family"]}


def _parameter_count(folder: Path) -> int:
    return sum(p.numel() for p in meta_model(AutoConfig.from_pretrained(folder)).parameters())


def format_rows(rows: list[dict]) -> str:
    lines = ["| model | params (M) | train s | validation loss | validation EM | held-out loss | held-out EM |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['parameters_m']:.0f} | {row['train_seconds']:.0f} | "
                     f"{row['validation_loss']:.3f} | {row['validation_exact_match']:.2f} | "
                     f"{row['heldout_loss']:.3f} | {row['heldout_exact_match']:.2f} |")
    return "\n".join(lines)
