"""The README.md (model card) of an upcycled model folder, from `model_cards/upcycled.md`."""

from importlib import resources
from pathlib import Path
from string import Template

ARCHITECTURE_NAMES = {"hf_moe": "top-k Mixture-of-Experts", "hf_switch": "Switch Transformer (top-1)",
                      "hf_mh_moe": "Multi-Head Mixture-of-Experts"}


def write_model_card(folder: Path, model_name: str, config, parameters: int, expert_init: str, router_init: str,
                     breaks_equivalence: bool) -> None:
    """Render `model_cards/upcycled.md` with the config and the upcycling options into `folder/README.md`."""
    if breaks_equivalence:
        equivalence = "This initialisation changes the dense model's function on purpose."
    else:
        equivalence = ("At initialisation the model computes the same function as the dense model "
                       "(copied experts, renormalised top-k, dropless inference).")
    template = resources.files("hf_moe.model_cards").joinpath("upcycled.md").read_text()
    text = Template(template).safe_substitute(
        base_model=config.base_model or "unknown",
        model_type=config.model_type,
        model_name=model_name,
        architecture=ARCHITECTURE_NAMES[config.model_type],
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        sparse_layers=len(config.sparse_layer_indices),
        num_layers=config.num_hidden_layers,
        expert_init=expert_init,
        router_init=router_init,
        parameters=f"{parameters / 1e6:.1f}M",
        equivalence=equivalence,
    )
    (Path(folder) / "README.md").write_text(text)
