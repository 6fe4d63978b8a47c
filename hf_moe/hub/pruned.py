"""The card of a pruned (or merged) folder: lineage from the source, the pruning plan and its saliency heatmap."""

from pathlib import Path

from ..checkpoints.lineage import display_name, lineage_of
from ..checkpoints.names import HF_MOE_MODEL_TYPES
from .card import command_line, render_card, write_card


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def pruning_rows(report: dict) -> list[tuple[str, str]]:
    """The Pruning table of the card, from pruning.json's content."""
    experts = report["num_experts"]
    plan = report["plan"]
    shown = plan if len(plan) <= 12 else plan[:12]
    if report["merge"]:
        how = "merged: " + report["merge"]  # the merge names how each cluster's expert is chosen
    else:
        how = f"pruned by `{report['method']}`: {report['method_definition']}" if report["method"] else \
            report["method_definition"]
    rows = [
        ("routed experts per sparse layer", f"{experts['source']} → {experts['pruned']} "
                                            f"(top-{report['num_experts_per_tok']} routing unchanged)"),
        ("how", how),
    ]
    if "calibration" in report:
        calibration = report["calibration"]
        rows.append(("calibration", f"{calibration['sequences']} sequences, {calibration['tokens']} routed tokens "
                                    f"per layer, {calibration['data']}"))
    rows.append(("removed per layer", "; ".join(f"layer {entry['layer']}: {', '.join(map(str, entry['removed']))}"
                                                for entry in shown) + (" …" if len(plan) > len(shown) else "")))
    if "size_bytes" in report:
        size = report["size_bytes"]
        rows.append(("weights on disk", f"{_megabytes(size['source'])} → {_megabytes(size['pruned'])}"))
    return rows


def write_pruned_card(folder: Path, model_name: str, config, model, *, source_name: str, source_folder: Path,
                      source_hub_id: str | None, report: dict) -> Path:
    """Write `folder/README.md` for a model pruned from `source_name` (`model`: the pruned model on the meta device,
    for the parameter counts; `report`: the content of pruning.json)."""
    lineage = lineage_of(source_hub_id or source_folder)
    lineage.parent = source_hub_id or display_name(source_name)
    pruning = {
        "rows": pruning_rows(report),
        "note": "Router rows and experts were removed together; shared experts, attention, embeddings and norms are "
                "the source's. `pruning.json` holds the plan and the saliency of every expert on the calibration "
                "data.",
        "heatmap": report.get("heatmap"),
        "heatmap_caption": "Saliency of each expert on the calibration data, per sparse layer (each row divided by its "
                           "maximum); x marks the experts removed.",
    }
    card = render_card("pruned", config, model=model, model_name=model_name, lineage=lineage, pruning=pruning,
                       command=command_line(), remote_code=config.model_type in HF_MOE_MODEL_TYPES,
                       extra_tags=("moe", "expert-pruning"))
    return write_card(folder, card)
