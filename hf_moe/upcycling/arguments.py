"""What an upcycling run is asked to do (`UpcycleArguments`, validated at construction) and what it resolves to before
anything is written: the source, the target config, the output folder and dtype. Shared by single-source upcycling
and mixing."""

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoints.atomic import resolve_output_dir
from ..checkpoints.lineage import source_lineage
from ..checkpoints.reading import DenseCheckpoint
from ..modeling import configuration_hf_moe
from ..modeling.configuration_hf_moe import EXPERT_CHOICE_ROUTING
from .config_mapping import ARCHITECTURES, parse_moe_layers, upcycled_config
from .experts import EXPERT_INITS
from .routers import ROUTER_INITS
from .sources import open_dense_checkpoint

OUTPUT_DTYPES = ("auto", "bfloat16", "float16", "float32")
UPCYCLE_ROUTER_TYPES = ("softmax_topk", "expert_choice")
MERGE_MODES = ("base", "average")


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
    router_type: str = field(default="softmax_topk", metadata={
        "help": "softmax_topk | expert_choice (experts pick tokens, arXiv 2202.09368; hf_moe and hf_mh_moe)"})
    expert_capacity_factor: float = field(default=2.0, metadata={
        "help": "expert_choice: experts per token on average (the active compute of top-2)"})
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
        "help": "mix: expert i's MLP from source i (folders, .gguf files, Hub ids; may repeat); SOURCE is the base; "
                "num_experts becomes their number"})
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
        if self.num_experts < 1 and not self.experts:  # a mix counts its sources; at parsing, before the source opens
            raise ValueError(f"`num_experts`={self.num_experts!r} is invalid: a positive integer is required")
        if self.top_k is None:
            self.top_k = 1 if self.arch == "hf_switch" else 2
        if self.dtype not in OUTPUT_DTYPES:
            raise ValueError(f"`dtype`={self.dtype!r} is invalid: choose one of {OUTPUT_DTYPES}")
        if self.router_type not in UPCYCLE_ROUTER_TYPES:
            raise ValueError(f"`router_type`={self.router_type!r} is invalid: choose one of {UPCYCLE_ROUTER_TYPES}")
        if self.router_type == EXPERT_CHOICE_ROUTING and (self.arch == "hf_switch" or self.expert_init == "split"
                                                    or self.experts):
            raise ValueError("`router_type`='expert_choice' needs `arch` hf_moe or hf_mh_moe, one source and "
                             f"`expert_init` copy or drop_upcycle (got arch={self.arch!r}, "
                             f"expert_init={self.expert_init!r}{', several sources' if self.experts else ''})")
        if self.experts:
            self._check_mix()

    def _check_mix(self) -> None:
        if self.merge_others not in MERGE_MODES:
            raise ValueError(f"`merge_others`={self.merge_others!r} is invalid: choose one of {MERGE_MODES}")
        if self.arch not in ("hf_moe", "hf_switch") or self.expert_init != "copy" or self.noise_std:
            raise ValueError("experts from several sources need `arch` hf_moe or hf_switch and `expert_init`='copy' "
                             f"without noise (got arch={self.arch!r}, expert_init={self.expert_init!r})")
        self.num_experts = len(self.experts)  # one expert per listed source

    @property
    def breaks_equivalence(self) -> bool:
        """Whether the chosen init changes the dense model's function on purpose."""
        return (bool(self.experts) or self.arch == "hf_mh_moe" or self.router_type == EXPERT_CHOICE_ROUTING
                or self.expert_init == "drop_upcycle" or self.noise_std > 0
                or (self.expert_init == "split" and self.top_k % self.granularity != 0))


def default_output_dir(args: UpcycleArguments, dense: DenseCheckpoint) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(dense.name).name)
    routing = f"ec{args.expert_capacity_factor:g}" if args.router_type == EXPERT_CHOICE_ROUTING else args.top_k
    return Path("out") / f"{name}-{args.arch}-{args.num_experts}x{routing}"


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
    """Open the source (unless already opened) and build the target config and output path; fails (also on an
    existing output without `overwrite`) before anything is written."""
    dense = dense or open_dense_checkpoint(args.source, args.gguf_file)
    sparse_layers = parse_moe_layers(args.moe_layers, dense.config.num_hidden_layers)
    intermediate = dense.config.intermediate_size
    moe_intermediate = intermediate // args.granularity if args.expert_init == "split" else intermediate
    config = upcycled_config(dense.config, args.arch, args.num_experts, args.top_k, sparse_layers,
                             moe_intermediate, args.num_moe_heads, base_model=source_lineage(dense).base_model,
                             capacity_factor=args.capacity_factor, router_type=args.router_type,
                             expert_capacity_factor=args.expert_capacity_factor)
    output_dir = resolve_output_dir(args.output_dir or None, overwrite=args.overwrite,
                                    default=default_output_dir(args, dense))
    return dense, config, output_dir
