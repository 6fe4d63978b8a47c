"""`upcycle()`: stream a dense Llama-family checkpoint into an hf_moe / hf_switch / hf_mh_moe model folder."""

import copy
import json
import logging
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from ..atomic import atomic_output_dir
from ..auto import meta_model
from ..errors import OutputExistsError
from ..hub.upcycled import source_lineage, write_upcycled_card
from ..modeling import MODEL_CLASSES, configuration_hf_moe, modeling_hf_moe
from ..modeling.modeling_hf_moe import auto_map_for
from .config_mapping import ARCHITECTURES, parse_moe_layers, upcycled_config
from .experts import (
    EXPERT_INITS,
    copy_experts,
    drop_upcycle_experts,
    mh_moe_experts,
    split_experts,
    split_output_scale,
    virtual_group_router,
)
from .routers import ROUTER_INITS, calibration_routers, random_router, zeros_router
from .sources import TOKENIZER_FILES, DenseCheckpoint, UnsupportedCheckpointError, open_dense_checkpoint
from .writer import ShardedSafetensorsWriter, parse_size

logger = logging.getLogger(__name__)
OUTPUT_DTYPES = ("auto", "bfloat16", "float16", "float32")
MLP_WEIGHT = re.compile(r"model\.layers\.(?P<layer>\d+)\.mlp\.(?P<proj>gate_proj|up_proj|down_proj)\.weight")


@dataclass
class UpcycleArguments:
    source: str | None = field(default=None, metadata={
        "help": "dense checkpoint: local folder, Hub id, .gguf file; empty = the embedded SmolLM2-135M-Instruct"})
    output_dir: str | None = field(default=None, metadata={"help": "default: out/<source>-<arch>-<E>x<k>"})
    arch: str = field(default="hf_moe", metadata={"help": "hf_moe | hf_switch | hf_mh_moe"})
    num_experts: int = field(default=8, metadata={"help": "experts per sparse layer"})
    top_k: int | None = field(default=None, metadata={"help": "experts per token (default 2; Switch: 1)"})
    moe_layers: str = field(default="all", metadata={"help": "all | every_other | comma-separated layer indices"})
    expert_init: str = field(default="copy", metadata={
        "help": "copy (arXiv 2212.05055) | drop_upcycle (arXiv 2502.19261) | split (arXiv 2410.07524)"})
    noise_std: float = field(default=0.0, metadata={"help": "copy: noise std relative to each matrix's std"})
    drop_ratio: float = field(default=0.5, metadata={"help": "drop_upcycle: fraction of neurons re-initialised"})
    granularity: int = field(default=1, metadata={"help": "split: shards per dense MLP (expert size I/G)"})
    router_init: str = field(default="random", metadata={"help": "random | zeros | calibration"})
    router_init_std: float = field(default=0.02, metadata={"help": "random: std of the router weights"})
    calibration_prompts: str | None = field(default=None, metadata={
        "help": "calibration: JSON file with one list of prompts per expert"})
    num_moe_heads: int = field(default=4, metadata={"help": "hf_mh_moe: sub-tokens per token"})
    capacity_factor: float | None = field(default=None, metadata={
        "help": "training capacity factor of the upcycled model; empty = dropless (default: a dropped token loses "
                "an MLP the dense model relied on); 1.25 = Switch-style"})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside the source folder"})
    dtype: str = field(default="auto", metadata={
        "help": "auto | bfloat16 | float16 | float32; auto = the dtype the source declares (GGUF: bfloat16, as "
                "GGUF files do not record the original dtype), else the stored one"})
    max_shard_size: str = field(default="2GB", metadata={"help": "largest output shard"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})
    seed: int = field(default=0)
    verify: bool = field(default=False, metadata={"help": "compare dense and upcycled logits and generations"})
    experts: list[str] | None = field(default=None, metadata={
        "help": "mix: expert i's MLP from source i (folders, .gguf files, Hub ids; may repeat); SOURCE is the base"})
    merge_others: str = field(default="base", metadata={
        "help": "mix: attention, embeddings, norms, dense MLPs from the base | average of the expert sources (BTX)"})
    heldout_prompts: str | None = field(default=None, metadata={
        "help": "mix: JSON file, one list of held-out prompts per expert, for the routing accuracy"})

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"`arch`={self.arch!r} is invalid: choose one of {tuple(ARCHITECTURES)}")
        if self.expert_init not in EXPERT_INITS:
            raise ValueError(f"`expert_init`={self.expert_init!r} is invalid: choose one of {EXPERT_INITS}")
        if self.router_init not in ROUTER_INITS:
            raise ValueError(f"`router_init`={self.router_init!r} is invalid: choose one of {ROUTER_INITS}")
        if self.router_init == "calibration" and not self.calibration_prompts:
            raise ValueError("`router_init`='calibration' needs `calibration_prompts` (a JSON file)")
        if self.arch == "hf_mh_moe" and self.expert_init != "copy":
            raise ValueError(f"`expert_init`={self.expert_init!r} is invalid for hf_mh_moe: only 'copy' (experts "
                             "from sub-space blocks of the dense MLP)")
        if self.top_k is None:
            self.top_k = 1 if self.arch == "hf_switch" else 2
        if self.dtype not in OUTPUT_DTYPES:
            raise ValueError(f"`dtype`={self.dtype!r} is invalid: choose one of {OUTPUT_DTYPES}")

    @property
    def breaks_equivalence(self) -> bool:
        """Whether the chosen init changes the dense model's function on purpose."""
        return (bool(self.experts) or self.arch == "hf_mh_moe" or self.expert_init == "drop_upcycle" or self.noise_std > 0
                or (self.expert_init == "split" and self.top_k % self.granularity != 0))


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


