"""hf_moe model cards: `huggingface_hub.ModelCardData` metadata and a body rendered from `model_cards/model_card.md`.

One template serves every folder hf_moe writes; the `kind` (upcycled, fine-tuned, saved, ...) picks the tag, the
summary and the limitations, and optional sections (upcycling, training) are filled by the code that made the model.
"""

import os
import re
import shlex
import sys
import tempfile
from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..checkpoints.lineage import Lineage

CARD_MARKER = "<!-- hf_moe model card -->"
ARCHITECTURE_NAMES = {"hf_moe": "top-k Mixture-of-Experts", "hf_switch": "Switch Transformer (top-1)",
                      "hf_mh_moe": "Multi-Head Mixture-of-Experts"}


def _expert_choice(config) -> bool:
    from ..moe_layers import EXPERT_CHOICE_ROUTING, config_routing_kind

    return config_routing_kind(config) == EXPERT_CHOICE_ROUTING


def architecture_name(config) -> str:
    """What the card calls the model: by model type, and by routing for expert choice."""
    if _expert_choice(config):
        return ("expert-choice Multi-Head Mixture-of-Experts" if config.model_type == "hf_mh_moe"
                else "expert-choice Mixture-of-Experts")
    return ARCHITECTURE_NAMES.get(config.model_type, config.model_type)


KIND_TAGS = {"upcycled": "upcycled", "fine-tuned": "fine-tuned", "saved": None, "exported": "exported",
             "pruned": "pruned"}
# hf_moe is not on PyPI: cards name it without a link (a link must not point to a page that does not exist).
HF_MOE = "hf_moe"
LIMITATIONS = [
    "The routing and expert code runs from the two `.py` files in this repository when loaded with "
    "`trust_remote_code=True`; read them before loading.",
    "Not evaluated for safety or bias; it inherits the limitations of the model it was derived from.",
]
KIND_LIMITATIONS = {
    "upcycled": "The router is new: at initialisation the model mirrors the dense model and it is meant to be "
                "trained further before the experts specialise.",
    "exported": "Exact in float32. In bfloat16/float16 the native routers compute their logits in the model dtype "
                "where hf_moe uses float32, so tokens near a routing tie can pick another expert.",
    "fine-tuned": "Fine-tuned with a short recipe (see Training); check the evaluation on your own task first.",
    "pruned": "Experts were removed (or merged) without retraining, chosen on the calibration data named under "
              "Pruning: the model differs from its source, most where that data does not reach; evaluate it on "
              "your own task first.",
}


def parameter_counts(model) -> tuple[int, int]:
    """(total, active per token) parameters. Active counts the experts per token (`MoeLayer.experts_per_token`:
    top-k's k, expert choice's c on average) of the E experts of each sparse block (for MH-MoE, up to h times as
    many: an upper bound, as a token's sub-tokens may pick the same experts). Works for transformers' own MoE models
    too (the blocks come from `hf_moe.moe_layers`)."""
    from ..moe_layers import find_moe_layers

    total = sum(parameter.numel() for parameter in model.parameters())
    modules = dict(model.named_modules())
    subtokens = getattr(model.config, "num_subtokens", 1)
    inactive = 0.0
    for layer in find_moe_layers(model):
        if layer.experts_name is None or not layer.num_experts:
            continue
        used = min(layer.num_experts, layer.experts_per_token * subtokens)
        experts_size = sum(p.numel() for p in modules[layer.experts_name].parameters())
        inactive += experts_size * (1 - used / layer.num_experts)
    return total, round(total - inactive)


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count / 1e3:.1f}K"


