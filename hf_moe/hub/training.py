"""The card of a fine-tuned folder, from a `transformers.Trainer`: recipe, final losses, expert-load heatmap and a
per-layer router summary. It reads what the run recorded — the Trainer's arguments, `state.log_history` (the keys
hf_moe's training callbacks log) and the model — never the callbacks themselves, so the Hub side imports nothing of
`hf_moe.training`."""

import re
from pathlib import Path

from ..checkpoints.lineage import hub_id, lineage_of
from ..moe_layers import moe_module_names
from .card import command_line, render_card, write_card

_LAYER_KEY = re.compile(
    r"moe/layer(?P<layer>\d+)/(?P<metric>imbalance_max_over_mean|max_vio|router_entropy|dropped_fraction)")
_HEATMAP = re.compile(r"expert_load_step(?P<step>\d+)\.png")
# Logged by `hf_moe.training.AuxLossFreeBalancingCallback`: the gamma its selection biases were updated with.
_BIAS_UPDATE_RATE = "moe/selection_bias_update_rate"


def frozen_parts(model) -> str:
    """Which MoE parts have no trainable parameter: "router", "experts", "router, experts" or "none" (the modules
    come from `hf_moe.moe_layers`, so every MoE family's names apply: `mlp.gate`, gpt-oss's `mlp.router`, ...)."""
    modules = dict(model.named_modules())
    frozen = []
    for part in ("router", "experts"):
        flags = [parameter.requires_grad for name in moe_module_names(model, part)
                 for parameter in modules[name].parameters()]
        if flags and not any(flags):
            frozen.append(part)
    return ", ".join(frozen) or "none"


def balancing_description(log_history: list[dict], model) -> str:
    """How the run balanced the experts: the aux-loss weights and whether a selection bias was trained (with the
    gamma the run logged)."""
    from ..moe_layers import find_moe_layers

    config = model.config
    parts = [f"aux loss coef {getattr(config, 'router_aux_loss_coef', 'n/a')}"]
    if getattr(config, "router_aux_loss_scope", None):
        parts[0] += f" ({config.router_aux_loss_scope})"
    if getattr(config, "router_sequence_aux_loss_coef", 0):
        parts.append(f"sequence-wise aux loss coef {config.router_sequence_aux_loss_coef}")
    if any(layer.selection_bias_name for layer in find_moe_layers(model)):
        logged = _last(log_history, _BIAS_UPDATE_RATE)
        if logged is not None:
            parts.append(f"auxiliary-loss-free selection bias, updated every step (gamma {logged[0]:g})")
        else:
            parts.append("selection bias held fixed (no balancing callback)")
    return "; ".join(parts)


def _last(log_history: list[dict], key: str) -> tuple[float, int] | None:
    for entry in reversed(log_history):
        if key in entry:
            return entry[key], entry.get("step", 0)
    return None


def router_summary(log_history: list[dict]) -> tuple[list[dict], int | None]:
    """Per-layer imbalance, MaxVio, entropy and dropped fraction from the last log entry that has them."""
    for entry in reversed(log_history):
        rows: dict[int, dict] = {}
        for key, value in entry.items():
            match = _LAYER_KEY.fullmatch(key)
            if match:
                rows.setdefault(int(match["layer"]), {"layer": int(match["layer"])})[match["metric"]] = value
        if rows:
            table = [{"layer": row["layer"], "imbalance": row.get("imbalance_max_over_mean", float("nan")),
                      "max_vio": row.get("max_vio", float("nan")), "entropy": row.get("router_entropy", float("nan")),
                      "dropped": row.get("dropped_fraction", 0.0)} for _, row in sorted(rows.items())]
            return table, entry.get("step")
    return [], None


def latest_heatmap(output_dir: Path) -> str | None:
    """The newest `expert_load/expert_load_step<N>.png` (written by `ExpertStatsCallback`), relative to the folder."""
    found = [(int(m["step"]), path) for path in (output_dir / "expert_load").glob("*.png")
             if (m := _HEATMAP.fullmatch(path.name))]
    return max(found)[1].relative_to(output_dir).as_posix() if found else None


def training_section(trainer, data: str | None = None) -> dict:
    """The Training section of the card: recipe rows, heatmap path, per-layer router summary."""
    args, state = trainer.args, trainer.state
    model = trainer.accelerator.unwrap_model(trainer.model)
    per_device, accumulation, processes = (args.per_device_train_batch_size, args.gradient_accumulation_steps,
                                           args.world_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    recipe = [("steps", f"{state.global_step}" + (f" of {args.max_steps}" if args.max_steps > 0 else "")),
              ("effective batch", f"{per_device * accumulation * processes} sequences ({per_device} per device x "
                                  f"{accumulation} accumulation x {processes} process(es))"),
              ("learning rate", f"{args.learning_rate:g}, "
                                f"{getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}"
                                f" schedule, {args.warmup_steps} warmup steps"),
              ("optimizer", str(getattr(args.optim, "value", args.optim))),
              ("frozen MoE parts", frozen_parts(model)),
              ("load balancing", balancing_description(state.log_history, model)),
              ("trainable parameters", f"{trainable:,} of {total:,}")]
    if data:
        recipe.append(("data", data))
    for label, key in (("final train loss", "loss"), ("final eval loss", "eval_loss")):
        last = _last(state.log_history, key)
        if last is not None:
            recipe.append((label, f"{last[0]:.4f} (step {last[1]})"))
    load_rows, load_step = router_summary(state.log_history)
    return {"recipe": recipe, "heatmap": latest_heatmap(Path(args.output_dir)), "load_rows": load_rows,
            "load_step": load_step}


def write_training_card(trainer, folder: str | Path | None = None, dataset: str | None = None,
                        data: str | None = None, extra_tags: tuple[str, ...] = ()) -> Path:
    """Write the fine-tuned card of `trainer`'s model into `folder` (default: `args.output_dir`).

    `dataset`: the dataset used (a Hub id goes into the `datasets` metadata); `data`: how the body describes it.

    Example:
    ```python
    >>> trainer.train(); trainer.save_model()
    >>> write_training_card(trainer, dataset="HuggingFaceH4/no_robots")
    ```
    """
    folder = Path(folder or trainer.args.output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    dataset_id = hub_id(dataset) if dataset and not Path(dataset).exists() else None
    card = render_card("fine-tuned", model.config, model=model, model_name=folder.resolve().name,
                       lineage=lineage_of(model.name_or_path or None), command=command_line(),
                       training=training_section(trainer, data or (f"`{dataset}`" if dataset else None)),
                       datasets=[dataset_id] if dataset_id else None, extra_tags=extra_tags)
    return write_card(folder, card)