def default_output_dir(args: UpcycleArguments, dense: DenseCheckpoint) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(dense.name).name)
    return Path("out") / f"{name}-{args.arch}-{args.num_experts}x{args.top_k}"


def _sparse_block_tensors(prefix: str, gate, up, down, config, args, generator, calibrated) -> dict:
    """The tensors of one sparse block built from one dense MLP."""
    num_experts, layer = config.num_experts, int(prefix.rsplit(".", 1)[-1])
    width = config.hidden_size // config.num_subtokens
    tensors = {}
    if args.arch == "hf_mh_moe":
        gate_up, down_experts = mh_moe_experts(gate, up, down, num_experts, config.num_moe_heads)
        for name in ("head_proj", "merge_proj"):  # identity projections (separate tensors: safetensors refuses aliases)
            tensors[f"{prefix}.mlp.{name}.weight"] = torch.eye(config.hidden_size, dtype=gate.dtype)
            tensors[f"{prefix}.mlp.{name}.bias"] = torch.zeros(config.hidden_size, dtype=gate.dtype)
    elif args.expert_init == "copy":
        gate_up, down_experts = copy_experts(gate, up, down, num_experts, args.noise_std, generator)
    elif args.expert_init == "drop_upcycle":
        gate_up, down_experts = drop_upcycle_experts(gate, up, down, num_experts, args.drop_ratio, generator)
    else:
        scale = split_output_scale(num_experts, args.granularity, args.top_k, config.norm_topk_prob)
        gate_up, down_experts = split_experts(gate, up, down, num_experts, args.granularity, scale)

    # Split experts: one router row per virtual copy, repeated for its G shards.
    groups = args.granularity if args.expert_init == "split" else 1
    if args.router_init == "calibration":
        router = calibrated[layer]
    elif args.router_init == "zeros":
        router = zeros_router(num_experts // groups, width)
    else:
        router = random_router(num_experts // groups, width, args.router_init_std, generator)
    router = virtual_group_router(router, groups)
    tensors[f"{prefix}.mlp.gate.weight"] = router.to(gate.dtype)
    tensors[f"{prefix}.mlp.experts.gate_up_proj"] = gate_up
    tensors[f"{prefix}.mlp.experts.down_proj"] = down_experts
    return tensors


def _expected_tensor_names(model) -> set[str]:
    names = set(model.state_dict())
    if model.config.tie_word_embeddings:
        names.discard("lm_head.weight")
    return names


def _copy_tokenizer_and_generation_config(dense: DenseCheckpoint, staging: Path) -> None:
    if dense.gguf_file is not None:
        dense.load_tokenizer().save_pretrained(staging)
        GenerationConfig.from_model_config(dense.config).save_pretrained(staging)
        return
    for file_name in TOKENIZER_FILES:
        if (dense.folder / file_name).is_file():
            shutil.copy2(dense.folder / file_name, staging / file_name)


def _save_config_and_code(config, staging: Path) -> None:
    config.auto_map = auto_map_for(type(config))
    config.architectures = [MODEL_CLASSES[type(config)]["AutoModelForCausalLM"].__name__]
    config.save_pretrained(staging)  # also copies configuration_hf_moe.py (the config's _auto_class)
    for module in (configuration_hf_moe, modeling_hf_moe):
        shutil.copy2(module.__file__, staging / Path(module.__file__).name)


def output_dtype(args: UpcycleArguments, dense: DenseCheckpoint) -> str:
    """The weights dtype of the output: `args.dtype`, or for "auto" the source's declared dtype (GGUF: bfloat16);
    "auto" again when the source declares none (the stored dtypes are kept)."""
    if args.dtype != "auto":
        return args.dtype
    if dense.gguf_file is not None:
        return "bfloat16"
    declared = getattr(dense.config, "dtype", None)
    return str(declared).removeprefix("torch.") if declared is not None else "auto"


def prepare(args: UpcycleArguments, dense: DenseCheckpoint | None = None
            ) -> tuple[DenseCheckpoint, configuration_hf_moe.MoeConfig, Path]:
    """Open the source (unless already opened) and build the target config and output path; fails before anything
    is written."""
    dense = dense or open_dense_checkpoint(args.source, args.gguf_file)
    sparse_layers = parse_moe_layers(args.moe_layers, dense.config.num_hidden_layers)
    intermediate = dense.config.intermediate_size
    moe_intermediate = intermediate // args.granularity if args.expert_init == "split" else intermediate
    config = upcycled_config(dense.config, args.arch, args.num_experts, args.top_k, sparse_layers,
                             moe_intermediate, args.num_moe_heads, base_model=source_lineage(dense).base_model,
                             capacity_factor=args.capacity_factor)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args, dense)
    return dense, config, output_dir


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
        match = MLP_WEIGHT.fullmatch(name)
        if match and int(match["layer"]) in sparse:
            layer = int(match["layer"])
            parts = pending.setdefault(layer, {})
            parts[match["proj"]] = tensor
            if len(parts) == 3:
                del pending[layer]
                yield from _sparse_block_tensors(f"model.layers.{layer}", parts["gate_proj"], parts["up_proj"],
                                                 parts["down_proj"], config, args, generator, calibrated).items()
        elif not (name == "lm_head.weight" and config.tie_word_embeddings):
            yield name, tensor


def check_complete(names: set[str], config, source_name: str, model=None) -> None:
    """Raise if the produced tensor names differ from the target model's (`model`: its meta-device instance)."""
    expected = _expected_tensor_names(model if model is not None else meta_model(config))
    if names != expected:
        raise UnsupportedCheckpointError(
            f"{source_name}: the checkpoint does not match its config; missing tensors: "
            f"{sorted(expected - names)[:8]}, unexpected tensors: {sorted(names - expected)[:8]}"
        )


def write_model_folder(staging: Path, model_name: str, tensors: Iterable[tuple[str, torch.Tensor]], config,
                       args: UpcycleArguments, dense: DenseCheckpoint) -> None:
    """Write `tensors` as sharded safetensors into `staging`, check them against `config`, then the config, the code
    files, the tokenizer and generation config of `dense`, and the card."""
    writer = ShardedSafetensorsWriter(staging, parse_size(args.max_shard_size))
    for name, tensor in tensors:
        writer.add(name, tensor)
    target = meta_model(config)
    check_complete(writer.names, config, dense.name, target)
    writer.finish()
    config.dtype = str(max(writer.dtypes, key=lambda d: d.itemsize)).removeprefix("torch.")
    _save_config_and_code(config, staging)
    _copy_tokenizer_and_generation_config(dense, staging)
    write_upcycled_card(staging, model_name, target, args, dense, config.dtype)


def run_upcycle(args: UpcycleArguments, dense: DenseCheckpoint | None = None) -> Path:
    """Upcycle as described by `args`; see [`upcycle`]. `dense`: the source, if already opened (it is read once)."""
    if args.experts:
        from .mixing import run_mix

        return run_mix(args, dense)
    dense, config, output_dir = prepare(args, dense)
    args = copy.copy(args)  # the resolved dtype, without re-validating the user's choice
    args.dtype = output_dtype(args, dense)
    if output_dir.exists() and not args.overwrite:
        raise OutputExistsError(output_dir)
    if args.breaks_equivalence:
        logger.warning("%s: this initialisation changes the dense model's function on purpose", output_dir)
    calibrated = _calibrated_routers(args, dense, config)

    with atomic_output_dir(output_dir, overwrite=args.overwrite) as staging:
        progress = tqdm(dense.tensors(), total=len(dense.tensor_names), desc=f"upcycling -> {args.arch}",
                        unit="tensor")
        write_model_folder(staging, output_dir.name, upcycled_tensors(progress, config, args, calibrated), config,
                           args, dense)
    logger.info("upcycled %s into %s", dense.name, output_dir)
    return output_dir
