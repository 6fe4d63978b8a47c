"""`evaluate`: perplexity, exact match per task family (via the `evaluate` library) and expert specialisation."""

import json
import math
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import evaluate
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..checkpoints.lineage import is_hub_id_shaped
from ..data import build_mixture
from ..data.sft import ensure_chat_template, generation_prompt, tokenize_for_sft
from ..expert_choice import ExpertChoiceGapRecorder, expert_choice_routers
from ..hub.evaluation import record_evaluation
from ..metrics import EXACT_MATCH_PATH
from ..training.heatmap import save_load_heatmap
from ..training.router_stats import RouterStatsRecorder, max_violation


@dataclass
class EvaluateArguments:
    model_path: str = field(default="runs/finetune", metadata={"help": "model folder with its tokenizer"})
    report_dir: str | None = field(default=None, metadata={"help": "default: <model_path>/evaluation"})
    eval_per_family: int = field(default=20, metadata={"help": "examples per task family"})
    train_per_family: int = field(default=200, metadata={
        "help": "as in finetune: the validation prompts are drawn disjoint from that many training prompts"})
    max_new_tokens: int = 12
    seed: int = 0

    def __post_init__(self):
        for name in ("eval_per_family", "train_per_family", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}`={getattr(self, name)!r} is invalid: a positive integer is required")


def check_model_path(model_path: str) -> None:
    """Raise `FileNotFoundError` naming `model_path` when it is neither an existing path nor shaped like a Hub id,
    before anything tries to load it (transformers would say the path is a malformed repo id)."""
    if not Path(model_path).exists() and not is_hub_id_shaped(model_path):
        raise FileNotFoundError(f"`model_path`={model_path!r}: no such folder; expected a model folder (config.json, "
                                "weights and tokenizer) or a Hub model id (owner/name)")


def _chat_prompt_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    return tokenizer(generation_prompt(tokenizer, messages), return_tensors="pt", add_special_tokens=False).input_ids


@torch.no_grad()
def evaluate_model(model, tokenizer, splits: dict, max_new_tokens: int = 12, report_dir: Path | None = None
                   ) -> dict:
    """Per split: perplexity over response tokens, exact match per family and MaxVio (the split's load over all its
    examples: the paper's MaxVio_global); per family: expert load.

    `splits` maps a split name to a dataset with `family`, `messages` and `answer` columns.
    """
    ensure_chat_template(tokenizer)
    model.eval()
    exact_match = evaluate.load(EXACT_MATCH_PATH)
    recorder = RouterStatsRecorder(model, only_training=False)
    gap = ExpertChoiceGapRecorder(model) if expert_choice_routers(model) else None
    family_loads = {}
    report = {}
    try:
        for split_name, dataset in splits.items():
            nll, tokens, batch_rule_nll = 0.0, 0, 0.0
            if gap is not None:
                gap.totals.clear()
            predictions, references = defaultdict(list), defaultdict(list)
            split_load = {}  # layer -> (E,) assignments of the split's scored forward calls
            for row in dataset:
                recorder.reset()
                features = tokenize_for_sft(tokenizer, row["messages"], max_length=512)
                ids, labels = torch.tensor([features["input_ids"]]), torch.tensor([features["labels"]])
                outputs = model(input_ids=ids, labels=labels)
                count = int((labels[:, 1:] != -100).sum())
                nll += float(outputs.get("lm_loss", outputs.loss)) * count
                tokens += count
                if gap is not None:
                    batch_rule_nll += _batch_selection_loss(model, ids, labels, gap) * count
                if recorder.routers:
                    _, load = recorder.load_matrix(cumulative=False)
                    family_loads.setdefault(row["family"], []).append(load)
                    for layer, counts in recorder.loads.items():
                        split_load[layer] = split_load.get(layer, 0) + counts
                prompt = _chat_prompt_ids(tokenizer, row["messages"])
                with gap.paused() if gap is not None else nullcontext():
                    generated = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False,
                                               pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
                answer = tokenizer.decode(generated[0, prompt.shape[1]:], skip_special_tokens=True)
                predictions[row["family"]].append(answer.strip().split("\n")[0])
                references[row["family"]].append(row["answer"])
            per_family = {family: exact_match.compute(predictions=predictions[family],
                                                      references=references[family])["exact_match"]
                          for family in predictions}
            report[split_name] = {
                "perplexity": math.exp(nll / max(tokens, 1)),
                "loss": nll / max(tokens, 1),
                "exact_match": sum(per_family.values()) / max(len(per_family), 1),
                "exact_match_per_family": per_family,
                "examples": {family: list(zip(predictions[family][:3], references[family][:3], strict=True))
                             for family in predictions},
            }
            if gap is not None:  # the causal rule (used above) against the batch selection it stands in for
                report[split_name]["expert_choice"] = {
                    **gap.summary(), "loss_batch_selection": batch_rule_nll / max(tokens, 1)}
            if split_load:
                per_layer = {layer: max_violation(load).item() for layer, load in sorted(split_load.items())}
                report[split_name]["max_vio"] = sum(per_layer.values()) / len(per_layer)
                report[split_name]["max_vio_per_layer"] = per_layer
    finally:
        recorder.remove()
        if gap is not None:
            gap.remove()
    if family_loads:
        report["expert_specialisation"] = _specialisation(family_loads, recorder, report_dir)
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _batch_selection_loss(model, ids, labels, gap: ExpertChoiceGapRecorder) -> float:
    """The LM loss of the same example with the (not causal) batch selection in every expert-choice router."""
    model.set_expert_choice_eval_rule("batch")
    try:
        with gap.paused():
            outputs = model(input_ids=ids, labels=labels)
    finally:
        model.set_expert_choice_eval_rule("threshold")
    return float(outputs.get("lm_loss", outputs.loss))


def _specialisation(family_loads: dict, recorder: RouterStatsRecorder, report_dir: Path | None) -> dict:
    """Which experts each family uses per layer: mean load fractions, the top expert per layer, and plots."""
    layers = sorted(recorder.routers)
    result = {}
    family_matrix = []
    for family, loads in family_loads.items():
        mean = torch.stack(loads).mean(0)  # (layers, E)
        family_matrix.append(mean.mean(0))
        result[family] = {"top_expert_per_layer": dict(zip(layers, mean.argmax(-1).tolist(), strict=True)),
                          "load_per_layer": mean.tolist()}
        if report_dir is not None:
            save_load_heatmap(mean, layers, report_dir / f"experts_{family}.png", title=f"expert load: {family}")
    if report_dir is not None:
        save_load_heatmap(torch.stack(family_matrix), list(family_loads), report_dir / "experts_by_family.png",
                          title="expert load by task family (mean over layers)", row_label="task family")
    return result


def run_evaluate(args: EvaluateArguments) -> dict:
    check_model_path(args.model_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    mixture = build_mixture(args.train_per_family, args.eval_per_family, seed=args.seed)
    report_dir = Path(args.report_dir) if args.report_dir else Path(args.model_path) / "evaluation"
    report = evaluate_model(model, tokenizer, {"validation": mixture["validation"], "heldout": mixture["heldout"]},
                            args.max_new_tokens, report_dir)
    if Path(args.model_path).is_dir():
        record_evaluation(model, args.model_path, report, report_dir)
    return report


def format_evaluation(report: dict) -> str:
    """`evaluate_model`'s report for people: perplexity, loss and exact match per split, then exact match per family."""
    from ..text_table import table

    splits = {name: values for name, values in report.items() if isinstance(values, dict) and "perplexity" in values}
    overall = table([{"split": name, **{key: values.get(key) for key in ("perplexity", "loss", "exact_match",
                                                                          "max_vio")}}
                     for name, values in splits.items()],
                    {"split": "split", "perplexity": "perplexity", "loss": "loss", "exact_match": "exact match",
                     "max_vio": "MaxVio"})
    gaps = [{"split": name, "loss": values["loss"], **values["expert_choice"]}
            for name, values in splits.items() if "expert_choice" in values]
    gap_table = "" if not gaps else "\n\nexpert choice, causal threshold rule vs batch selection:\n" + table(gaps, {
        "split": "split", "loss": "loss (causal)", "loss_batch_selection": "loss (batch sel.)",
        "agreement": "agreement", "recall": "recall", "precision": "precision",
        "experts_per_token_causal": "experts/token", "experts_per_token_causal_std": "± std",
        "experts_per_token_batch": "experts/token (batch)"})
    families = sorted({family for values in splits.values() for family in values["exact_match_per_family"]})
    per_family = table([{"family": family, **{name: values["exact_match_per_family"].get(family)
                                              for name, values in splits.items()}} for family in families],
                       {"family": "family", **{name: f"{name} exact match" for name in splits}})
    return f"{overall}{gap_table}\n\n{per_family}"
