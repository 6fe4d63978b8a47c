"""Micro-batch vs global-batch load balancing from the same upcycled SmolLM2-135M-Instruct (README: Load balancing
scope). Same data, steps and micro-batches; only `router_aux_loss_scope` differs. Prints a Markdown table and writes
`<output_dir>/results.json`.

    python scripts/balancing_scope.py --output_dir runs/balancing_scope --max_steps 12
"""

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from hf_moe.recipes import EvaluateArguments, FinetuneArguments, FinetuneTrainingArguments, run_evaluate, run_finetune
from hf_moe.upcycling import open_dense_checkpoint, upcycle


@dataclass
class ScopeArguments:
    output_dir: str = field(default="runs/balancing_scope")
    max_steps: int = 12
    per_device_train_batch_size: int = field(default=2, metadata={"help": "micro-batch rows"})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = 1e-4
    router_aux_loss_coef: float = 0.01
    eval_per_family: int = 5
    seed: int = 0


def family_entropy(specialisation: dict) -> float:
    """Mean over task families and layers of the entropy (nats) of the family's expert-load distribution."""
    values = []
    for family in specialisation.values():
        for load in family["load_per_layer"]:
            total = sum(load)
            values.append(-sum(p / total * math.log(p / total) for p in load if p > 0))
    return sum(values) / len(values)


def finetune_arguments(args: ScopeArguments, start: Path, run_dir: Path, scope: str):
    """(FinetuneArguments, FinetuneTrainingArguments) of one run; only `router_aux_loss_scope` differs between runs."""
    return (
        FinetuneArguments(model_path=str(start), router_aux_loss_scope=scope,
                          router_aux_loss_coef=args.router_aux_loss_coef, eval_per_family=args.eval_per_family),
        FinetuneTrainingArguments(
            output_dir=str(run_dir), max_steps=args.max_steps,
            per_device_train_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
            save_steps=args.max_steps, logging_steps=args.max_steps, report_to="none", seed=args.seed))


def main(args: ScopeArguments) -> list[dict]:
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    dense, start = root / "start-dense", root / "start-hf_moe"
    if not dense.exists():
        open_dense_checkpoint(None).save_as_folder(dense)
    if not start.exists():
        upcycle(str(dense), str(start), arch="hf_moe", num_experts=8, seed=args.seed)
    rows = []
    for scope in ("micro_batch", "global_batch"):
        run_dir = root / f"tuned-{scope}"
        began = time.perf_counter()
        run_finetune(*finetune_arguments(args, start, run_dir, scope))
        seconds = time.perf_counter() - began
        report = run_evaluate(EvaluateArguments(model_path=str(run_dir), eval_per_family=args.eval_per_family,
                                                seed=args.seed))
        rows.append({"scope": scope, "train_seconds": seconds, "validation_loss": report["validation"]["loss"],
                     "heldout_loss": report["heldout"]["loss"],
                     "family_expert_entropy": family_entropy(report["expert_specialisation"])})
    (root / "results.json").write_text(json.dumps(rows, indent=1))
    print("| scope | train s | held-in loss | held-out loss | per-family expert entropy (nats, max ln 8 = 2.079) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['scope']} | {row['train_seconds']:.0f} | {row['validation_loss']:.4f} | "
              f"{row['heldout_loss']:.4f} | {row['family_expert_entropy']:.4f} |")
    return rows


if __name__ == "__main__":
    main(HfArgumentParser(ScopeArguments).parse_args_into_dataclasses()[0])
