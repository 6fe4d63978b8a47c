"""Aux loss vs auxiliary-loss-free (selection-bias) balancing vs both vs expert-choice routing, from the same
drop-upcycled SmolLM2 on the embedded task mixture: same data, steps and micro-batches; only the balancing differs
(docs/training.md, Balancing; docs/expert_choice.md). The expert-choice start is upcycled by the same recipe with
`router_type="expert_choice"` (experts scaled by E/c, see `upcycle`); it is scored under its causal inference rule.

Each method fine-tunes the same start with `build_trainer` (the `hf-moe finetune` set-up: ExpertStatsCallback logs
MaxVio at every step), then scores the validation and held-out families (loss on the response tokens, and MaxVio of
each split's whole load, `evaluate_model`).
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data import build_mixture
from ..moe_layers import EXPERT_CHOICE_ROUTING
from ..upcycling import open_dense_checkpoint, upcycle
from .evaluate import evaluate_model
from .finetune import FinetuneArguments, FinetuneTrainingArguments, build_trainer

METHODS = ("none", "aux_loss", "bias", "both", EXPERT_CHOICE_ROUTING)  # the last: routing by expert choice


@dataclass
class BalancingBenchmarkArguments:
    output_dir: str = field(default="runs/balancing", metadata={"help": "start folders, runs and results.json"})
    methods: str = field(default="none,aux_loss,bias,both", metadata={
        "help": f"comma-separated, from {', '.join(METHODS)} (none: neither aux loss nor bias)"})
    num_experts: int = 8
    moe_layers: str = field(default="4,9,14,19,24,29", metadata={"help": "sparse layers of the upcycled start"})
    drop_ratio: float = field(default=0.5, metadata={"help": "drop-upcycling: share of each expert re-initialised"})
    max_steps: int = 20
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 2
    learning_rate: float = 3e-4
    max_length: int = 128
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "alpha of the aux-loss runs"})
    router_bias_update_rate: float = field(default=1e-3, metadata={"help": "gamma of the bias runs"})
    train_per_family: int = 40
    eval_per_family: int = 5
    last_steps: int = field(default=10, metadata={"help": "training MaxVio: mean over this many last steps"})
    max_new_tokens: int = field(default=1, metadata={"help": "greedy tokens per answer for the exact match"})
    expert_capacity_factor: float = field(default=2.0, metadata={"help": "c of the expert_choice run"})
    seed: int = 0

    def __post_init__(self):
        for method in self.method_list:
            if method not in METHODS:
                raise ValueError(f"`methods`={self.methods!r} is invalid: choose from {', '.join(METHODS)}")

    @property
    def method_list(self) -> list[str]:
        return [method.strip() for method in self.methods.split(",") if method.strip()]


def balancing_settings(method: str, args: BalancingBenchmarkArguments) -> dict:
    """The `hf-moe finetune` options of one method: aux-loss weight and selection-bias update rate."""
    if method == EXPERT_CHOICE_ROUTING:  # balanced by construction
        return {"router_aux_loss_coef": 0.0, "router_bias_update_rate": 0.0}
    aux = args.router_aux_loss_coef if method in ("aux_loss", "both") else 0.0
    rate = args.router_bias_update_rate if method in ("bias", "both") else 0.0
    return {"router_aux_loss_coef": aux, "router_bias_update_rate": rate}


def prepare_start(args: BalancingBenchmarkArguments, expert_choice: bool = False) -> Path:
    """SmolLM2-135M-Instruct (embedded), drop-upcycled so the experts differ (built once under `output_dir`); with
    `expert_choice` the same recipe with expert-choice routers."""
    root = Path(args.output_dir)
    dense = root / "start-dense"
    routing = f"ec{args.expert_capacity_factor:g}" if expert_choice else "2"
    start = root / (f"start-hf_moe-{args.num_experts}x{routing}-{args.moe_layers.replace(',', '_')}"
                    f"-drop{args.drop_ratio:g}")
    if not dense.exists():
        open_dense_checkpoint(None).save_as_folder(dense)
    if not start.exists():
        routing_options = (dict(router_type="expert_choice", expert_capacity_factor=args.expert_capacity_factor)
                           if expert_choice else {})
        upcycle(str(dense), str(start), arch="hf_moe", num_experts=args.num_experts, moe_layers=args.moe_layers,
                expert_init="drop_upcycle", drop_ratio=args.drop_ratio, seed=args.seed, **routing_options)
    return start


def run_method(method: str, start: Path, args: BalancingBenchmarkArguments) -> dict:
    settings = balancing_settings(method, args)
    run_dir = Path(args.output_dir) / f"run-{method}"
    finetune_args = FinetuneArguments(model_path=str(start), train_per_family=args.train_per_family,
                                      eval_per_family=args.eval_per_family, max_length=args.max_length, **settings)
    training_args = FinetuneTrainingArguments(
        output_dir=str(run_dir), max_steps=args.max_steps, per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", seed=args.seed,
        data_seed=args.seed, disable_tqdm=True)
    trainer = build_trainer(finetune_args, training_args)
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    curve = [entry["moe/max_vio"] for entry in trainer.state.log_history if "moe/max_vio" in entry]
    mixture = build_mixture(args.train_per_family, args.eval_per_family, seed=args.seed)
    report = evaluate_model(trainer.model, trainer.processing_class,
                            {"validation": mixture["validation"], "heldout": mixture["heldout"]},
                            max_new_tokens=args.max_new_tokens)
    last = curve[-args.last_steps:]
    row = {"method": method, **settings, "train_seconds": seconds, "max_vio_first_step": curve[0],
           "max_vio_train_last": sum(last) / len(last), "max_vio_curve": curve}
    for split in ("validation", "heldout"):
        row.update({f"{split}_loss": report[split]["loss"], f"{split}_max_vio": report[split]["max_vio"],
                    f"{split}_exact_match": report[split]["exact_match"]})
        if "expert_choice" in report[split]:
            row[f"{split}_expert_choice"] = report[split]["expert_choice"]
    return row


def run_balancing_benchmark(args: BalancingBenchmarkArguments) -> list[dict]:
    """One row per method (see `run_method`); also written to `<output_dir>/results.json`."""
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    rows = [run_method(method, prepare_start(args, expert_choice=method == EXPERT_CHOICE_ROUTING), args)
            for method in args.method_list]
    (root / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


def format_balancing_table(rows: list[dict], last_steps: int = 10) -> str:
    """The Markdown table of docs/training.md's Balancing section."""
    lines = [f"| balancing | aux coef | bias gamma | train MaxVio, step 1 | train MaxVio, last {last_steps} steps | "
             "validation loss | held-out loss | validation exact match | held-out exact match | validation MaxVio | "
             "held-out MaxVio | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['router_aux_loss_coef']:g} | {row['router_bias_update_rate']:g} | "
                     f"{row['max_vio_first_step']:.3f} | {row['max_vio_train_last']:.3f} | "
                     f"{row['validation_loss']:.4f} | {row['heldout_loss']:.4f} | "
                     f"{row['validation_exact_match']:.3f} | {row['heldout_exact_match']:.3f} | "
                     f"{row['validation_max_vio']:.3f} | {row['heldout_max_vio']:.3f} | {row['train_seconds']:.0f} |")
    gaps = [(row["method"], split, row[f"{split}_expert_choice"]) for row in rows for split in ("validation", "heldout")
            if f"{split}_expert_choice" in row]
    if gaps:
        lines += ["", "| expert choice | split | loss, batch selection | agreement | recall | precision | "
                  "experts per token (causal) | ± std | experts per token (batch) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for method, split, gap in gaps:
            lines.append(f"| {method} | {split} | {gap['loss_batch_selection']:.4f} | {gap['agreement']:.3f} | "
                         f"{gap['recall']:.3f} | {gap['precision']:.3f} | {gap['experts_per_token_causal']:.2f} | "
                         f"{gap['experts_per_token_causal_std']:.2f} | {gap['experts_per_token_batch']:.2f} |")
    return "\n".join(lines)
