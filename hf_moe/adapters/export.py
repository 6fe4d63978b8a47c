"""`export_adapter()`: a LoRA adapter with routed-expert LoRA, rewritten in the layout a consumer reads.

- `per-expert`: the v4 names vLLM's default MoE LoRA loader, SGLang and peft's v4 -> v5 converter read;
- `fused`: peft's own `target_parameters` layout (vLLM's 3-D MoE LoRA for gpt-oss and others);
- `merged`: a full model, the base with every delta added.

Every output is written into a hidden temporary folder renamed into place when complete; a refusal or bad input
raises a one-line error before anything is written.
"""

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoints.atomic import atomic_output_dir, resolve_output_dir
from ..checkpoints.names import TOKENIZER_FILES
from .base import open_base
from .fused import B_LAYOUTS, fused_config, fused_parameters, fused_tensors
from .merged import write_merged
from .names import PROJECTIONS
from .peft_config import without_expert_patterns
from .per_expert import per_expert_adapter
from .reading import ADAPTER_CONFIG, ADAPTER_WEIGHTS, default_base, read_adapter, read_adapter_config

logger = logging.getLogger(__name__)

LAYOUTS = ("per-expert", "fused", "merged")
COPIED_FILES = ("README.md", *TOKENIZER_FILES)  # carried from the adapter folder into an exported adapter


@dataclass(frozen=True)
class ExportedAdapter:
    """What `export_adapter` wrote: where, in which layout, each expert projection's rank (per-expert: gate, up,
    down; fused: gate_up_proj, down_proj; merged: the adapter's), how many tensors and how many bytes of weights."""

    path: Path
    layout: str
    ranks: dict[str, int]
    tensors: int
    bytes: int


@dataclass
class AdapterExportArguments:
    adapter: str = field(metadata={
        "help": "peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors)"})
    output_dir: str | None = field(default=None, metadata={"help": "default: <adapter>-<layout>"})
    layout: str = field(default="per-expert", metadata={
        "help": "per-expert (vLLM's default MoE LoRA, SGLang, peft's v4 converter) | fused (peft target_parameters, "
                "vLLM 3-D MoE LoRA) | merged (a full model: the base with every delta added)"})
    base: str | None = field(default=None, metadata={
        "help": "the base model folder (default: the adapter's base_model_name_or_path when it is a local folder)"})
    lora_B_layout: str | None = field(default=None, metadata={
        "help": "column order of a fused lora_B: rank_major (peft, vLLM) | grouped_by_expert (unsloth before "
                "2026-09) (default: adapter_config.json's lora_B_layout, else rank_major)"})
    allow_approximate: bool = field(default=False, metadata={
        "help": "allow conversions exact only up to float rounding (differing scalings folded into lora_B)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})
    max_shard_size: str = field(default="2GB", metadata={"help": "largest output shard (merged)"})

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"`layout`={self.layout!r} is invalid: choose one of {LAYOUTS}")
        if self.lora_B_layout is not None and self.lora_B_layout not in B_LAYOUTS:
            raise ValueError(f"`lora_B_layout`={self.lora_B_layout!r} is invalid: choose one of {B_LAYOUTS} (or "
                             "leave it unset)")


def export_adapter(adapter_dir: str | Path, output_dir: str | Path | None, layout: str, base: str | Path | None = None,
                   overwrite: bool = False, allow_approximate: bool = False, **options) -> ExportedAdapter:
    """Rewrite the LoRA adapter at `adapter_dir` (trained on `base`) in `layout`: 'per-expert', 'fused' or 'merged'.

    Reads peft's fused layout (peft >= 0.19; unsloth's grouped-by-expert lora_B by its marker or
    `lora_B_layout="grouped_by_expert"`) and the per-expert one, for Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
    DeepSeek-V3, GLM-4-MoE, gpt-oss and hf_moe bases (hf_moe's 4-bit QLoRA adapters included). Conversions are exact:
    fused -> per-expert -> fused gives back the same tensors; one that would only hold up to float rounding raises
    unless `allow_approximate=True`. Other options: `lora_B_layout`, `max_shard_size` (see `AdapterExportArguments`).

    Example:
    ```python
    >>> from hf_moe.adapters import export_adapter
    >>> exported = export_adapter("runs/qwen3-lora", "out/qwen3-lora-vllm", layout="per-expert", base="Qwen3-30B-A3B")
    >>> exported.ranks, exported.tensors
    ({'gate': 16, 'up': 16, 'down': 16}, 36864)
    ```
    """
    return run_adapter_export(AdapterExportArguments(
        adapter=str(adapter_dir), output_dir=None if output_dir is None else str(output_dir), layout=layout,
        base=None if base is None else str(base), overwrite=overwrite, allow_approximate=allow_approximate,
        **options))



def run_adapter_export(args: AdapterExportArguments) -> ExportedAdapter:
    """Export as `args` describe; see [`export_adapter`]."""
    output_dir = resolve_output_dir(args.output_dir or None, overwrite=args.overwrite,
                                    default=f"{str(args.adapter).rstrip('/')}-{args.layout}")
    config = read_adapter_config(args.adapter)
    base = open_base(args.base or default_base(config, args.adapter))
    adapter = read_adapter(args.adapter, base, args.lora_B_layout)
    if args.layout == "merged":
        path = write_merged(adapter, output_dir, args.overwrite, args.max_shard_size)
        ranks = adapter.ranks()
    else:
        approximations: list[str] = []
        if args.layout == "fused":
            fused = fused_parameters(adapter, approximations)
            tensors = {**fused_tensors(adapter, fused), **adapter.other_tensors}
            stripped = without_expert_patterns(adapter.config, adapter.expert_target_names(),
                                               adapter.other_target_names())
            new_config = fused_config(adapter, fused, stripped, approximations)
            ranks = {parameter: max(factors.rank for (_, name), factors in fused.items() if name == parameter)
                     for parameter in ("gate_up_proj", "down_proj") if any(name == parameter for _, name in fused)}
        else:
            tensors, new_config, rank = per_expert_adapter(adapter, approximations)
            ranks = dict.fromkeys(PROJECTIONS, rank)
        if approximations and not args.allow_approximate:
            more = f" (and {len(approximations) - 1} more)" if len(approximations) > 1 else ""
            raise ValueError(f"the {args.layout} form of {args.adapter} would be exact only up to float rounding: "
                             f"{approximations[0]}{more}; pass allow_approximate=True to accept. Nothing was written.")
        path = _write_adapter(output_dir, tensors, new_config, Path(args.adapter), args.overwrite)
    count, size = _weights_summary(path)
    logger.info("exported %s as %s to %s (ranks %s)", args.adapter, args.layout, path, ranks)
    return ExportedAdapter(path=path, layout=args.layout, ranks=ranks, tensors=count, bytes=size)


def _write_adapter(output_dir: Path, tensors: dict, config: dict, source: Path, overwrite: bool) -> Path:
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        # Per-expert tensors are views (gate and up of a fused adapter even share one A): safetensors wants each
        # tensor in its own memory.
        save_file({key: tensor.clone() for key, tensor in tensors.items()}, str(staging / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in COPIED_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, staging / name)
    return output_dir


def _weights_summary(folder: Path) -> tuple[int, int]:
    """(tensors, bytes) of the safetensors files in `folder`."""
    count = size = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            count += len(list(handle.keys()))
        size += path.stat().st_size
    return count, size