def _router_description(config) -> str:
    if not hasattr(config, "router_type"):  # a transformers MoE family: its own router
        return f"{config.model_type}'s router; aux loss coef {getattr(config, 'router_aux_loss_coef', 'n/a')}"
    router = f"`{config.router_type}`"
    if _expert_choice(config):
        rule = ("causal: per-expert thresholds (running estimates of the training cutoffs)"
                if config.expert_choice_eval_rule == "threshold" else "batch selection (not causal)")
        return (f"{router} (arXiv 2202.09368): each expert takes its top-C tokens per {config.expert_choice_group}, "
                f"capacity factor {config.expert_capacity_factor:g} (experts per token on average), no load-balancing "
                f"loss; inference routing {rule}; z-loss coef {config.router_z_loss_coef}")
    if config.straight_through_topk:
        router += ", straight-through top-1 weight"
    elif config.norm_topk_prob:
        router += ", top-k weights renormalised"
    if config.router_jitter_noise:
        router += f", jitter {config.router_jitter_noise}"
    router += f"; aux loss coef {config.router_aux_loss_coef}, z-loss coef {config.router_z_loss_coef}"
    if config.router_sequence_aux_loss_coef:
        router += f", sequence-wise aux loss coef {config.router_sequence_aux_loss_coef}"
    if config.router_bias_update_rate:
        router += (f"; selection bias `e_score_correction_bias` (auxiliary-loss-free balancing, update rate "
                   f"{config.router_bias_update_rate:g})")
    return router


def architecture_rows(config, model) -> list[tuple[str, str]]:
    """The architecture table: experts, top-k, sparse layers, total and active parameters, router, capacity."""
    from ..moe_layers import find_moe_layers

    total, active = parameter_counts(model)
    layers = find_moe_layers(model)
    num_experts = layers[0].num_experts if layers else getattr(config, "num_experts", 0)
    top_k = layers[0].top_k if layers else getattr(config, "num_experts_per_tok", 0)
    experts = f"{num_experts}, top-{top_k}"
    if _expert_choice(config):
        experts = f"{num_experts}, expert choice ({config.expert_capacity_factor:g} per token on average)"
    if getattr(config, "num_shared_experts", 0):
        experts += f" + {config.num_shared_experts} shared (always active)"
    sparse = getattr(config, "sparse_layer_indices", None) or [layer.index for layer in layers]
    shown = ", ".join(map(str, sparse)) if len(sparse) <= 12 else f"{sparse[0]}..{sparse[-1]}"
    rows = [
        ("model type", f"`{config.model_type}` ({architecture_name(config)})"),
        ("experts per sparse layer", experts),
        ("sparse layers", f"{len(sparse)} of {config.num_hidden_layers} ({shown})"),
        ("parameters", f"{_millions(total)} total, {_millions(active)} active per token"),
        ("router", _router_description(config)),
        ("capacity", _capacity(config)),
    ]
    if getattr(config, "num_subtokens", 1) > 1:
        rows.insert(2, ("sub-tokens per token (MH-MoE heads)", str(config.num_subtokens)))
    return rows


def _capacity(config) -> str:
    if _expert_choice(config):
        return ("training: C = ceil(capacity factor x tokens / experts) tokens per expert; inference: no limit "
                "(threshold rule)")

    def describe(factor):
        return "dropless" if factor is None else f"factor {factor} (tokens over capacity are dropped)"

    return (f"training: {describe(getattr(config, 'capacity_factor', None))}; "
            f"inference: {describe(getattr(config, 'eval_capacity_factor', None))}")


def card_metadata(kind: str, config, lineage: Lineage, datasets: list[str] | None = None,
                  extra_tags: tuple[str, ...] = ()) -> ModelCardData:
    """`library_name`, `pipeline_tag`, unique `tags`, `license`, `base_model` (+ relation), `datasets`."""
    if kind not in KIND_TAGS:
        raise ValueError(f"`kind`={kind!r} is invalid: choose one of {tuple(KIND_TAGS)}")
    tags = ["mixture-of-experts", config.model_type, "hf_moe", KIND_TAGS[kind], *extra_tags]
    relation = {"base_model_relation": "finetune"} if lineage.base_model else {}
    return ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         tags=[tag for tag in dict.fromkeys(tags) if tag], license=lineage.license,
                         base_model=lineage.base_model, datasets=datasets or None, **relation)


def _summary(kind: str, config, lineage: Lineage) -> str:
    architecture = architecture_name(config)
    if lineage.base_model and lineage.base_model == lineage.parent:
        parent = f"[`{lineage.parent}`](https://huggingface.co/{lineage.parent})"
    elif lineage.parent:
        parent = f"`{lineage.parent}`" + (f" (itself derived from [`{lineage.base_model}`]"
                                          f"(https://huggingface.co/{lineage.base_model}))"
                                          if lineage.base_model else "")
    else:
        parent = None
    made = {"upcycled": "upcycled from the dense model {} (sparse upcycling, arXiv 2212.05055)",
            "fine-tuned": "fine-tuned from {} with the stock `transformers.Trainer` and hf_moe's MoE callbacks",
            "saved": "derived from {}",
            "pruned": "pruned from {} (fewer routed experts per sparse layer; see Pruning)"}[kind]
    text = f"A **{architecture}** model built with {HF_MOE}"
    return text + (", " + made.format(parent) if parent else "") + "."


