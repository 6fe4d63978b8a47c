"""Evaluation results merged into an existing card: `model-index` entries (`EvalResult`) and an Evaluation section."""

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard

from .card import write_card

SECTION_START, SECTION_END = "<!-- hf_moe:evaluation -->", "<!-- /hf_moe:evaluation -->"
DATASET_TYPE = "hf_moe/task-mixture"  # the embedded mixture (hf_moe.data), not a Hub dataset


def eval_results(report: dict) -> list[EvalResult]:
    """Perplexity, mean exact match and exact match per task family, for each split of an `evaluate` report."""
    results = []
    for split, metrics in report.items():
        if not isinstance(metrics, dict) or "perplexity" not in metrics:
            continue
        common = dict(task_type="text-generation", dataset_type=DATASET_TYPE, dataset_split=split,
                      dataset_name=f"hf_moe task mixture ({split})")
        results.append(EvalResult(**common, metric_type="perplexity", metric_name="perplexity",
                                  metric_value=round(metrics["perplexity"], 4)))
        results.append(EvalResult(**common, metric_type="exact_match", metric_name="exact match (mean)",
                                  metric_value=round(metrics["exact_match"], 4)))
        for family, value in sorted(metrics["exact_match_per_family"].items()):
            results.append(EvalResult(**common, metric_type="exact_match", metric_name=f"exact match: {family}",
                                      metric_value=round(value, 4)))
    return results


def _section(report: dict, images: list[str]) -> str:
    lines = [SECTION_START, "## Evaluation", "",
             "`hf-moe evaluate` on the embedded task mixture (greedy decoding, exact match per family; perplexity "
             "on response tokens; MaxVio = max expert load / mean expert load - 1 over the split, averaged over the "
             "sparse layers):", "", "| split | perplexity | exact match (mean) | MaxVio | per family |",
             "|---|---|---|---|---|"]
    for split, metrics in report.items():
        if isinstance(metrics, dict) and "perplexity" in metrics:
            families = ", ".join(f"{family} {value:.2f}"
                                 for family, value in sorted(metrics["exact_match_per_family"].items()))
            max_vio = f"{metrics['max_vio']:.3f}" if "max_vio" in metrics else "n/a"
            lines.append(f"| {split} | {metrics['perplexity']:.3f} | {metrics['exact_match']:.3f} | {max_vio} | "
                         f"{families} |")
    lines += [""] + [f"![Expert load by task family]({image})" for image in images] + [SECTION_END]
    return "\n".join(lines)


def merge_eval_results(folder: str | Path, report: dict, images: list[str] = ()) -> Path:
    """Merge an `evaluate` report into `folder/README.md`: results with the same dataset, split and metric name are
    replaced, others kept; the Evaluation section is replaced or inserted before "## Use". `images`: paths relative
    to the folder to embed. The card must exist (every folder hf_moe writes has one).

    Example:
    ```python
    >>> merge_eval_results("runs/x", run_evaluate(EvaluateArguments(model_path="runs/x")))
    ```
    """
    folder = Path(folder)
    card = ModelCard.load(folder / "README.md")
    new = eval_results(report)
    keys = {(r.dataset_name, r.dataset_split, r.metric_name) for r in new}
    kept = [r for r in card.data.eval_results or [] if (r.dataset_name, r.dataset_split, r.metric_name) not in keys]
    card.data.eval_results = kept + new
    card.data.model_name = card.data.model_name or folder.resolve().name  # model-index needs a name
    section = _section(report, list(images))
    text = card.text
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        text = before + section + rest.split(SECTION_END, 1)[1]
    elif "\n## Use" in text:
        before, after = text.split("\n## Use", 1)
        text = before + "\n" + section + "\n\n## Use" + after
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    card.text = text
    return write_card(folder, card)


def record_evaluation(model, folder: str | Path, report: dict, report_dir: Path) -> Path:
    """`hf-moe evaluate`'s card update: merge `report` into `folder`'s card (a saved-model card is written first if
    the folder has none), embedding the by-family expert-load plot when it lies inside the folder."""
    from .push import saved_card

    folder = Path(folder)
    if not (folder / "README.md").is_file():
        write_card(folder, saved_card(model, folder.resolve().name))
    plot = (report_dir / "experts_by_family.png").resolve()
    shown = plot.is_relative_to(folder.resolve()) and plot.is_file()
    images = [plot.relative_to(folder.resolve()).as_posix()] if shown else []
    return merge_eval_results(folder, report, images)
