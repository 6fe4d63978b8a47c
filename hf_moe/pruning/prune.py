"""`prune()`: a smaller MoE of the same architecture, written as a model folder — the N most salient experts of every
sparse layer (REAP, routing frequency or expert activation norm), or N merged experts (HC-SMoE).

Order of work: every check that can refuse (output folder, source, supported family, budget) → calibration (the model
in memory, one sequence at a time; released afterwards) → the plan per layer → the source tensors streamed from disk
(memory-mapped), each sparse layer's router rows and experts selected or merged (one layer's experts in memory at a
time), everything else copied → `hf_moe.checkpoints.write_model_folder` (sharded safetensors held one output shard at
a time, atomic) with pruning.json, the saliency heatmap and the model card.
"""

import copy
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedConfig

from ..checkpoints.atomic import resolve_output_dir
from ..checkpoints.lineage import hub_id
from ..checkpoints.names import (
    FUSED_EXPERTS_TENSOR,
    HF_MOE_MODEL_TYPES,
    PER_EXPERT_TENSOR,
    ROUTER_TENSOR,
    expected_tensor_names,
    meta_model,
)
from ..checkpoints.reading import folder_tokenizer, open_model_folder, stream_tensors
from ..checkpoints.writing import write_model_folder
from ..errors import UnsupportedCheckpointError
from ..moe_layers import (
    EXPERT_CHOICE_ROUTING,
    EXPERT_COUNT_FIELDS,
    RoutingGroups,
    expert_count_field,
    find_moe_layers,
    routing_groups,
)
from .arguments import PruneArguments
from .calibration import calibration_inputs
from .merge import merge_tensors, merging_plan
from .plan import LayerPlan, keep_count, pruning_plan
from .report import SALIENCY_HEATMAP, pruning_report, save_saliency_heatmap
from .saliency import ExpertSaliency, measure_saliency

logger = logging.getLogger(__name__)

# transformers' MoE families whose folders `prune` writes (and tests): the same tensors on disk as hf_moe's, fused
# or one set per expert, and one expert count per config.
TRANSFORMERS_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
SUPPORTED_MODEL_TYPES = (*HF_MOE_MODEL_TYPES, *TRANSFORMERS_MODEL_TYPES)
REPORT_FILE = "pruning.json"


@dataclass
class PruningSource:
    """A model folder opened for pruning: config, tensors on disk, and what its sparse layers route."""

    name: str  # as the user named it (a Hub id or a path)
    folder: Path
    hub_id: str | None
    config: PreTrainedConfig
    weight_files: dict[str, Path]
    count_field: str
    layers: list[int]  # decoder-layer indices of the sparse blocks
    num_experts: int
    top_k: int
    groups: RoutingGroups

    @property
    def modular_layout(self) -> bool:
        """Whether the tensors on disk carry the module names (fused experts), not one set per expert."""
        return set(self.weight_files) == expected_tensor_names(meta_model(self.config))


