"""The card of an exported folder: a native Mixtral / Qwen-MoE checkpoint made from an hf_moe model."""

from pathlib import Path

from ..checkpoints.lineage import Lineage, local_card
from .card import HF_MOE, KIND_LIMITATIONS, parameter_counts, render_card, write_card

TARGET_TITLES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE"}


def write_export_card(folder: Path, model_name: str, config, target, model, base_model: str | None,
                      source_folder: Path, dropped: list[str]) -> Path:
    """Write `folder/README.md` for a model exported from the hf_moe `config` (`model`: its meta-device instance,
    for the parameter counts) to `target`. `base_model` is the hf_moe model's Hub id, or None when unknown."""
    source_card = local_card(source_folder)
    lineage = Lineage(base_model=base_model, license=source_card.data.license if source_card else None)
    total, active = parameter_counts(model)
    title = TARGET_TITLES[target.name]
    origin = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else "an hf_moe model"
    dense_origin = f" (upcycled from `{config.base_model}`)" if config.base_model else ""
    summary = (f"A native **{title}** checkpoint (`model_type: {target.name}`) exported with {HF_MOE} from "
               f"{origin}{dense_origin}. The conversion only renames and splits the same weights, so it computes the "
               "hf_moe model's function (hf_moe's tests check max |Δlogit| ≤ 1e-5 in float32 and identical greedy "
               "generations). It loads with stock `transformers` without `trust_remote_code` and stores the experts "
               f"one by one, as the {title} checkpoints on the Hub do.")
    shared = (f"{config.num_shared_experts} (as Qwen2-MoE's shared expert with a zero gate row and doubled "
              "`down_proj`, which reproduces an ungated one exactly)" if config.num_shared_experts else "none")
    weights = "renormalised" if config.norm_topk_prob else "softmax"
    architecture = [
        ("architecture", f"`{target.architecture}`"),
        ("experts per sparse layer", f"{config.num_experts} (top-{config.num_experts_per_tok}, {weights} weights)"),
        ("sparse layers", f"{len(config.sparse_layer_indices)} of {config.num_hidden_layers}"),
        ("shared experts", shared),
        ("parameters", f"{total / 1e6:.1f}M total, {active / 1e6:.1f}M active per token"),
    ]
    limitations = [KIND_LIMITATIONS["exported"]]
    if dropped:
        limitations.append("Training-only hf_moe settings with no native field were not carried over: "
                           + "; ".join(dropped) + ".")
    card = render_card("exported", target.target_config(config), model=model, model_name=model_name,
                       lineage=lineage, summary=summary, architecture=architecture, limitations=limitations,
                       command=f"hf-moe export {base_model or 'HF_MOE_MODEL_FOLDER'} {model_name} --to {target.name}",
                       extra_tags=("moe",))
    return write_card(folder, card)
