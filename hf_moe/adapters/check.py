"""`check_adapter()`: what a serving engine would do with each tensor of an expert LoRA adapter, before serving it.

Every tensor is listed with what it targets (layer, expert or "all", projection, layout: fused / per-expert /
attention / router / other) and, for one engine and the base's family, whether the engine would silently IGNORE it,
REJECT it (the adapter fails to load) or MISAPPLY it (load it onto the wrong expert or projection). Only shapes and
adapter_config.json are read (no tensor data), so this is cheap on any adapter size; what shapes cannot tell (a
permutation of experts that keeps every shape) is not detected.

What each engine reads (the names and layouts are those of `names.py`):

- **vLLM** reads a model's expert LoRA in one layout, chosen per model class: fused ("3-D", peft's
  `target_parameters` tensors; `is_3d_moe_weight`) for gpt-oss, per expert ("2-D") for Mixtral, Qwen2/3-MoE,
  OLMoE, DeepSeek-V3, GLM-4-MoE. The other layout's keys name no LoRA module it knows: the adapter fails to load. It
  needs every expert's gate, up and down (per expert; `pack_moe` asserts each), both gate_up_proj and down_proj
  (fused), expects the fused gate_up_proj as the inner wrapper (`experts.base_layer`), and reads lora_B rank-major
  whatever `lora_B_layout` says. A per-expert key under another sparse block name than the model's matches no module
  and is ignored.
- **SGLang** reads per-expert keys only (`experts.<e>.`, either naming family: it renames w1 / w3 / w2); peft's fused
  keys are dropped with a warning. A missing up_proj is zero-filled and a missing expert gets no LoRA: what the file
  holds is what is applied, so neither is reported.
- **peft** (0.21) reads the fused layout; per-expert adapters are converted on load only for the types its converter
  maps (Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3, GLM-4-MoE: not Qwen2-MoE itself, nor gpt-oss, nor hf_moe's own
  types); elsewhere their keys match no module and are loaded with a warning and never applied (or, when no
  `target_modules` entry names a module of the base, refused).

Where this was read (late 2026): vLLM `vllm/lora/model_manager.py`, `vllm/lora/lora_model.py`,
`vllm/lora/layers/fused_moe.py` (`is_3d_moe_weight`, `pack_moe`, `_stack_moe_lora_weights`); SGLang
`python/sglang/srt/lora/` (`LoRAAdapter._rename_expert_w_to_proj`, `normalize_gate_up_proj`; MoE LoRA from PR
#14105); peft 0.21.2 `peft/tuners/lora/layer.py` (`ParamWrapper`) and `peft/utils/transformers_weight_conversion.py`;
unsloth-zoo PRs #1232 / #1269 (the `lora_B_layout` marker, unsloth issue #6930). Not verified first-hand: Mixtral's
`block_sparse_moe` name on vLLM's latest main, SGLang's gpt-oss names, and whether SGLang reads peft's fused keys
(PRs #25528 / #27381 add it; their merge state was not established).

hf_moe bases are served by vLLM and SGLang as their native export (`hf-moe export`), whose per-expert names the
per-expert form uses; peft loads the base itself. Routers and other modules are listed but not judged ("unchecked"):
whether the engines apply LoRA on a router is not established here.
"""

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from ..checkpoints.names import HF_MOE_MODEL_TYPES
from ..text_table import table
from .base import BaseModel, SparseLayer, open_base
from .fused import B_LAYOUTS
from .names import FUSED_KEY, LORA_KEY, PEFT_PREFIX, PER_EXPERT_KEY, PER_EXPERT_PROJECTIONS
from .peft_config import target_scaling
from .reading import ADAPTER_WEIGHTS, default_base, read_adapter_config

ENGINES = ("vllm", "sglang", "peft")
ACTIONS = ("reject", "misapply", "ignore")  # most severe first: a tensor named by several problems shows the first
ENGINE_NAMES = {"vllm": "vLLM", "sglang": "SGLang", "peft": "peft"}
# vLLM model classes with `is_3d_moe_weight = True` among the types hf_moe reads (vLLM also flags Qwen3.5-MoE,
# Qwen3-VL-MoE, GLM-4-MoE-Lite and NemotronH, which hf_moe does not read).
VLLM_FUSED_MODEL_TYPES = frozenset({"gpt_oss"})
# Types whose per-expert adapters peft 0.21.2 converts on load (`peft.utils.transformers_weight_conversion`); Qwen2-MoE
# is missing from its mapping. tests/test_adapters_check.py pins this against peft.
PEFT_CONVERTS_PER_EXPERT = frozenset({"mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe"})
LAYER = re.compile(r"\.layers\.(\d+)\.")
ATTENTION = re.compile(r"\.(self_attn|attention|attn)\.")


