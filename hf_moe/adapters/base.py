"""The base model an adapter belongs to, as the conversions need it: its sparse layers and their experts' shapes.

Read from the base folder's config alone (a meta-device model: no weights are loaded), through `hf_moe.moe_layers`,
so E, H and I are the experts module's own, never guessed from config fields whose names differ by family (MH-MoE's
experts are d/h wide, gpt-oss stores them transposed).
"""

from dataclasses import dataclass
from pathlib import Path

from ..checkpoints.names import meta_model
from ..checkpoints.reading import ModelFolder, open_model_folder
from ..moe_layers import expert_count_field, find_moe_layers
from .names import ExpertFamily, family_for


@dataclass(frozen=True)
class SparseLayer:
    """One sparse layer's routed experts: E experts mapping H -> I (gate, up) and I -> H (down)."""

    index: int
    experts_name: str  # module name, e.g. model.layers.3.mlp.experts
    num_experts: int
    hidden: int
    intermediate: int

    @property
    def layer_prefix(self) -> str:
        """`model.layers.3`: where the decoder layer's names start."""
        return self.experts_name.rsplit(".", 2)[0]

    def shape(self, projection: str) -> tuple[int, int]:
        """(out, in) of one expert's `projection` ('gate', 'up' or 'down')."""
        return (self.hidden, self.intermediate) if projection == "down" else (self.intermediate, self.hidden)


@dataclass
class BaseModel:
    """The base's folder, config, family (how its experts are named and laid out), sparse layers and module names."""

    folder: ModelFolder
    family: ExpertFamily
    layers: dict[int, SparseLayer]
    module_names: frozenset[str]
    router_names: frozenset[str]  # the sparse layers' routers (`hf_moe.moe_layers`)

    @property
    def config(self):
        return self.folder.config

    @property
    def path(self) -> Path:
        return self.folder.path

    def layer_of_experts(self, experts_name: str) -> SparseLayer | None:
        return next((layer for layer in self.layers.values() if layer.experts_name == experts_name), None)


def open_base(source: str | Path) -> BaseModel:
    """Open the base model folder `source` and read its sparse layers (a model without any raises ValueError)."""
    folder = open_model_folder(source)
    config = folder.config
    family = family_for(config)
    if expert_count_field(config) is None:
        raise ValueError(f"base {source} ({config.model_type}) has no routed experts")
    model = meta_model(config)
    modules = dict(model.named_modules())
    layers, routers = {}, set()
    for moe_layer in find_moe_layers(model):
        routers.add(moe_layer.router_name)
        experts = modules.get(moe_layer.experts_name) if moe_layer.experts_name else None
        gate_up = getattr(experts, "gate_up_proj", None)
        down = getattr(experts, "down_proj", None)
        if gate_up is None or down is None or gate_up.dim() != 3:
            raise ValueError(f"base {source}: {moe_layer.experts_name} has no fused 3-D gate_up_proj / down_proj")
        num_experts, *dims = gate_up.shape  # (E, 2I, H), gpt-oss (E, H, 2I)
        double_intermediate, hidden = reversed(dims) if family.transposed else dims
        layers[moe_layer.index] = SparseLayer(moe_layer.index, moe_layer.experts_name, num_experts, hidden,
                                              double_intermediate // 2)
    if not layers:
        raise ValueError(f"base {source} ({config.model_type}) has no sparse layer hf_moe.moe_layers recognises")
    return BaseModel(folder, family, layers, frozenset(modules), frozenset(routers))
