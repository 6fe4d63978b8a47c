"""`upcycle()`: stream a dense Llama-family checkpoint into an hf_moe / hf_switch / hf_mh_moe model folder."""

import copy
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoints.names import DENSE_MLP_WEIGHT, SparseBlockNames
from ..checkpoints.reading import DenseCheckpoint
from ..checkpoints.writing import write_model_folder
from ..hub.upcycled import write_upcycled_card
from ..modeling.configuration_hf_moe import EXPERT_CHOICE_ROUTING
from .arguments import UpcycleArguments, output_dtype, prepare
from .experts import (
    copy_experts,
    drop_upcycle_experts,
    mh_moe_experts,
    split_experts,
    split_output_scale,
    virtual_group_router,
)
from .mixing import run_mix
from .routers import calibration_routers, random_router, zeros_router

logger = logging.getLogger(__name__)


def upcycle(source: str | None = None, output_dir: str | None = None, **options) -> Path:
    """Upcycle a dense Llama-family checkpoint (llama, mistral, qwen2, qwen3) into an MoE model folder.

    Options are the fields of [`UpcycleArguments`] (`arch`, `num_experts`, `top_k`, `moe_layers`, `expert_init`,
    `router_init`, ...). Tensors are streamed from safetensors and written as sharded safetensors into a temporary
    folder that is renamed to `output_dir` when complete. Returns the output folder.

    Example:
    ```python
    >>> from hf_moe import upcycle
    >>> folder = upcycle("path/to/llama", arch="hf_switch", num_experts=16, moe_layers="every_other",
    ...                  expert_init="drop_upcycle", output_dir="out/switch")
    >>> model = AutoModelForCausalLM.from_pretrained(folder)
    ```
    """
    return run_upcycle(UpcycleArguments(source=source, output_dir=output_dir, **options))


def _sparse_block_tensors(layer: int, gate, up, down, config, args, generator, calibrated) -> dict:
    """The tensors of decoder layer `layer`'s sparse block, built from its dense MLP."""
    num_experts, names = config.num_experts, SparseBlockNames(layer)
    width = config.hidden_size // config.num_subtokens
    tensors = {}
    if args.arch == "hf_mh_moe":
        gate_up, down_experts = mh_moe_experts(gate, up, down, num_experts, config.num_moe_heads)
        for name in ("head_proj", "merge_proj"):  # identity projections (separate tensors: safetensors refuses aliases)
            tensors[f"{names.prefix}.{name}.weight"] = torch.eye(config.hidden_size, dtype=gate.dtype)
            tensors[f"{names.prefix}.{name}.bias"] = torch.zeros(config.hidden_size, dtype=gate.dtype)
    elif args.expert_init == "copy":
        gate_up, down_experts = copy_experts(gate, up, down, num_experts, args.noise_std, generator)
    elif args.expert_init == "drop_upcycle":
        gate_up, down_experts = drop_upcycle_experts(gate, up, down, num_experts, args.drop_ratio, generator)
    else:
        scale = split_output_scale(num_experts, args.granularity, args.top_k, config.norm_topk_prob)
        gate_up, down_experts = split_experts(gate, up, down, num_experts, args.granularity, scale)

    if config.routing_kind == EXPERT_CHOICE_ROUTING:
        # A token's output is sum over the experts that took it of p * FFN(x); with near-uniform initial routers
        # p ~ 1/E and c experts per token on average, so E/c makes the expected output the dense FFN's.
        down_experts = down_experts * (num_experts / config.expert_capacity_factor)
        # No threshold estimated yet: until the first training forward, inference routes each token to its top-c
        # experts (the output then is about the dense model's), see `MoeExpertChoiceRouter`.
        tensors[names.expert_choice_threshold] = torch.zeros(num_experts, dtype=torch.float32)
        tensors[names.expert_choice_threshold_updates] = torch.zeros((), dtype=torch.long)
    # Split experts: one router row per virtual copy, repeated for its G shards.
    groups = args.granularity if args.expert_init == "split" else 1
    if args.router_init == "calibration":
        router = calibrated[layer]
    elif args.router_init == "zeros":
        router = zeros_router(num_experts // groups, width)
    else:
        router = random_router(num_experts // groups, width, args.router_init_std, generator)
    router = virtual_group_router(router, groups)
    tensors[names.router] = router.to(gate.dtype)
    tensors[names.gate_up_proj] = gate_up
    tensors[names.down_proj] = down_experts
    return tensors


def _calibrated_routers(args: UpcycleArguments, dense: DenseCheckpoint, config) -> dict[int, torch.Tensor]:
    if args.router_init != "calibration":
        return {}
    prompts = json.loads(Path(args.calibration_prompts).read_text())
    # Split experts share router rows within a virtual group: one prompt list per group.
    needed = args.num_experts // args.granularity if args.expert_init == "split" else args.num_experts
    if len(prompts) != needed:
        raise ValueError(f"`calibration_prompts` has {len(prompts)} prompt lists; {needed} are needed")
    return calibration_routers(dense.load_dense_model(), dense.load_tokenizer(), prompts,
                               config.sparse_layer_indices, config.num_subtokens)


def upcycled_tensors(dense_tensors: Iterable[tuple[str, torch.Tensor]], config, args: UpcycleArguments,
                     calibrated: dict[int, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Map the dense `(name, tensor)` stream to the upcycled model's tensors, one at a time.

    Everything but the MLPs of the sparse layers passes through unchanged; a sparse layer's gate/up/down are held
    until all three arrived, then replaced by its router and experts.
    """
    generator = torch.Generator().manual_seed(args.seed)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    sparse = set(config.sparse_layer_indices)
    pending: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in dense_tensors:
        tensor = tensor.to(dtype) if dtype is not None else tensor
        match = DENSE_MLP_WEIGHT.fullmatch(name)
        if match and int(match["layer"]) in sparse:
            layer = int(match["layer"])
            parts = pending.setdefault(layer, {})
            parts[match["proj"]] = tensor
            if len(parts) == 3:
                del pending[layer]
                yield from _sparse_block_tensors(layer, parts["gate_proj"], parts["up_proj"],
                                                 parts["down_proj"], config, args, generator, calibrated).items()
        elif not (name == "lm_head.weight" and config.tie_word_embeddings):
            yield name, tensor


def run_upcycle(args: UpcycleArguments, dense: DenseCheckpoint | None = None) -> Path:
    """Upcycle as described by `args`; see [`upcycle`]. `dense`: the source, if already opened (it is read once)."""
    if args.experts:
        return run_mix(args, dense)
    dense, config, output_dir = prepare(args, dense)
    args = copy.copy(args)  # the resolved dtype, without re-validating the user's choice
    args.dtype = output_dtype(args, dense)
    if args.breaks_equivalence:
        logger.warning("%s: this initialisation changes the dense model's function on purpose", output_dir)
    calibrated = _calibrated_routers(args, dense, config)
    progress = tqdm(dense.tensors(), total=len(dense.tensor_names), desc=f"upcycling -> {args.arch}", unit="tensor")
    write_model_folder(
        output_dir, upcycled_tensors(progress, config, args, calibrated), config, source_name=dense.name,
        overwrite=args.overwrite, max_shard_size=args.max_shard_size, **dense.tokenizer_sources(),
        finish=lambda staging, model: write_upcycled_card(staging, output_dir.name, model, args, dense,
                                                          config.dtype))
    logger.info("upcycled %s into %s", dense.name, output_dir)
    return output_dir