@dataclass(frozen=True)
class AdapterCheckArguments:
    adapter: str = field(metadata={
        "help": "peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors)"})
    engine: str = field(default="vllm", metadata={"help": "vllm | sglang | peft: the engine that will load it"})
    base: str | None = field(default=None, metadata={
        "help": "the base model folder (default: the adapter's base_model_name_or_path when it is a local folder)"})

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"`engine`={self.engine!r} is invalid: choose one of {ENGINES}")


@dataclass
class TensorTarget:
    """One adapter tensor: what it targets, and what the engine would do with it ('ok', one of `ACTIONS`, or
    'unchecked' for routers and other modules)."""

    key: str
    shape: tuple[int, ...]
    layout: str  # fused | per-expert | attention | router | other
    layer: int | None = None
    expert: int | str | None = None  # an expert index, "all" (fused), None (not a routed expert)
    projection: str | None = None  # gate / up / down per expert, gate_up / down fused, else the module's last name
    verdict: str = "ok"

    def row(self, engine: str) -> dict:
        return {"tensor": self.key, "shape": "x".join(map(str, self.shape)), "layer": self.layer,
                "expert": self.expert, "projection": self.projection, "layout": self.layout, engine: self.verdict}


@dataclass(frozen=True)
class Problem:
    """One line: `<tensor or group>: <engine> would <action> it: <why> (fix: <fix>)`."""

    subject: str
    engine: str
    action: str
    why: str
    fix: str
    tensors: tuple[str, ...]  # the adapter tensors concerned (what the line's group stands for)

    def __str__(self) -> str:
        return f"{self.subject}: {self.engine} would {self.action} it: {self.why} (fix: {self.fix})"


@dataclass
class AdapterCheck:
    """What `engine` would do with each tensor of the adapter at `adapter` on `base`."""

    adapter: Path
    base: Path
    engine: str
    model_type: str  # the base's
    served_as: str  # the model type the engine serves (hf_moe bases: their native export's, for vLLM / SGLang)
    engine_reads: tuple[str, ...]  # the expert layouts the engine reads for it: 'fused' / 'per-expert'
    tensors: list[TensorTarget]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return [str(problem) for problem in self.problems]

    def summary(self) -> str:
        experts = sum(target.layout in ("fused", "per-expert") for target in self.tensors)
        if self.ok:
            return (f"clean: {self.engine} reads all {experts} expert tensors of {self.adapter} as trained on "
                    f"{self.served_as}")
        counts = {action: sum(target.verdict == action for target in self.tensors) for action in ACTIONS}
        named = ", ".join(f"{action} {count}" for action, count in counts.items() if count)
        return (f"{len(self.problems)} problem(s): {self.engine} would {named} of {experts} expert tensors of "
                f"{self.adapter}")

    def table(self) -> str:
        """Every tensor, one line each (`hf_moe.text_table`), its full name last: table cells are cut, names never."""
        rows = [target.row(self.engine) for target in self.tensors]
        lines = table([{key: value for key, value in row.items() if key != "tensor"} for row in rows]).splitlines()
        width = max(map(len, lines))
        names = ["tensor", "-" * max(len(row["tensor"]) for row in rows), *(row["tensor"] for row in rows)]
        return "\n".join(f"{line.ljust(width)}  {name}" for line, name in zip(lines, names, strict=True))

    def text(self) -> str:
        """The report for people: what the engine reads, the table, one line per problem, the verdict."""
        heading = (f"{self.adapter} on {self.base} ({self.model_type}): {self.engine} reads "
                   f"{' or '.join(self.engine_reads)} expert LoRA for {self.served_as}")
        problems = ["\n".join(self.lines())] if self.problems else []
        return "\n\n".join([heading, self.table(), *problems, self.summary()])

    def to_dict(self) -> dict:
        return {"adapter": str(self.adapter), "base": str(self.base), "engine": self.engine,
                "model_type": self.model_type, "served_as": self.served_as, "engine_reads": list(self.engine_reads),
                "ok": self.ok, "tensors": [target.row(self.engine) for target in self.tensors],
                "problems": [{"line": str(problem), "subject": problem.subject, "action": problem.action,
                              "why": problem.why, "fix": problem.fix, "tensors": list(problem.tensors)}
                             for problem in self.problems]}


