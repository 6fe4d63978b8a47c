"""Experts from several dense checkpoints of one base (Branch-Train-MiX, arXiv 2403.07816; mergekit-moe).

Expert i of every sparse layer is the MLP of source i (a source may repeat); attention, embeddings, norms and the
MLPs of layers that stay dense come from the base or are averaged over the sources (`merge_others`). Every source
must have the base's architecture, config and tensor shapes; a mismatch names the source and the tensor before
anything is written. Tensors are read one at a time (memory-mapped safetensors, one shard open per source).
"""

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from ..checkpoints.names import DENSE_MLP_WEIGHT, SparseBlockNames
from ..checkpoints.reading import DenseCheckpoint
from ..checkpoints.writing import write_model_folder
from ..errors import UnsupportedCheckpointError
from ..hub.upcycled import write_upcycled_card
from .arguments import output_dtype, prepare
from .config_mapping import dense_decoder_fields
from .experts import fuse_experts
from .routers import calibration_routers, random_router, zeros_router
from .sources import open_dense_checkpoint

logger = logging.getLogger(__name__)
MIX_FILE = "mixing.json"


class SourceReader:
    """`get(name)` from one dense checkpoint, keeping at most one of its shards open."""

    def __init__(self, checkpoint: DenseCheckpoint):
        self.checkpoint = checkpoint
        self._path: Path | None = None
        self._handle = None

    def _open(self, name: str):
        path = self.checkpoint.weight_files[name]
        if path != self._path:
            self._handle = safe_open(str(path), framework="pt")
            self._path = path
        return self._handle

    def shape(self, name: str) -> tuple[int, ...]:
        if self.checkpoint.in_memory is not None:
            return tuple(self.checkpoint.in_memory[name].shape)
        return tuple(self._open(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if self.checkpoint.in_memory is not None:
            return self.checkpoint.in_memory[name]
        return self._open(name).get_tensor(name)


def open_sources(base: DenseCheckpoint, experts: list[str], gguf_file: str | None = None
                 ) -> tuple[SourceReader, dict[str, SourceReader]]:
    """Open every distinct expert source and check it against the base: same model type and decoder config, same
    tensor names and shapes. Raises `UnsupportedCheckpointError` naming the source and the field or tensor."""
    base_reader = SourceReader(base)
    base_fields = dense_decoder_fields(base.config)
    base_names = set(base.tensor_names)
    readers = {}
    for source in dict.fromkeys(experts):
        if source == base.name:
            readers[source] = base_reader
            continue
        checkpoint = open_dense_checkpoint(source, gguf_file)
        if checkpoint.config.model_type != base.config.model_type:
            raise UnsupportedCheckpointError(
                f"expert source {source}: model type '{checkpoint.config.model_type}' differs from the base's "
                f"'{base.config.model_type}' ({base.name}); all sources must be fine-tunes of one base")
        fields = dense_decoder_fields(checkpoint.config)
        for key, value in base_fields.items():
            if fields[key] != value and key not in ("bos_token_id", "eos_token_id", "pad_token_id"):
                raise UnsupportedCheckpointError(
                    f"expert source {source}: config `{key}`={fields[key]!r} differs from the base's {value!r} "
                    f"({base.name})")
        reader = SourceReader(checkpoint)
        names = set(checkpoint.tensor_names)
        if names != base_names:
            raise UnsupportedCheckpointError(
                f"expert source {source}: tensors differ from the base's ({base.name}); missing: "
                f"{sorted(base_names - names)[:5]}, unexpected: {sorted(names - base_names)[:5]}")
        for name in base.tensor_names:
            if reader.shape(name) != base_reader.shape(name):
                raise UnsupportedCheckpointError(
                    f"expert source {source}: tensor {name} has shape {list(reader.shape(name))}, the base "
                    f"({base.name}) has {list(base_reader.shape(name))}")
        readers[source] = reader
    return base_reader, readers


def merged_tensor(name: str, base: SourceReader, readers: dict[str, SourceReader], merge_others: str) -> torch.Tensor:
    """A non-expert tensor: the base's, or the mean over the distinct sources (float64 sum: identical sources give
    back the very same tensor)."""
    if merge_others == "base":
        return base.get(name)
    tensors = [reader.get(name) for reader in readers.values()]
    return (sum(t.double() for t in tensors) / len(tensors)).to(tensors[0].dtype)


def mixed_sparse_block(layer: int, experts: list[str], readers: dict[str, SourceReader], router: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
    """Router and fused experts of one sparse layer: expert i is the MLP of `experts[i]`."""
    names = SparseBlockNames(layer)
    gates, ups, downs = ([readers[source].get(f"{names.prefix}.{proj}.weight") for source in experts]
                         for proj in ("gate_proj", "up_proj", "down_proj"))
    gate_up, down = fuse_experts(torch.stack(gates), torch.stack(ups), torch.stack(downs))
    return {names.router: router.to(gates[0].dtype), names.gate_up_proj: gate_up, names.down_proj: down}


def mixed_tensors(base: SourceReader, readers: dict[str, SourceReader], config, experts: list[str],
                  merge_others: str, routers: dict[int, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The mixed model's tensors in the base's storage order, one sparse block at a time."""
    sparse = set(config.sparse_layer_indices)
    for name in base.checkpoint.tensor_names:
        match = DENSE_MLP_WEIGHT.fullmatch(name)
        if match and int(match["layer"]) in sparse:
            if match["proj"] == "gate_proj":
                layer = int(match["layer"])
                yield from mixed_sparse_block(layer, experts, readers, routers[layer]).items()
            continue
        if not (name == "lm_head.weight" and config.tie_word_embeddings):
            yield name, merged_tensor(name, base, readers, merge_others)


def merge_model(base: SourceReader, readers: dict[str, SourceReader], merge_others: str):
    """The dense model whose hidden states calibrate the routers: the base, or all weights averaged over the
    sources. Its layer-0 MLP input is exactly the mixed model's (same embeddings and attention)."""
    if merge_others == "base" and base.checkpoint.in_memory is None:
        return base.checkpoint.load_dense_model()
    model = AutoModelForCausalLM.from_config(base.checkpoint.config)
    state = {name: merged_tensor(name, base, readers, merge_others).float() for name in base.checkpoint.tensor_names}
    model.load_state_dict(state, strict=False)  # strict=False: a tied lm_head is not stored
    return model.eval()


def mix_routers(args, config, base: SourceReader, readers, prompts: list[list[str]] | None) -> dict[int, torch.Tensor]:
    """One router per sparse layer: calibrated from one prompt list per expert, or random / zeros."""
    layers = config.sparse_layer_indices
    if args.router_init == "calibration":
        model = merge_model(base, readers, args.merge_others)
        return calibration_routers(model, base.checkpoint.load_tokenizer(), prompts, layers)
    generator = torch.Generator().manual_seed(args.seed)
    if args.router_init == "zeros":
        return {layer: zeros_router(config.num_experts, config.hidden_size) for layer in layers}
    return {layer: random_router(config.num_experts, config.hidden_size, args.router_init_std, generator)
            for layer in layers}


def expert_domains(experts: list[str], prompts: list[list[str]] | None) -> list[int]:
    """Expert i's domain: the first expert with the same source and prompts (repeated experts share a domain)."""
    keys = [(source, json.dumps(prompts[i]) if prompts else "") for i, source in enumerate(experts)]
    return [keys.index(key) for key in keys]


@torch.no_grad()
def routing_accuracy(model, tokenizer, heldout: list[list[str]], domains: list[int]) -> dict:
    """Per sparse layer and per expert, the fraction of that expert's held-out prompts whose top expert (router
    probabilities averaged over the prompt's tokens) belongs to the expert's domain."""
    per_layer: dict[int, list[float]] = {}
    layers = model.config.sparse_layer_indices
    for expert, prompts in enumerate(heldout):
        hits = torch.zeros(len(layers))
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            logits = model(input_ids=ids, output_router_logits=True).router_logits
            for position, layer_logits in enumerate(logits):
                top = int(layer_logits.float().softmax(-1).mean(0).argmax())
                hits[position] += domains[top] == domains[expert]
        for position, layer in enumerate(layers):
            per_layer.setdefault(layer, []).append(hits[position].item() / max(len(prompts), 1))
    best = max(per_layer, key=lambda layer: (sum(per_layer[layer]), -layer))
    return {"layers": {str(layer): rows for layer, rows in per_layer.items()}, "first_layer": str(layers[0]),
            "best_layer": str(best), "heldout_prompts": [len(p) for p in heldout]}


def load_prompt_lists(path: str | None, num_experts: int, what: str) -> list[list[str]] | None:
    if path is None:
        return None
    prompts = json.loads(Path(path).read_text())
    if len(prompts) != num_experts or any(not isinstance(p, list) or not p for p in prompts):
        raise ValueError(f"`{what}` ({path}) has {len(prompts)} prompt lists; one non-empty list per expert "
                         f"({num_experts}) is needed")
    return prompts


def run_mix(args, dense: DenseCheckpoint | None = None) -> Path:
    """Upcycle with expert i from `args.experts[i]` and the rest from `args.source` (the base) or the sources'
    average; see [`upcycle`]. Writes `mixing.json` (sources, routing accuracy); the card shows the routing accuracy."""
    dense, config, output_dir = prepare(args, dense)
    prompts = load_prompt_lists(args.calibration_prompts, len(args.experts), "calibration_prompts")
    heldout = load_prompt_lists(args.heldout_prompts, len(args.experts), "heldout_prompts")
    base, readers = open_sources(dense, args.experts, args.gguf_file)
    routers = mix_routers(args, config, base, readers, prompts)
    resolved_dtype = output_dtype(args, dense)
    dtype = None if resolved_dtype == "auto" else getattr(torch, resolved_dtype)
    record = {"base": dense.name, "experts": args.experts, "merge_others": args.merge_others,
              "router_init": args.router_init}

    def finish(staging: Path, model) -> None:
        if heldout is not None:
            loaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
            record["routing_accuracy"] = routing_accuracy(loaded, dense.load_tokenizer(), heldout,
                                                          expert_domains(args.experts, prompts))
        write_upcycled_card(staging, output_dir.name, model, args, dense, config.dtype,
                            routing_accuracy=record.get("routing_accuracy"))
        (staging / MIX_FILE).write_text(json.dumps(record, indent=1))

    stream = mixed_tensors(base, readers, config, args.experts, args.merge_others, routers)
    progress = tqdm(stream, desc=f"mixing {len(args.experts)} experts", unit="tensor")
    write_model_folder(output_dir, ((name, tensor.to(dtype) if dtype is not None else tensor)
                                    for name, tensor in progress), config, source_name=dense.name,
                       overwrite=args.overwrite, max_shard_size=args.max_shard_size, **dense.tokenizer_sources(),
                       finish=finish)
    logger.info("mixed %d experts into %s", len(args.experts), output_dir)
    return output_dir