def open_source(name: str) -> PruningSource:
    """Open `name` for pruning, or raise naming why it cannot be pruned (dense, unsupported family, incomplete)."""
    folder = open_model_folder(name)
    model_type = folder.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        if not any(field in folder.config_json for field in EXPERT_COUNT_FIELDS):
            raise UnsupportedCheckpointError(f"{name} is a dense model (model_type {model_type!r}, no routed "
                                             "experts): there are no experts to prune")
        raise UnsupportedCheckpointError(f"{name}: model_type {model_type!r} is not supported for pruning; "
                                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    config = folder.config
    count_field = expert_count_field(config)
    layers = find_moe_layers(meta_model(config))
    if any(layer.routing_kind == EXPERT_CHOICE_ROUTING for layer in layers):
        raise UnsupportedCheckpointError(
            f"{name} routes by expert choice (`router_type`='expert_choice'): the saliency and merge weights are "
            "defined for token-choice top-k routers (a token's k gates); supported: hf_moe models with "
            "router_type 'softmax_topk' or 'noisy_topk', and the transformers families "
            f"{', '.join(TRANSFORMERS_MODEL_TYPES)}")
    if count_field is None or not layers:
        raise UnsupportedCheckpointError(f"{name} ({model_type}) has no sparse layer: there are no experts to prune")
    source = PruningSource(name=name, folder=folder.path, hub_id=folder.hub_id, config=config,
                           weight_files=folder.weight_files,
                           count_field=count_field, layers=[layer.index for layer in layers],
                           num_experts=getattr(config, count_field), top_k=layers[0].top_k,
                           groups=routing_groups(config))
    _check_tensors_on_disk(source)
    return source


def _check_tensors_on_disk(source: PruningSource) -> None:
    """Every sparse layer has its router and all its experts on disk (fused, or 0..E-1 one by one)."""
    routers, fused, per_expert = set(), set(), {}
    for name in source.weight_files:
        if match := ROUTER_TENSOR.fullmatch(name):
            routers.add(int(match["layer"]))
        elif match := PER_EXPERT_TENSOR.fullmatch(name):
            per_expert.setdefault(int(match["layer"]), set()).add(int(match["expert"]))
        elif match := FUSED_EXPERTS_TENSOR.fullmatch(name):
            fused.add(int(match["layer"]))
    for layer in source.layers:
        experts = per_expert.get(layer)
        if layer not in routers or (layer not in fused and experts != set(range(source.num_experts))):
            raise UnsupportedCheckpointError(
                f"{source.name}: sparse layer {layer}'s router or experts are not all on disk under the expected "
                f"names (router: {'found' if layer in routers else 'missing'}, experts found: "
                f"{'fused' if layer in fused else sorted(experts or [])}, expected {source.num_experts})")


def pruned_config(source: PruningSource, count: int) -> PreTrainedConfig:
    """The source's config with `count` routed experts per layer (validated for hf_moe types)."""
    config = copy.deepcopy(source.config)
    setattr(config, source.count_field, count)
    if hasattr(config, "validate") and config.model_type in HF_MOE_MODEL_TYPES:
        config.validate()
    return config


# ------------------------------------------------------------------------------------------------ tensors
def _read(weight_files: dict[str, Path], name: str) -> torch.Tensor:
    return next(stream_tensors({name: weight_files[name]}))[1]


def pruned_tensors(weight_files: dict[str, Path], plans: list[LayerPlan], num_experts: int
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """The source tensors with each planned layer's router rows and experts selected (and merged): new expert i is
    `plan.kept[i]`'s router rows and the weighted average of `plan.members[i]`. Other tensors pass unchanged."""
    by_layer = {plan.layer: plan for plan in plans}
    for name, tensor in stream_tensors(weight_files):
        match = ROUTER_TENSOR.fullmatch(name) or FUSED_EXPERTS_TENSOR.fullmatch(name) or \
            PER_EXPERT_TENSOR.fullmatch(name)
        plan = by_layer.get(int(match["layer"])) if match else None
        if plan is None:
            yield name, tensor
        elif match.re is PER_EXPERT_TENSOR:
            expert = int(match["expert"])
            if expert in plan.kept:
                position = plan.kept.index(expert)
                members = plan.members[position]
                tensors = [tensor] + [_read(weight_files, f"{match['block']}.experts.{member}.{match['name']}")
                                      for member in members[1:]]
                yield (f"{match['block']}.experts.{position}.{match['name']}",
                       merge_tensors(tensors, plan.weights[position]))
        else:  # a router tensor or fused experts: one row (slice) per expert along the first dimension
            if tensor.dim() == 0 or tensor.shape[0] != num_experts:
                raise UnsupportedCheckpointError(f"{name} has shape {tuple(tensor.shape)}; expected one row per "
                                                 f"expert ({num_experts}) in its first dimension")
            if match.re is ROUTER_TENSOR or all(len(members) == 1 for members in plan.members):
                yield name, tensor[list(plan.kept)]
            else:
                yield name, torch.stack([merge_tensors([tensor[member] for member in members], weights)
                                         for members, weights in zip(plan.members, plan.weights, strict=True)])


def write_pruned_folder(source: PruningSource, output_dir: str | Path, plans: list[LayerPlan], *,
                        overwrite: bool = False, max_shard_size: str | int = "2GB", report: dict | None = None,
                        saliency: ExpertSaliency | None = None,
                        method: str = "reap") -> Path:
    """Write the folder of `plans` (one per sparse layer, each keeping the same number of experts), with
    pruning.json (`report`), the saliency heatmap (from `saliency`) and the model card."""
    from ..hub.pruned import write_pruned_card

    counts = {len(plan.kept) for plan in plans}
    if len(counts) != 1 or {plan.layer for plan in plans} != set(source.layers):
        raise ValueError("a plan must keep the same number of experts in every sparse layer of the source")
    config = pruned_config(source, counts.pop())
    output_dir = Path(output_dir)
    source_bytes = sum(path.stat().st_size for path in set(source.weight_files.values()))

    def finish(staging: Path, model) -> None:
        data = dict(report or pruning_report(plans, source.num_experts, source.top_k))
        data["size_bytes"] = {"source": source_bytes,
                              "pruned": sum(path.stat().st_size for path in staging.glob("*.safetensors"))}
        if saliency is not None:
            save_saliency_heatmap(saliency.scores(method), saliency.layers, plans, staging / SALIENCY_HEATMAP,
                                  title=f"{method} saliency per layer (row max = 1); x: removed")
            data["heatmap"] = SALIENCY_HEATMAP
        (staging / REPORT_FILE).write_text(json.dumps(data, indent=1))
        write_pruned_card(staging, output_dir.name, config, model, source_name=source.name,
                          source_folder=source.folder, source_hub_id=source.hub_id, report=data)

    return write_model_folder(output_dir, pruned_tensors(source.weight_files, plans, source.num_experts), config,
                              source_name=source.name, overwrite=overwrite, max_shard_size=max_shard_size,
                              check_names=source.modular_layout, tokenizer_folder=source.folder, finish=finish)


# ------------------------------------------------------------------------------------------------ the run
def _default_output_dir(args: PruneArguments, count: int) -> Path:
    return Path(f"{str(args.source).rstrip('/')}-{'merged' if args.merge else args.method}-{count}")


def run_prune(args: PruneArguments, *, model=None, tokenizer=None, calibration=None,
              saliency: ExpertSaliency | None = None, source_name: str | None = None) -> Path:
    """Prune (or merge) as `args` says; see [`prune`]. `model`: the source already in memory (else loaded for
    calibration), `calibration`: token-id sequences overriding `args.calibration`, `saliency`: statistics measured
    before (then no calibration runs), `source_name`: how the card names the source when `args.source` is a
    temporary copy."""
    source = open_source(args.source)
    if source_name is not None:
        source.name, source.hub_id = source_name, hub_id(source_name)
    count = keep_count(args.keep, source.num_experts, source.top_k, source.groups)
    output_dir = resolve_output_dir(args.output_dir or None, overwrite=args.overwrite,
                                    default=_default_output_dir(args, count))
    tokenizer = tokenizer if tokenizer is not None else folder_tokenizer(source.folder)
    if saliency is None:
        inputs, description = calibration_inputs(tokenizer, calibration if calibration is not None
                                                 else args.calibration, args.calibration_samples, args.max_length,
                                                 args.calibration_split, args.seed)
        # Routing frequency needs the routers' choices only: no expert runs beyond the model's own forward.
        options = dict(with_outputs=args.merge, expert_norms=args.method != "frequency", source=description)
        if model is None:
            dtype = torch.float32 if args.calibration_dtype == "float32" else "auto"
            calibration_model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype)
            saliency = measure_saliency(calibration_model, inputs, **options)
            del calibration_model  # writing reads the tensors from disk: the model's memory is free again
        else:
            saliency = measure_saliency(model, inputs, **options)
    if saliency.layers != source.layers or saliency.num_experts != source.num_experts:
        raise ValueError(f"the saliency covers layers {saliency.layers} with {saliency.num_experts} experts; "
                         f"{args.source} has sparse layers {source.layers} with {source.num_experts}")
    if args.merge:
        plans = merging_plan(saliency, count, source.groups)
    else:
        plans = pruning_plan(saliency.scores(args.method), saliency.layers, count, source.groups)
    report = pruning_report(plans, source.num_experts, source.top_k, method=args.method, merge=args.merge,
                            keep=args.keep, saliency=saliency)
    folder = write_pruned_folder(source, output_dir, plans, overwrite=args.overwrite,
                                 max_shard_size=args.max_shard_size, report=report,
                                 saliency=saliency, method=args.method)
    logger.info("pruned %s to %s: %d of %d experts per sparse layer", args.source, folder, count, source.num_experts)
    return folder


def prune(model_or_folder, output_dir: str | Path | None = None, keep: int | float | str = 0.5,
          method: str = "reap", merge: bool = False, calibration=None, *, tokenizer=None,
          saliency: ExpertSaliency | None = None, **options) -> Path:
    """Write a smaller MoE of the same architecture to `output_dir`: `keep` experts per sparse layer (a count, or a
    ratio of the experts), chosen by `method` ("reap", "frequency", "ean_sum" or "ean_mean") on `calibration` data,
    or with `merge=True` the experts merged into that many (HC-SMoE). Router rows and experts are removed together
    and the config's expert count follows; shared experts and everything else are copied. Returns the output
    folder.

    `model_or_folder`: an hf_moe, Mixtral, Qwen2/3-MoE, OLMoE or DeepSeek-V3 model folder (or Hub id), or such a model
    in memory (with its `tokenizer`, unless `calibration` is token ids). `calibration`: None (the embedded task
    mixture), a datasets name or .json/.jsonl file, or a list of token-id sequences. Other options are the fields of
    [`PruneArguments`] (`calibration_samples`, `max_length`, `overwrite`, `max_shard_size`, `seed`, ...). A bad request
    (keep >= the experts, keep < top-k, a dense model, an existing output) raises before anything is written.

    Example:
    ```python
    >>> import hf_moe
    >>> folder = hf_moe.prune("out/smol-moe", "out/smol-moe-reap4", keep=4, method="reap")
    >>> json.loads((folder / "pruning.json").read_text())["plan"][0]["kept"]
    ```
    """
    is_named = isinstance(calibration, (str, Path))
    calibration_option, token_ids = (str(calibration), None) if is_named else (None, calibration)
    arguments = dict(keep=str(keep), method=method, merge=merge, calibration=calibration_option, **options)
    if not isinstance(model_or_folder, (str, Path)):
        if output_dir is None:
            raise ValueError("pruning a model in memory needs `output_dir`")
        model = model_or_folder
        with tempfile.TemporaryDirectory(prefix="hf_moe_prune_") as scratch:
            model.save_pretrained(scratch)
            if tokenizer is None and Path(str(model.name_or_path)).is_dir():
                tokenizer = folder_tokenizer(Path(model.name_or_path))
            if tokenizer is not None:
                tokenizer.save_pretrained(scratch)
            args = PruneArguments(source=scratch, output_dir=str(output_dir), **arguments)
            return run_prune(args, model=model, tokenizer=tokenizer, calibration=token_ids, saliency=saliency,
                             source_name=str(model.name_or_path or type(model).__name__))
    args = PruneArguments(source=str(model_or_folder), output_dir=None if output_dir is None else str(output_dir),
                          **arguments)
    return run_prune(args, tokenizer=tokenizer, calibration=token_ids, saliency=saliency)