# ------------------------------------------------------------------------------------------------ what is held
@dataclass
class _Pair:
    """A LoRA module's A and B: a fused experts parameter, or one expert's projection."""

    module: str  # the saved key up to `.lora_`
    keys: dict[str, str] = field(default_factory=dict)  # factor -> key
    shapes: dict[str, tuple] = field(default_factory=dict)
    layer: SparseLayer | None = None
    index: int | None = None  # the layer index the key names
    nesting: str = ""  # fused: "" or ".base_layer"
    experts_name: str = ""  # fused: the experts module (model name)
    expert: int | None = None  # per expert
    projection: str | None = None  # per expert: gate / up / down; fused: gate_up_proj / down_proj once known
    name: str | None = None  # per expert: as in the key (w1, gate_proj ...)
    block: str | None = None  # per expert: mlp / block_sparse_moe
    defect: tuple[str, str] | None = None  # (why, fix): what every engine reading this layout rejects


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in sorted(handle.keys(), key=_natural)}


def _natural(key: str) -> list:
    """Layer 2 before layer 10, expert 2 before expert 10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)]


def _router_names(base: BaseModel) -> set[str]:
    block = base.family.sparse_block  # v4 names (Mixtral's block_sparse_moe.gate) name the same router
    return {*base.router_names, *(re.sub(r"\.mlp\.(?=[^.]+$)", f".{block}.", name) for name in base.router_names)}


def _classify(shapes: dict, base: BaseModel) -> tuple[dict[str, TensorTarget], list[_Pair], list[_Pair]]:
    """Every tensor's target, and the fused and per-expert pairs."""
    targets, fused, per_expert = {}, {}, {}
    routers = _router_names(base)
    experts_modules = {layer.experts_name: layer for layer in base.layers.values()}
    for key, shape in shapes.items():
        layer_match = LAYER.search(key)
        index = int(layer_match[1]) if layer_match else None
        if match := PER_EXPERT_KEY.fullmatch(key):
            pair = per_expert.setdefault(key.rsplit(".lora_", 1)[0], _Pair(
                key.rsplit(".lora_", 1)[0], layer=base.layers.get(int(match["layer"])), index=int(match["layer"]),
                expert=int(match["expert"]), projection=PER_EXPERT_PROJECTIONS[match["projection"]],
                name=match["projection"], block=match["block"]))
            targets[key] = TensorTarget(key, shape, "per-expert", pair.index, pair.expert, pair.projection)
        elif (match := FUSED_KEY.fullmatch(key)) and match["experts"].endswith(".experts"):
            experts_name = match["experts"].removeprefix(PEFT_PREFIX)
            layer = experts_modules.get(experts_name)
            pair = fused.setdefault((experts_name, match["nesting"]), _Pair(
                f"{match['experts']}{match['nesting']}", layer=layer, index=layer.index if layer else index,
                nesting=match["nesting"], experts_name=experts_name))
            targets[key] = TensorTarget(key, shape, "fused", pair.index, "all")
        else:
            module = match["module"].removeprefix(PEFT_PREFIX) if (match := LORA_KEY.fullmatch(key)) else None
            if module is not None and module in routers:
                layout = "router"
            elif module is not None and ATTENTION.search(f".{module}."):
                layout = "attention"
            else:
                layout = "other"
            targets[key] = TensorTarget(key, shape, layout, index, None, (module or key).rpartition(".")[2],
                                        "ok" if layout == "attention" else "unchecked")
            continue
        factor = key.rsplit(".lora_", 1)[1][0]
        pair.keys[factor], pair.shapes[factor] = key, shape
    for pair in fused.values():
        _diagnose_fused(pair)
        for key in pair.keys.values():
            targets[key].projection = pair.projection and pair.projection.removesuffix("_proj")
    for pair in per_expert.values():
        _diagnose_per_expert(pair, base)
    return targets, list(fused.values()), list(per_expert.values())


TRANSPOSED_FIX = ("write lora_A as (rank, in) and lora_B as (out, rank) per expert; hf-moe adapter export refuses it "
                  "as is")
FUSED_TRANSPOSED_FIX = ("write lora_A as (rank*E, in) and lora_B as (out, rank*E); hf-moe adapter export refuses it as "
                        "is")
INCOMPLETE_FIX = "the adapter is incomplete: save it again"
WRONG_BASE_FIX = "check --base: the adapter was trained on another model; hf-moe adapter export refuses it too"


