"""How each MoE family names its experts' LoRA tensors: the one place that knows it.

Two interchange forms exist for a LoRA on routed experts (peft 0.21, vLLM, SGLang all read one or both):

- **fused** (peft `LoraConfig(target_parameters=[...])` on transformers 5.x fused experts, what vLLM reads for
  models flagged `is_3d_moe_weight`, gpt-oss among them): one pair per 3-D parameter,
  `<experts>.lora_A.weight (r*E, in)` / `lora_B.weight (out, r*E)`. Expert e owns A rows `[e*r, (e+1)*r)` and B
  columns `e::E` (rank-major, expert fastest). `in`/`out` are those of the per-expert linear map: gate_up_proj
  (H -> 2I), down_proj (I -> H), also for gpt-oss, which stores its experts transposed `(E, in, out)`. When both
  parameters of one experts module are targeted, peft nests two wrappers and the inner one's tensors get a
  `base_layer.` level; which parameter is inner depends on how peft met them (gate_up_proj on full-precision
  experts, down_proj on hf_moe's 4-bit experts, whose parameters peft visits in sorted order), so the parameter is
  told by the tensors' shapes, never by the nesting.
- **per-expert** (the v4 layout; vLLM's default 2-D MoE LoRA loader, SGLang, and peft's own v4 -> v5 converter,
  which fuses it on load): `<layer>.<block>.experts.<e>.<projection>.lora_A.weight (r, in)` / `lora_B (out, r)`,
  Mixtral `block_sparse_moe` + `w1` (gate) / `w3` (up) / `w2` (down), the Qwen-MoE family (Qwen2-MoE, Qwen3-MoE,
  OLMoE, DeepSeek-V3, GLM-4-MoE) `mlp` + `gate_proj` / `up_proj` / `down_proj`.

Gate and up share the fused `gate_up_proj`: rows `[:I]` are the gate and `[I:]` the up projection, except gpt-oss,
whose rows alternate (`0::2` gate, `1::2` up).
"""

import re
from dataclasses import dataclass

from ..checkpoints.names import HF_MOE_MODEL_TYPES

PROJECTIONS = ("gate", "up", "down")  # the canonical names of an expert's three linear maps
FUSED_PARAMETERS = ("gate_up_proj", "down_proj")  # the experts module's 3-D parameters
PEFT_PREFIX = "base_model.model."  # where peft's saved keys start (the model's own names follow)

# Every per-expert name either family uses, to its canonical projection.
PER_EXPERT_PROJECTIONS = {"w1": "gate", "w3": "up", "w2": "down",
                          "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
PER_EXPERT_KEY = re.compile(
    r"(?P<layer_prefix>.*\.layers\.(?P<layer>\d+))\.(?P<block>mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\."
    r"(?P<projection>w1|w2|w3|gate_proj|up_proj|down_proj)\.lora_(?P<factor>[AB])\.weight")
# A fused key: the experts module, any `base_layer.` levels of nested wrappers, the factor.
FUSED_KEY = re.compile(r"(?P<experts>.*\.experts)(?P<nesting>(?:\.base_layer)*)\.lora_(?P<factor>[AB])\.weight")
LORA_KEY = re.compile(r"(?P<module>.+?)(?:\.base_layer)*\.lora_(?P<factor>[AB])\.weight")

GPT_OSS_REFUSAL = ("gpt-oss has no per-expert LoRA form: vLLM reads gpt-oss expert LoRA in the fused layout and "
                   "peft has no per-expert converter for it; export with layout='fused' (or 'merged')")


@dataclass(frozen=True)
class ExpertFamily:
    """How one family lays out its experts and names their per-expert LoRA tensors."""

    model_type: str
    sparse_block: str = "mlp"  # the sparse block's name in per-expert keys
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert names of gate, up, down
    interleaved_gate_up: bool = False  # gate_up rows alternate gate/up (gpt-oss) instead of [gate; up]
    transposed: bool = False  # fused experts stored (E, in, out) instead of (E, out, in) (gpt-oss)
    per_expert_refusal: str | None = None  # why the per-expert form cannot be written, if it cannot

    def per_expert_name(self, projection: str) -> str:
        return self.projections[PROJECTIONS.index(projection)]


QWEN_NAMES = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = ("w1", "w3", "w2")
FAMILIES = {family.model_type: family for family in (
    ExpertFamily("mixtral", "block_sparse_moe", MIXTRAL_NAMES),
    ExpertFamily("qwen2_moe"),
    ExpertFamily("qwen3_moe"),
    ExpertFamily("olmoe"),
    ExpertFamily("deepseek_v3"),
    ExpertFamily("glm4_moe"),
    ExpertFamily("gpt_oss", interleaved_gate_up=True, transposed=True, per_expert_refusal=GPT_OSS_REFUSAL),
)}
SUPPORTED_MODEL_TYPES = (*FAMILIES, *HF_MOE_MODEL_TYPES)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def family_for(config) -> ExpertFamily:
    """The family of a base model's `config`.

    hf_moe's three types store their experts exactly like Qwen-MoE (`gate_up_proj (E, 2I, H)`, `down_proj
    (E, H, I)`); their per-expert names are those of the native model `hf_moe.export` turns them into (Mixtral,
    Qwen3-MoE or Qwen2-MoE: the adapter then applies to the checkpoint engines serve), and where no native target
    is exact (MH-MoE, Switch with a capacity limit at inference...) the per-expert form is refused for the same
    reasons the export is.
    """
    model_type = config.model_type
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type not in HF_MOE_MODEL_TYPES:
        raise ValueError(f"base model_type {model_type!r} is not supported for expert LoRA adapters: choose a base "
                         f"of {SUPPORTED_MODEL_TYPES}")
    from ..export import ExportRefusedError, choose_target

    try:
        target = choose_target(config, "auto", f"the {model_type} base")
    except ExportRefusedError as refusal:
        return ExpertFamily(model_type, per_expert_refusal=(
            "the per-expert form names the experts of the native export of the base, and "
            + one_line(refusal).removesuffix("Nothing was written.").rstrip()))
    return ExpertFamily(model_type, target.sparse_block, target.expert_projections)


def per_expert_key(layer_prefix: str, family: ExpertFamily, expert: int, projection: str, factor: str) -> str:
    """`base_model.model.model.layers.3.block_sparse_moe.experts.5.w1.lora_A.weight`."""
    return (f"{PEFT_PREFIX}{layer_prefix}.{family.sparse_block}.experts.{expert}."
            f"{family.per_expert_name(projection)}.lora_{factor}.weight")


def fused_key(experts_name: str, factor: str, inner: bool) -> str:
    """peft's key of an experts parameter's factor: the inner wrapper's tensors carry a `base_layer.` level."""
    return f"{PEFT_PREFIX}{experts_name}{'.base_layer' if inner else ''}.lora_{factor}.weight"
