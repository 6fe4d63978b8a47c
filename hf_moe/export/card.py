"""The model card (README.md) of an exported folder, through huggingface_hub's ModelCard / ModelCardData.

One function on purpose: when hf_moe's shared card renderer (`hf_moe/hub/`) lands, this is the single place to
switch over.
"""

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TARGET_TITLES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE"}


def _source_license(source_folder: Path) -> str | None:
    card_path = source_folder / "README.md"
    if not card_path.is_file():
        return None
    try:
        return ModelCard.load(card_path).data.license
    except Exception:  # a hand-written README without (valid) metadata carries no license
        return None


def write_export_card(folder: Path, model_name: str, config, target, model, base_model: str | None,
                      source_folder: Path, dropped: list[str]) -> None:
    """Write `folder/README.md` for a model exported from the hf_moe `config` (`model`: its meta-device instance,
    for the parameter counts) to `target`. `base_model` is the hf_moe model's Hub id, or None when unknown."""
    total = sum(parameter.numel() for parameter in model.parameters())
    sparse_layers = config.sparse_layer_indices
    expert_size = 3 * config.hidden_size * config.moe_intermediate_size
    active = total - len(sparse_layers) * (config.num_experts - config.num_experts_per_tok) * expert_size
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=_source_license(source_folder),
        base_model=base_model,
        tags=["mixture-of-experts", "moe", target.name, "hf_moe", "exported"],
    )
    title = TARGET_TITLES[target.name]
    origin = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else "an hf_moe model"
    dense_origin = f" (upcycled from `{config.base_model}`)" if config.base_model else ""
    limitations = ["Exact in float32. In bfloat16/float16 the native routers compute their logits in the model "
                   "dtype where hf_moe uses float32, so tokens near a routing tie can pick another expert."]
    if dropped:
        limitations.append("Training-only hf_moe settings with no native field were not carried over: "
                           + "; ".join(dropped) + ".")
    shared = (f"{config.num_shared_experts} (as Qwen2-MoE's shared expert with a zero gate row and doubled "
              "`down_proj`, which reproduces an ungated one exactly)" if config.num_shared_experts else "none")
    content = f"""---
{data.to_yaml()}
---

# {model_name}

A native **{title}** checkpoint (`model_type: {target.name}`) exported with
[hf_moe](https://pypi.org/project/hf-moe/) from {origin}{dense_origin}. The conversion only renames and splits the
same weights, so it computes the hf_moe model's function (hf_moe's tests check max |Δlogit| ≤ 1e-5 in float32 and
identical greedy generations). It loads with stock `transformers` without `trust_remote_code` and stores the experts
one by one, as the {title} checkpoints on the Hub do.

| | |
|---|---|
| architecture | `{target.architecture}` |
| experts per sparse layer | {config.num_experts} (top-{config.num_experts_per_tok}, {"renormalised" if config.norm_topk_prob else "softmax"} weights) |
| sparse layers | {len(sparse_layers)} of {config.num_hidden_layers} |
| shared experts | {shared} |
| parameters | {total / 1e6:.1f}M total, {active / 1e6:.1f}M active per token |

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{model_name}")
tokenizer = AutoTokenizer.from_pretrained("{model_name}")
```

## Made with

```bash
hf-moe export {base_model or "HF_MOE_MODEL_FOLDER"} {model_name} --to {target.name}
```

## Limitations

""" + "\n".join(f"- {line}" for line in limitations) + "\n"
    ModelCard(content).save(Path(folder) / "README.md")