def _diagnose_fused(pair: _Pair) -> None:
    """The parameter a fused pair adapts (by shape), and what is wrong with it, if anything."""
    layer = pair.layer
    if set(pair.keys) != {"A", "B"}:
        pair.defect = (f"lora_{'B' if 'A' in pair.keys else 'A'} is missing", INCOMPLETE_FIX)
        return
    a, b = pair.shapes["A"], pair.shapes["B"]
    if layer is None:
        pair.defect = (f"the base has no experts module {pair.experts_name}", WRONG_BASE_FIX)
        return
    if len(a) != 2 or len(b) != 2:
        pair.defect = (f"lora_A {a} / lora_B {b} are not 2-D", "the adapter is not peft's fused layout")
        return
    fits = {"gate_up_proj": (layer.hidden, 2 * layer.intermediate), "down_proj": (layer.intermediate, layer.hidden)}
    count = layer.num_experts
    expected = (f"gate_up_proj lora_A (r*{count}, {layer.hidden}) / lora_B ({2 * layer.intermediate}, r*{count}), "
                f"down_proj lora_A (r*{count}, {layer.intermediate}) / lora_B ({layer.hidden}, r*{count})")
    for parameter, (inputs, outputs) in fits.items():
        if a[1] == inputs and b[0] == outputs:
            pair.projection = parameter
            if a[0] != b[1]:
                pair.defect = (f"lora_A has {a[0]} rows but lora_B {b[1]} columns (rank mismatch)",
                               "the adapter is inconsistent: save it again")
            elif a[0] % count:
                pair.defect = (f"{a[0]} rows are not rank x {count} experts of the base's layer {layer.index}",
                               WRONG_BASE_FIX)
            return
    diagnoses = (
        (lambda i, o: a[1] == o and b[0] == i,
         f"lora_A {a} / lora_B {b} are peft < 0.19's layout of {{}} (lora_A's in-dim is the parameter's out-dim); "
         f"peft >= 0.19 and vLLM read {expected}",
         "load it in peft 0.18 and save it with peft >= 0.19; hf-moe adapter export refuses peft < 0.19 adapters"),
        (lambda i, o: a[0] == i and b[1] == o,
         f"lora_A {a} / lora_B {b} are {{}}'s factors transposed; expected {expected}", FUSED_TRANSPOSED_FIX),
        (lambda i, o: a[0] == o and b[1] == i,
         f"lora_A {a} / lora_B {b} hold {{}}'s B and A swapped; expected {expected}", FUSED_TRANSPOSED_FIX))
    for test, why, fix in diagnoses:
        for parameter, (inputs, outputs) in fits.items():
            if test(inputs, outputs):
                pair.projection, pair.defect = parameter, (why.format(parameter), fix)
                return
    pair.defect = (f"lora_A {a} / lora_B {b} fit neither parameter of the base's layer {layer.index} "
                   f"(E={count}, H={layer.hidden}, I={layer.intermediate}): {expected}", WRONG_BASE_FIX)


def _diagnose_per_expert(pair: _Pair, base: BaseModel) -> None:
    layer = pair.layer
    if layer is None:
        pair.defect = (f"layer {pair.index} of the base has no routed experts (its sparse layers: "
                       f"{sorted(base.layers)})", WRONG_BASE_FIX)
        return
    if pair.expert >= layer.num_experts:
        pair.defect = (f"the base has {layer.num_experts} experts in layer {layer.index}", WRONG_BASE_FIX)
        return
    if set(pair.keys) != {"A", "B"}:
        pair.defect = (f"lora_{'B' if 'A' in pair.keys else 'A'} is missing", INCOMPLETE_FIX)
        return
    a, b = pair.shapes["A"], pair.shapes["B"]
    outputs, inputs = layer.shape(pair.projection)
    expected = f"lora_A (rank, {inputs}) / lora_B ({outputs}, rank)"
    if len(a) == len(b) == 2 and a[1] == inputs and b[0] == outputs:
        if a[0] != b[1]:
            pair.defect = (f"lora_A {a} and lora_B {b} disagree on the rank", "the adapter is inconsistent: save it "
                           "again")
    elif len(a) == len(b) == 2 and a[0] == inputs and b[1] == outputs:
        pair.defect = (f"lora_A {a} / lora_B {b} are transposed; expected {expected}", TRANSPOSED_FIX)
    elif len(a) == len(b) == 2 and a[0] == outputs and b[1] == inputs:
        pair.defect = (f"lora_A {a} / lora_B {b} hold B and A swapped; expected {expected}", TRANSPOSED_FIX)
    else:
        pair.defect = (f"lora_A {a} / lora_B {b} do not fit the base's layer {layer.index} experts ({expected}, "
                       f"H={layer.hidden}, I={layer.intermediate})", WRONG_BASE_FIX)


