"""Reading a saved peft LoRA adapter folder against its base into the canonical form (`canonical.py`).

The experts' tensors come fused (peft `target_parameters`, unsloth) or per expert (the v4 layout, vLLM / SGLang
exports), never both; everything else is kept as saved. hf_moe's QLoRA adapters (`hf-moe finetune --load_in_4bit`,
`attach_moe_lora` on 4-bit experts) are plain fused adapters whose nesting is reversed (down_proj inner), which the
shape-based reading absorbs: their delta exports like any other, the quantised base never enters.
"""

import json
from pathlib import Path

from safetensors.torch import load_file

from .base import BaseModel
from .canonical import ExpertAdapter
from .fused import B_LAYOUTS, read_fused
from .names import FUSED_KEY, LORA_KEY, PEFT_PREFIX, PER_EXPERT_KEY
from .per_expert import read_per_expert

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json of a LoRA adapter folder; a missing folder or file, or another peft type, raises
    ValueError naming it."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise ValueError(f"{adapter_dir}: no such adapter folder")
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a peft adapter folder)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r}; only LoRA adapters ('LORA') are read")
    return config


def default_base(config: dict, adapter: str) -> str:
    """The adapter's base folder when none is given: its `base_model_name_or_path`, if that is a local folder."""
    base = config.get("base_model_name_or_path")
    if base and Path(base).is_dir():
        return base
    raise ValueError(f"{adapter}: pass `base`, the base model folder (the adapter's base_model_name_or_path "
                     f"{base!r} is not a local folder)")


def read_adapter(adapter_dir: str | Path, base: BaseModel, lora_B_layout: str | None = None) -> ExpertAdapter:
    """The adapter at `adapter_dir` in canonical form, checked against `base` (E, H, I and the sparse layers of its
    experts, the ranks against adapter_config.json).

    `lora_B_layout` ('rank_major' | 'grouped_by_expert') says how a fused lora_B orders its columns; default: the
    adapter_config.json's `lora_B_layout` marker (unsloth's), else 'rank_major' (peft's).
    """
    folder = Path(adapter_dir)
    config = read_adapter_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        found = " (found adapter_model.bin: only safetensors is read)" if pickled else ""
        raise ValueError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}{found}")
    b_layout = lora_B_layout or config.get("lora_B_layout") or "rank_major"
    if b_layout not in B_LAYOUTS:
        raise ValueError(f"`lora_B_layout`={b_layout!r} is invalid: choose one of {B_LAYOUTS}")
    tensors = load_file(str(weights))
    fused, per_expert, other = {}, {}, {}
    for key, tensor in tensors.items():
        if PER_EXPERT_KEY.fullmatch(key):
            per_expert[key] = tensor
        elif (match := FUSED_KEY.fullmatch(key)) and match["experts"].removeprefix(PEFT_PREFIX) in {
                layer.experts_name for layer in base.layers.values()}:
            fused[key] = tensor
        else:
            other[key] = tensor
    if fused and per_expert:
        raise ValueError(f"{adapter_dir} holds both fused ({next(iter(fused))}) and per-expert "
                         f"({next(iter(per_expert))}) expert tensors")
    stray = [key for key in other if (match := FUSED_KEY.fullmatch(key)) and match["experts"].endswith(".experts")]
    if stray:
        raise ValueError(f"{stray[0]}: the base {base.folder.source} has no experts module "
                         f"{FUSED_KEY.fullmatch(stray[0])['experts'].removeprefix(PEFT_PREFIX)} (its sparse layers: "
                         f"{sorted(base.layers)}; wrong base)")
    experts = read_fused(fused, base, config, b_layout) if fused else read_per_expert(per_expert, base, config)
    if not experts:
        raise ValueError(f"{adapter_dir} has no LoRA on the routed experts of the base's sparse layers "
                         f"{sorted(base.layers)}")
    adapter = ExpertAdapter(folder, config, base, experts, other)
    unknown = [module for module in adapter.other_lora_modules() if module not in base.module_names
               and module.rpartition(".")[0] not in base.module_names]
    if unknown:
        raise ValueError(f"the adapter has LoRA on {unknown[0]}, which the base {base.folder.source} does not have "
                         "(wrong base)")
    _check_other_ranks(adapter)
    return adapter


def _check_other_ranks(adapter: ExpertAdapter) -> None:
    """Every other LoRA pair's A and B agree on the rank."""
    pairs: dict[str, dict[str, tuple]] = {}
    for key, tensor in adapter.other_tensors.items():
        if match := LORA_KEY.fullmatch(key):
            pairs.setdefault(key.replace(".lora_A.", ".lora_?.").replace(".lora_B.", ".lora_?."), {})[
                match["factor"]] = tuple(tensor.shape)
    for key, shapes in pairs.items():
        if {"A", "B"} <= set(shapes) and len(shapes["A"]) == len(shapes["B"]) == 2 and (
                shapes["A"][0] != shapes["B"][1]):
            raise ValueError(f"{key.replace('?', 'A')}: lora_A {shapes['A']} and lora_B {shapes['B']} disagree on the "
                             "rank (rank mismatch)")
