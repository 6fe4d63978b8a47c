"""`export()`: stream an hf_moe model folder into a native Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint, or refuse."""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..checkpoints.atomic import resolve_output_dir
from ..checkpoints.names import HF_MOE_MODEL_TYPES, meta_model
from ..checkpoints.reading import ModelFolder, open_model_folder, stream_tensors
from ..checkpoints.writing import check_complete, write_model_folder
from ..hub.exported import write_export_card
from .base import ExportRefusedError, ExportTarget, common_blockers, dropped_training_settings
from .mixtral import MixtralTarget
from .qwen2_moe import Qwen2MoeTarget
from .qwen3_moe import Qwen3MoeTarget

logger = logging.getLogger(__name__)

# In `auto`'s order of preference: Mixtral is the most widely served; Qwen3-MoE needs q/k norm and Qwen2-MoE
# forbids it, so at most one Qwen type ever fits.
TARGETS: dict[str, ExportTarget] = {target.name: target for target in (MixtralTarget(), Qwen3MoeTarget(),
                                                                       Qwen2MoeTarget())}


@dataclass
class ExportArguments:
    source: str = field(metadata={"help": "hf_moe model folder (or its Hub id)"})
    output_dir: str | None = field(default=None, metadata={"help": "default: <source>-<target>"})
    to: str = field(default="auto", metadata={"help": "auto | mixtral | qwen2_moe | qwen3_moe (auto: the first "
                                                      "exact one of mixtral, qwen3_moe, qwen2_moe)"})
    base_model: str | None = field(default=None, metadata={
        "help": "Hub id of the hf_moe model, for the card's base_model (default: the source when it is a Hub id)"})
    max_shard_size: str = field(default="2GB", metadata={"help": "largest output shard"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})
    verify: bool = field(default=False, metadata={
        "help": "compare the hf_moe folder with the export loaded by stock transformers in a process without "
                "hf_moe: max |Δlogit| and greedy answers on sample prompts"})

    def __post_init__(self):
        if self.to != "auto" and self.to not in TARGETS:
            raise ValueError(f"`to`={self.to!r} is invalid: choose 'auto' or one of {tuple(TARGETS)}")


def export(source: str, output_dir: str | None = None, to: str = "auto", **options) -> Path:
    """Write the hf_moe model at `source` as an exactly equivalent native checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE).

    `to="auto"` picks the first exact target; a model no target reproduces exactly raises `ExportRefusedError`
    naming each blocking feature (and the option that would make it exportable, if any) before anything is written.
    Tensors are streamed into sharded safetensors in the per-expert layout of the Hub's Mixtral / Qwen-MoE
    checkpoints, in a temporary folder renamed to `output_dir` when complete. Returns the output folder.

    Example:
    ```python
    >>> import hf_moe
    >>> folder = hf_moe.export("out/SmolLM2-135M-Instruct-hf_moe-8x2", "out/smol-mixtral", to="mixtral")
    >>> model = AutoModelForCausalLM.from_pretrained(folder)  # stock transformers, no hf_moe needed
    ```
    """
    return run_export(ExportArguments(source=source, output_dir=output_dir, to=to, **options))


def choose_target(config, to: str = "auto", source: str = "the model") -> ExportTarget:
    """The target `to` (or the first exact one for "auto"); raise `ExportRefusedError` listing every blocker."""
    if to != "auto":
        if blockers := TARGETS[to].supports(config):
            reasons = "\n".join(f"  - {blocker}" for blocker in blockers)
            raise ExportRefusedError(f"cannot export {source} to {to} exactly:\n{reasons}\nNothing was written.")
        return TARGETS[to]
    common = common_blockers(config)
    sections = [("every target", common)] if common else []
    for name, target in TARGETS.items():
        specific = target.blockers(config)
        if not common and not specific:
            return target
        if specific:
            sections.append((name, specific))
    lines = [f"  {name}:\n" + "\n".join(f"    - {blocker}" for blocker in blockers) for name, blockers in sections]
    raise ExportRefusedError(f"no native architecture reproduces {source} exactly:\n" + "\n".join(lines)
                             + "\nNothing was written.")


def open_hf_moe_folder(source: str) -> ModelFolder:
    """Open `source`, or raise unless it is an hf_moe model folder."""
    folder = open_model_folder(source)
    if folder.model_type not in HF_MOE_MODEL_TYPES:
        raise ValueError(f"{source} is a '{folder.model_type}' model, not an hf_moe model "
                         f"(model_type one of {HF_MOE_MODEL_TYPES})")
    return folder


def run_export(args: ExportArguments) -> Path:
    """Export as described by `args`; see [`export`]."""
    folder = open_hf_moe_folder(args.source)
    config = folder.config
    target = choose_target(config, args.to, args.source)
    output_dir = resolve_output_dir(args.output_dir or None, overwrite=args.overwrite,
                                    default=f"{str(args.source).rstrip('/')}-{target.name}")
    weight_files = folder.weight_files
    source_model = meta_model(config)
    check_complete(set(weight_files), source_model, args.source)
    if dropped := dropped_training_settings(config):
        logger.warning("%s: training-only settings with no %s field are not carried over: %s", args.source,
                       target.name, "; ".join(dropped))
    progress = tqdm(stream_tensors(weight_files), total=len(weight_files), desc=f"exporting -> {target.name}",
                    unit="tensor")
    tensors = (mapped for name, tensor in progress for mapped in target.map_tensor(name, tensor, config))
    # The names on disk are the Hub's per-expert layout, not the fused one of transformers' modules: the source's
    # names were checked above instead.
    target_config = target.target_config(config)
    write_model_folder(
        output_dir, tensors, target_config, source_name=args.source, overwrite=args.overwrite,
        max_shard_size=args.max_shard_size, check_names=False, tokenizer_folder=folder.path,
        generation_config_from=target_config,
        finish=lambda staging, _: write_export_card(staging, output_dir.name, config, target, source_model,
                                                    base_model=args.base_model or folder.hub_id,
                                                    source_folder=folder.path, dropped=dropped))
    logger.info("exported %s to %s (%s)", args.source, output_dir, target.name)
    return output_dir