# ------------------------------------------------------------------------------------------------ the engines
def served_model_type(base: BaseModel, engine: str) -> str:
    """The model type `engine` serves for `base`: vLLM and SGLang serve an hf_moe base as its native export."""
    model_type = base.config.model_type
    if engine == "peft" or model_type not in HF_MOE_MODEL_TYPES:
        return model_type
    from ..export import ExportRefusedError, choose_target

    try:
        return choose_target(base.config, "auto", f"the {model_type} base").name
    except ExportRefusedError:
        raise ValueError(f"{ENGINE_NAMES[engine]} cannot serve this {model_type} base: "
                         f"{base.family.per_expert_refusal}. Check it with --engine peft, or merge it (hf-moe adapter "
                         "export ... --layout merged)") from None


def engine_reads(engine: str, served_as: str) -> tuple[str, ...]:
    """The expert LoRA layouts `engine` reads on a `served_as` model."""
    if engine == "vllm":
        return ("fused",) if served_as in VLLM_FUSED_MODEL_TYPES else ("per-expert",)
    if engine == "sglang":
        return ("per-expert",)
    return ("fused", "per-expert") if served_as in PEFT_CONVERTS_PER_EXPERT else ("fused",)


class _Checker:
    def __init__(self, adapter: Path, base_arg, config: dict, base: BaseModel, engine: str, has_fused: bool):
        self.adapter, self.config, self.base, self.engine = adapter, config, base, engine
        self.name = ENGINE_NAMES[engine]
        self.served_as = served_model_type(base, engine)
        self.reads = engine_reads(engine, self.served_as)
        self.base_option = f" --base {base_arg}" if base_arg else ""
        self.problems: list[Problem] = []
        marker = config.get("lora_B_layout")
        self.grouped_b = marker == "grouped_by_expert"
        self.unmarked_unsloth = marker not in B_LAYOUTS and _is_unsloth(adapter, config)
        self.has_fused = has_fused  # the lora_B column order matters only when reading fused tensors

    def export_fix(self, layout: str) -> str:
        if layout == "per-expert" and self.base.family.per_expert_refusal:
            layout = "merged"  # nothing reads this base's experts per expert: serve the merged model
        extra = " --lora_B_layout grouped_by_expert" if self.unmarked_unsloth and self.has_fused else ""
        extra += ": serve the merged model" if layout == "merged" else ""
        return f"hf-moe adapter export {self.adapter} OUT --layout {layout}{self.base_option}{extra}"

    def add(self, keys, action: str, why: str, fix: str, subject: str | None = None) -> None:
        keys = tuple(sorted(keys))
        self.problems.append(Problem(subject or braces(keys), self.engine, action, why, fix, keys))

    # -------------------------------------------------------------------------------------------- fused
    def fused(self, pairs: list[_Pair]) -> None:
        if not pairs:
            return
        if "fused" not in self.reads:
            wanted = "per-expert"
            for pair in pairs:
                for key in sorted(pair.keys.values()):
                    fix = pair.defect[1] if pair.defect else self.export_fix(wanted)
                    self.add([key], *self.fused_mismatch(pair), fix, subject=key)
            return
        for pair in pairs:
            if pair.defect:
                self.add(pair.keys.values(), "reject", pair.defect[0], pair.defect[1])
        healthy = [pair for pair in pairs if not pair.defect]
        by_layer = defaultdict(list)
        for pair in healthy:
            by_layer[pair.layer.index].append(pair)
        for index, layer_pairs in sorted(by_layer.items()):
            parameters = [pair.projection for pair in layer_pairs]
            if len(set(parameters)) < len(parameters):
                self.add([key for pair in layer_pairs for key in pair.keys.values()], "reject",
                         f"layer {index}'s {parameters[0]} is adapted twice", "the adapter is inconsistent: save it "
                         "again")
                continue
            inner = [pair for pair in layer_pairs if pair.nesting]
            if len(layer_pairs) == 2 and inner and inner[0].projection != "gate_up_proj":
                what = (f"{self.name} reads the inner wrapper (experts.base_layer) as gate_up_proj, as peft nests it "
                        "on full-precision experts; here it is down_proj (hf_moe's QLoRA on 4-bit experts nests them "
                        "the other way): the shapes do not fit")
                self.add([key for pair in layer_pairs for key in pair.keys.values()], "reject", what,
                         self.export_fix("fused"))
            if self.engine == "vllm" and len(layer_pairs) == 1:
                missing = "down_proj" if parameters[0] == "gate_up_proj" else "gate_up_proj"
                self.add(layer_pairs[0].keys.values(), "reject",
                         f"layer {index} has no {missing} LoRA; vLLM's 3-D MoE LoRA needs both gate_up_proj and "
                         "down_proj of every adapted layer", "train both expert parameters (target_parameters "
                         f"gate_up_proj and down_proj), or {self.export_fix('merged')}")
        self.lora_b_order(healthy)
        if self.engine == "peft":
            self.peft_ranks(healthy)

    def fused_mismatch(self, pair: _Pair) -> tuple[str, str]:
        what = pair.projection or "an experts parameter"
        if self.engine == "sglang":
            return "ignore", (f"SGLang reads expert LoRA per expert (experts.<e>.<projection>) and drops peft's fused "
                              f"experts keys ({what}) with a warning")
        projections = "/".join(self.family_names())
        return "reject", (f"vLLM reads {self.served_as} expert LoRA per expert (2-D MoE LoRA: experts.<e>."
                          f"{projections}, gate and up separate); a fused experts LoRA ({what}) is no module it knows "
                          "and fails the adapter's load")

    def lora_b_order(self, pairs: list[_Pair]) -> None:
        """lora_B grouped by expert (unsloth before 2026-09) read rank-major: each expert's delta lands on others."""
        if not (self.grouped_b or self.unmarked_unsloth):
            return
        if self.grouped_b:
            why, fix = ("adapter_config.json says lora_B_layout grouped_by_expert (column e*r+k), but "
                        f"{self.name} reads lora_B rank-major (column k*E+e) whatever the marker says: each expert's "
                        "delta lands on other experts", self.export_fix("fused"))
        else:
            why, fix = ("an unsloth adapter without a lora_B_layout marker: unsloth before 2026-09-17 wrote lora_B "
                        f"grouped by expert (column e*r+k), {self.name} reads it rank-major (column k*E+e): each "
                        "expert's delta lands on other experts", self.export_fix("fused"))
        for pair in pairs:
            rank = pair.shapes["A"][0] // pair.layer.num_experts
            if pair.layer.num_experts > 1 and rank > 1:
                self.add([pair.keys["B"]], "misapply", why, fix, subject=pair.keys["B"])

    def peft_ranks(self, pairs: list[_Pair]) -> None:
        for pair in pairs:
            count = pair.layer.num_experts
            rank, _ = target_scaling(self.config, f"{pair.experts_name}.{pair.projection}")
            if rank * count != pair.shapes["A"][0]:
                self.add(pair.keys.values(), "reject",
                         f"adapter_config.json gives {pair.experts_name}.{pair.projection} rank {rank}, so peft builds "
                         f"lora_A ({rank * count}, {pair.shapes['A'][1]}) for {count} experts; the tensor has "
                         f"{pair.shapes['A'][0]} rows (size mismatch)", "make r / rank_pattern in "
                         "adapter_config.json give the tensors' rank")

    # -------------------------------------------------------------------------------------------- per expert
    def family_names(self) -> tuple[str, str, str]:
        return tuple(self.base.family.per_expert_name(projection) for projection in ("gate", "up", "down"))

    def per_expert(self, pairs: list[_Pair]) -> None:
        if not pairs:
            return
        by_layer = defaultdict(list)
        for pair in pairs:
            by_layer[pair.index].append(pair)
        if "per-expert" not in self.reads:
            for _, layer_pairs in sorted(by_layer.items()):
                keys = [key for pair in layer_pairs for key in pair.keys.values()]
                defect = next((pair.defect for pair in layer_pairs if pair.defect), None)
                fix = defect[1] if defect else self.export_fix("fused")
                self.add(keys, *self.per_expert_mismatch(), fix)
            return
        for (why, fix), keys in _grouped((pair.defect, key) for pair in pairs if pair.defect
                                         for key in pair.keys.values()).items():
            self.add(keys, "reject", why, fix)
        healthy = [pair for pair in pairs if not pair.defect]
        names = self.family_names()
        if self.engine in ("vllm", "peft"):
            foreign = [pair for pair in healthy if pair.name != self.base.family.per_expert_name(pair.projection)]
            for index, keys in _grouped((pair.index, key) for pair in foreign for key in pair.keys.values()).items():
                used = sorted({pair.name for pair in foreign if pair.index == index})
                if self.engine == "vllm":
                    self.add(keys, "reject", f"vLLM's {self.served_as} reads its experts as experts.<e>."
                             f"{'/'.join(names)}; {'/'.join(used)} name no LoRA module it knows and fail the "
                             "adapter's load", self.export_fix("per-expert"))
                else:
                    self.add(keys, *self.peft_unconverted(f"peft converts {self.served_as} per-expert LoRA named "
                                                          f"{'/'.join(names)}, not {'/'.join(used)}"))
            healthy = [pair for pair in healthy if pair not in foreign]
        if self.engine == "vllm":
            block = self.base.family.sparse_block
            elsewhere = [pair for pair in healthy if pair.block != block]
            for index, keys in _grouped((pair.index, key) for pair in elsewhere for key in pair.keys.values()).items():
                used = next(pair.block for pair in elsewhere if pair.index == index)
                self.add(keys, "ignore", f"vLLM's {self.served_as} names its sparse block {block}: keys under "
                         f"{used}.experts match no module", self.export_fix("per-expert"))
        if self.engine != "sglang":
            self.completeness(healthy)

    def per_expert_mismatch(self) -> tuple[str, str]:
        if self.engine == "vllm":
            return "reject", (f"vLLM reads {self.served_as} expert LoRA fused (3-D MoE LoRA, is_3d_moe_weight: "
                              "experts.base_layer = gate_up_proj, experts = down_proj); per-expert experts.<e> "
                              "modules are none it knows and fail the adapter's load")
        return self.peft_unconverted(f"peft converts per-expert LoRA on load only for "
                                     f"{', '.join(sorted(PEFT_CONVERTS_PER_EXPERT))}, not {self.served_as}")[:2]

    def peft_unconverted(self, reason: str) -> tuple[str, str, str]:
        targets, names = self.config.get("target_modules") or [], self.base.module_names
        if isinstance(targets, str):  # a regular expression, or "all-linear" (attention at least)
            matched = targets == "all-linear" or any(re.fullmatch(targets, name) for name in names)
        else:
            matched = any(name == target or name.endswith(f".{target}") for target in targets for name in names)
        fix = self.export_fix("fused")
        if matched:
            return ("ignore", f"{reason}: its experts.<e> keys match no module, loaded with a warning, never applied",
                    fix)
        return ("reject", f"{reason}, and no target_modules entry names a module of the base: peft refuses to load it",
                fix)

    def completeness(self, pairs: list[_Pair]) -> None:
        """vLLM stacks gate, up and down of every expert; peft's converter stacks every expert, fuses gate and up."""
        by_layer = defaultdict(list)
        for pair in pairs:
            by_layer[pair.layer.index].append(pair)
        for index, layer_pairs in sorted(by_layer.items()):
            layer = self.base.layers[index]
            present = defaultdict(set)
            for pair in layer_pairs:
                present[pair.projection].add(pair.expert)
            names = {pair.projection: pair.name for pair in layer_pairs}
            block = layer_pairs[0].block
            keys = [key for pair in layer_pairs for key in pair.keys.values()]
            if self.engine == "vllm":
                required = ("gate", "up", "down")
            else:  # peft: a projection that is there needs every expert; gate needs up and up needs gate
                required = tuple(p for p in ("gate", "up", "down") if present[p] or (p in ("gate", "up") and (
                    present["gate"] or present["up"])))
            missing = defaultdict(list)  # missing projections -> experts
            for expert in range(layer.num_experts):
                gone = tuple(p for p in required if expert not in present[p])
                if gone:
                    missing[gone].append(expert)
            only_down = len(missing) == 1 and next(iter(missing)) == ("down",) and len(
                missing[("down",)]) == layer.num_experts
            for gone, experts in missing.items():
                spelled = [names.get(p) or self.base.family.per_expert_name(p) for p in gone]
                subject = (f"{PEFT_PREFIX}{layer.layer_prefix}.{block}.experts.{_brace(experts)}."
                           f"{_brace(spelled)}")
                whose = ("any" if len(experts) == layer.num_experts else
                         f"expert{'s' if len(experts) > 1 else ''} {_listing(experts)}")
                which = f"{'/'.join(spelled)} for {whose} of the base's {layer.num_experts} experts in layer {index}"
                if self.engine == "vllm":
                    why = (f"no {which}; vLLM stacks gate, up and down of every expert (pack_moe asserts "
                           "each) and fails the adapter's load")
                elif len(experts) == layer.num_experts:
                    why = (f"no {which}; peft's converter fuses gate and up into gate_up_proj and refuses "
                           "one without the other")
                else:
                    why = f"no {which}; peft's converter stacks every expert's tensors (size mismatch)"
                fix = (self.export_fix("per-expert") + ", which writes a zero down_proj LoRA"
                       if only_down and self.engine == "vllm" else
                       "export the trained adapter again with every expert's gate, up and down; hf-moe adapter export "
                       "refuses it as is")
                self.add(keys, "reject", why, fix, subject=subject)


