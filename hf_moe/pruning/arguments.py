"""What a pruning run is asked to do (`PruneArguments`, the options of `hf-moe prune`), checked at construction."""

from dataclasses import dataclass, field

from .saliency import METHODS

CALIBRATION_DTYPES = ("float32", "auto")


@dataclass
class PruneArguments:
    source: str = field(metadata={"help": "MoE model folder (hf_moe, Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3) or "
                                          "its Hub id"})
    output_dir: str | None = field(default=None, metadata={"help": "default: <source>-<method or merged>-<N>"})
    keep: str = field(default="0.5", metadata={
        "help": "experts kept per sparse layer: a count N (6) or a ratio of the experts (0.75)"})
    method: str = field(default="reap", metadata={
        "help": "reap | frequency | ean_sum | ean_mean: how experts are ranked (with --merge: the saliency the "
                "heatmap shows)"})
    merge: bool = field(default=False, metadata={
        "help": "merge instead of prune (HC-SMoE, arXiv 2410.08589): cluster experts by the Euclidean distance of "
                "their mean outputs, average each cluster weighted by routing frequency into its most frequently "
                "routed member"})
    calibration: str | None = field(default=None, metadata={
        "help": "datasets name / folder or .json / .jsonl (messages, instruction/response or text rows); "
                "empty = the embedded task mixture"})
    calibration_split: str = field(default="train", metadata={"help": "split of a datasets calibration set"})
    calibration_samples: int = field(default=64, metadata={"help": "calibration sequences"})
    max_length: int = field(default=256, metadata={"help": "tokens per calibration sequence"})
    calibration_dtype: str = field(default="float32", metadata={
        "help": "float32 | auto (the stored dtype): the dtype the model runs in while calibrating"})
    max_shard_size: str = field(default="2GB", metadata={"help": "largest output shard"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})
    verify: bool = field(default=False, metadata={
        "help": "compare the source and the pruned model on sample prompts (max |Δlogit|, greedy answers)"})
    seed: int = field(default=0, metadata={"help": "calibration sample order and the embedded mixture"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"`method`={self.method!r} is invalid: choose one of {tuple(METHODS)}")
        if self.calibration_dtype not in CALIBRATION_DTYPES:
            raise ValueError(f"`calibration_dtype`={self.calibration_dtype!r} is invalid: choose one of "
                             f"{CALIBRATION_DTYPES}")
        for name in ("calibration_samples", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}`={getattr(self, name)} is invalid: must be >= 1")
        self.keep = str(self.keep)