def render_card(kind: str, config, *, model, model_name: str, lineage: Lineage | None = None,
                upcycling: dict | None = None, training: dict | None = None, command: str | None = None,
                datasets: list[str] | None = None, extra_tags: tuple[str, ...] = (),
                summary: str | None = None, architecture: list[tuple[str, str]] | None = None,
                limitations: list[str] | None = None, pruning: dict | None = None,
                remote_code: bool | None = None) -> ModelCard:
    """The model card of an hf_moe model folder.

    `kind`: "upcycled", "fine-tuned", "saved", "exported" (a native checkpoint: loaded without remote code) or
    "pruned";
    `summary` / `architecture` / `limitations` replace the defaults of `kind`; `model`: the model (a meta-device
    instance is enough) for the
    parameter counts; `upcycling` / `training`: the optional sections ({"rows": [(label, value)], "equivalence": str}
    and {"recipe": [...], "heatmap": relative path, "load_rows": [...], "load_step": int}); `pruning`: the pruning
    section ({"rows": [(label, value)], "note": str, "heatmap": relative path, "heatmap_caption": str});
    `remote_code`: whether the usage snippet loads remote code (default: every kind but "exported"); `command`: the
    command that made the folder.

    Example:
    ```python
    >>> card = render_card("saved", model.config, model=model, model_name="my-moe")
    >>> write_card("out/my-moe", card)
    ```
    """
    lineage = lineage or Lineage()
    data = card_metadata(kind, config, lineage, datasets, extra_tags)
    template = resources.files("hf_moe.model_cards").joinpath("model_card.md").read_text()
    remote_code = kind != "exported" if remote_code is None else remote_code
    if limitations is None:
        limitations = [*([KIND_LIMITATIONS[kind]] if kind in KIND_LIMITATIONS else []),
                       *(LIMITATIONS if remote_code else LIMITATIONS[1:])]
    return ModelCard.from_template(
        data, template_str=template, model_name=model_name, model_id=model_name, model_type=config.model_type,
        summary=summary or _summary(kind, config, lineage),
        architecture=architecture or architecture_rows(config, model), remote_code=remote_code,
        upcycling=upcycling, training=training, pruning=pruning, command=command, limitations=limitations,
    )


def write_card(folder: str | Path, card: ModelCard | str) -> Path:
    """Write `card` as `folder/README.md` atomically (temporary file, then rename)."""
    folder = Path(folder)
    descriptor, temporary = tempfile.mkstemp(prefix=".README.", suffix=".md", dir=folder)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(str(card))
        os.replace(temporary, folder / "README.md")
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return folder / "README.md"


def is_hf_moe_card(path: str | Path) -> bool:
    """Whether `path` (a README.md) was written by hf_moe."""
    path = Path(path)
    return path.is_file() and CARD_MARKER in path.read_text(encoding="utf-8", errors="replace")


def command_line() -> str | None:
    """The command this process runs, when it is the `hf-moe` CLI (`sys.argv`), with absolute paths inside the
    working directory made relative and others reduced to their name (a card must not leak local paths)."""
    program = Path(sys.argv[0]).name if sys.argv else ""
    if program not in ("hf-moe", "cli.py", "__main__.py"):
        return None

    def shown(word: str) -> str:
        if not os.path.isabs(word):
            return word
        try:
            return os.path.relpath(word) if Path(word).resolve().is_relative_to(Path.cwd()) else Path(word).name
        except ValueError:
            return Path(word).name

    return shlex.join(["hf-moe", *(shown(word) for word in sys.argv[1:])])


def with_model_id(text: str, repo_id: str) -> str:
    """The card text with the usage snippet's `model_id = "..."` line pointing to `repo_id`."""
    return re.sub(r'^model_id = ".*"$', f'model_id = "{repo_id}"', text, count=1, flags=re.MULTILINE)