def _grouped(items) -> dict:
    groups: dict = {}
    for group, key in items:
        groups.setdefault(group, []).append(key)
    return groups


def _is_unsloth(adapter: Path, config: dict) -> bool:
    """Saved by unsloth: its model card (README.md) or a base under the unsloth/ namespace says so."""
    readme = adapter / "README.md"
    card = readme.read_text(errors="replace").lower() if readme.is_file() else ""
    return "unsloth" in card or str(config.get("base_model_name_or_path") or "").startswith("unsloth/")


def _brace(values) -> str:
    """`3`, `{0..7}` (three or more consecutive integers), `{gate_proj,up_proj}`."""
    values = list(dict.fromkeys(values))
    if len(values) == 1:
        return str(values[0])
    if all(isinstance(v, int) for v in values) and len(values) >= 3 and values == list(range(values[0],
                                                                                            values[-1] + 1)):
        return f"{{{values[0]}..{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"


def _common_prefix(keys: list[str]) -> str:
    first, last = min(keys), max(keys)
    size = next((i for i, (x, y) in enumerate(zip(first, last, strict=False)) if x != y), min(len(first), len(last)))
    return first[:size]


def _listing(values) -> str:
    return ", ".join(map(str, values))


def braces(keys) -> str:
    """One subject for a group of tensor names: the shared parts once, the differing ones in braces
    (`...experts.{0..3}.{down_proj,gate_proj,up_proj}.lora_{A,B}.weight`), with the count when the braces cover more
    names than the group has."""
    keys = sorted(keys)
    if len(keys) == 1:
        return keys[0]
    split = [re.split(r"([._])", key) for key in keys]
    if len({len(parts) for parts in split}) != 1:  # e.g. with and without a `base_layer.` level
        return f"{_common_prefix(keys).rpartition('.')[0]}.* ({len(keys)} tensors)"
    columns = []
    for position in zip(*split, strict=True):
        values = sorted(set(position), key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
        columns.append([int(v) if v.isdigit() else v for v in values])
    covered = 1
    for column in columns:
        covered *= len(column)
    subject = "".join(_brace(column) for column in columns)
    return subject if covered == len(keys) else f"{subject} ({len(keys)} tensors)"


def check_adapter(adapter_dir: str | Path, engine: str = "vllm", base: str | Path | None = None) -> AdapterCheck:
    """What `engine` ('vllm', 'sglang' or 'peft') would do with each tensor of the LoRA adapter at `adapter_dir` on
    `base` (default: the adapter's base_model_name_or_path, when it is a local folder).

    Returns every tensor with its target and verdict, and one `Problem` per tensor or group the engine would ignore,
    reject or misapply, each naming the fix. Bad input (no adapter, no base, an unsupported base) raises ValueError.

    Example:
    ```python
    >>> from hf_moe.adapters import check_adapter
    >>> result = check_adapter("runs/qwen3-lora", engine="vllm", base="Qwen3-30B-A3B")
    >>> print(result.lines()[0])
    base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight: vllm would reject it: vLLM reads qwen3_moe
    expert LoRA per expert (...) (fix: hf-moe adapter export runs/qwen3-lora OUT --layout per-expert --base ...)
    ```
    """
    AdapterCheckArguments(adapter=str(adapter_dir), engine=engine)  # validates `engine`
    folder = Path(adapter_dir)
    config = read_adapter_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise ValueError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}"
                         f"{' (found adapter_model.bin: only safetensors is read)' if pickled else ''}")
    base_model = open_base(base or default_base(config, str(adapter_dir)))
    targets, fused, per_expert = _classify(_shapes(weights), base_model)
    checker = _Checker(folder, base, config, base_model, engine, has_fused=bool(fused))
    checker.fused(fused)
    checker.per_expert(per_expert)
    for problem in checker.problems:
        for key in problem.tensors:
            if targets[key].verdict not in ACTIONS or ACTIONS.index(problem.action) < ACTIONS.index(
                    targets[key].verdict):
                targets[key].verdict = problem.action
    return AdapterCheck(folder, base_model.path, engine, base_model.config.model_type, checker.served_as,
                        checker.reads, list(targets.values()), checker.problems)


def run_adapter_check(args: AdapterCheckArguments) -> AdapterCheck:
    return check_adapter(args.adapter, args.engine, args.base)


