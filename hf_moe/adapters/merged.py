"""The merged form: the base's own checkpoint with every LoRA delta added, in the base's layout on disk.

The base's tensors are streamed one at a time (`hf_moe.checkpoints`) and a tensor an adapter changes gets its delta
in float32, then its own dtype back: fused experts (hf_moe, gpt-oss: `experts.gate_up_proj` whole, gpt-oss transposed
and interleaved), per-expert experts (what transformers 5.x saves for Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3:
`experts.3.w1.weight`), and every other LoRA pair's module weight (attention...). The folder is written like every
hf_moe output (sharded safetensors, atomic; for hf_moe types the remote code and an hf_moe card).
"""

import copy
from collections.abc import Iterator
from pathlib import Path

import torch

from ..checkpoints.names import FUSED_EXPERTS_TENSOR, HF_MOE_MODEL_TYPES, PER_EXPERT_TENSOR
from ..checkpoints.reading import stream_tensors
from ..checkpoints.writing import write_model_folder
from .canonical import ExpertAdapter
from .fused import join_gate_up
from .names import LORA_KEY, PEFT_PREFIX, PER_EXPERT_PROJECTIONS
from .peft_config import target_scaling


def _other_deltas(adapter: ExpertAdapter) -> dict[str, torch.Tensor]:
    """{weight name: delta} of every non-expert LoRA pair; anything else in the adapter cannot be merged."""
    config = adapter.config
    for flag in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if config.get(flag):
            raise ValueError(f"cannot merge an adapter with `{flag}`=True; export it as 'fused' or 'per-expert'")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.other_tensors.items():
        match = LORA_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"cannot merge {key}: only LoRA pairs (lora_A / lora_B weights) are merged; export it as "
                             "'fused' or 'per-expert'")
        pairs.setdefault(match["module"].removeprefix(PEFT_PREFIX), {})[match["factor"]] = tensor
    parameters = config.get("target_parameters") or []
    deltas = {}
    for module, factors in sorted(pairs.items()):
        if set(factors) != {"A", "B"}:
            raise ValueError(f"{module}: a LoRA factor without its partner")
        # A LoRA on a bare parameter (a router's `weight`) is saved under its module's name; peft's patterns see
        # the parameter's.
        weight = f"{module}.weight"
        is_parameter = any(weight == name or weight.endswith(f".{name}") for name in parameters)
        rank, scaling = target_scaling(config, weight if is_parameter else module)
        a, b = factors["A"], factors["B"]
        if a.shape[0] != rank:
            raise ValueError(f"{module}: rank {a.shape[0]}, but adapter_config.json gives rank {rank} (rank mismatch)")
        deltas[weight] = scaling * (b.float() @ a.float())
    return deltas


def _expert_deltas(adapter: ExpertAdapter) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {projection: (E, out, in) float32}}."""
    return {index: {projection: factors.delta() for projection, factors in projections.items()}
            for index, projections in adapter.experts.items()}


def merged_tensors(adapter: ExpertAdapter, others: dict[str, torch.Tensor], applied: set
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's tensors with the deltas added (`others`: the non-expert deltas by weight name); `applied` collects
    what each delta landed on."""
    family = adapter.base.family
    experts = _expert_deltas(adapter)
    for name, tensor in stream_tensors(adapter.base.folder.weight_files):
        delta = None
        if name in others:
            delta = others[name]
            applied.add(name)
        elif (match := FUSED_EXPERTS_TENSOR.fullmatch(name)) and int(match["layer"]) in experts and match["name"] in (
                "gate_up_proj", "down_proj"):
            deltas = experts[int(match["layer"])]
            if match["name"] == "down_proj" and "down" in deltas:
                delta = deltas["down"]
            elif match["name"] == "gate_up_proj" and "gate" in deltas:
                delta = join_gate_up(deltas["gate"], deltas["up"], family.interleaved_gate_up)
            if delta is not None:
                delta = delta.transpose(1, 2) if family.transposed else delta  # gpt-oss stores (E, in, out)
                applied.update((int(match["layer"]), projection, expert) for expert in range(delta.shape[0])
                               for projection in (("down",) if match["name"] == "down_proj" else ("gate", "up")))
        elif (match := PER_EXPERT_TENSOR.fullmatch(name)) and int(match["layer"]) in experts:
            projection_name, _, suffix = match["name"].partition(".")
            projection = PER_EXPERT_PROJECTIONS.get(projection_name)
            deltas = experts[int(match["layer"])]
            if suffix == "weight" and projection in deltas:
                delta = deltas[projection][int(match["expert"])]
                applied.add((int(match["layer"]), projection, int(match["expert"])))
        if delta is not None:
            if delta.shape != tensor.shape:
                raise ValueError(f"the base's {name} is {tuple(tensor.shape)} but the adapter's delta for it is "
                                 f"{tuple(delta.shape)} (wrong base)")
            tensor = (tensor.float() + delta).to(tensor.dtype)
        yield name, tensor


def expected_targets(adapter: ExpertAdapter, others: dict[str, torch.Tensor]) -> set:
    """Everything a merge must land on: each expert's projection, each other module's weight."""
    targets = {(index, projection, expert) for index, projections in adapter.experts.items()
               for projection in projections for expert in range(adapter.base.layers[index].num_experts)}
    return targets | set(others)


def write_merged(adapter: ExpertAdapter, output_dir: Path, overwrite: bool, max_shard_size: str | int
                 ) -> Path:
    """Write the merged model folder; a delta the base has no tensor for raises and leaves nothing behind."""
    base = adapter.base
    if getattr(base.config, "quantization_config", None):
        raise ValueError(f"the base {base.folder.source} is stored quantised: merge into a full-precision copy of it")
    config = copy.deepcopy(base.config)
    others = _other_deltas(adapter)  # refuses what cannot be merged before anything is written
    expected = expected_targets(adapter, others)
    applied: set = set()

    def finish(staging: Path, model) -> None:
        missing = expected - applied
        if missing:
            raise ValueError(f"the base {base.folder.source} has no tensor for the adapter's "
                             f"{sorted(map(str, missing))[0]} (wrong base)")
        if config.model_type in HF_MOE_MODEL_TYPES:
            _write_card(staging, output_dir.name, config, model, adapter)

    return write_model_folder(output_dir, merged_tensors(adapter, others, applied), config,
                              source_name=str(base.folder.source), overwrite=overwrite, max_shard_size=max_shard_size,
                              check_names=False, tokenizer_folder=base.path, finish=finish)


def _write_card(folder: Path, model_name: str, config, model, adapter: ExpertAdapter) -> None:
    from ..checkpoints.lineage import display_name, lineage_of
    from ..hub.card import render_card, write_card

    lineage = lineage_of(adapter.base.folder.hub_id or adapter.base.path)
    summary = (f"An hf_moe `{config.model_type}` model: the base `{display_name(adapter.base.folder.source)}` with "
               f"the LoRA adapter `{display_name(adapter.source)}` merged into its weights (the routed experts' "
               "deltas included), made with `hf_moe.adapters.export_adapter(..., layout='merged')`.")
    write_card(folder, render_card("saved", config, model=model, model_name=model_name, lineage=lineage,
                                   summary=summary, extra_tags=("lora-merged",)))
