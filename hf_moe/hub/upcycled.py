"""The card of an upcycled folder: lineage and license from the dense source, the upcycling options."""

from pathlib import Path

from ..checkpoints.lineage import source_lineage
from .card import command_line, render_card, write_card


def routing_accuracy_markdown(experts: list[str], report: dict) -> str:
    """The routing-accuracy table of a mixed model (`report`: `hf_moe.upcycling.mixing.routing_accuracy`)."""
    first, best = report["first_layer"], report["best_layer"]
    lines = ["## Routing accuracy", "",
             "Share of each expert's held-out domain prompts whose top expert (router probabilities averaged over "
             "the prompt) is that expert or a copy of it.", "",
             f"| expert | source | held-out prompts | layer {first} | best layer ({best}) |", "|---|---|---|---|---|"]
    for i, source in enumerate(experts):
        lines.append(f"| {i} | `{source}` | {report['heldout_prompts'][i]} | "
                     f"{report['layers'][first][i]:.0%} | {report['layers'][best][i]:.0%} |")
    return "\n".join(lines) + "\n"


def write_upcycled_card(folder: Path, model_name: str, model, args, dense, dtype: str,
                        routing_accuracy: dict | None = None) -> Path:
    """Render and write the README.md of an upcycled or mixed folder (`args`: the `UpcycleArguments`;
    `routing_accuracy`: a mixed model's held-out routing accuracy, shown as a table)."""
    from ..moe_layers import EXPERT_CHOICE_ROUTING, config_routing_kind

    init = args.expert_init
    if getattr(args, "experts", None):
        init = f"expert i's MLP from source i ({', '.join(f'`{source}`' for source in args.experts)}); " \
               f"attention, embeddings and norms: {args.merge_others}"
    elif init == "copy" and args.noise_std:
        init += f" (noise std {args.noise_std} relative)"
    elif init == "drop_upcycle":
        init += f" (drop ratio {args.drop_ratio})"
    elif init == "split":
        init += f" (granularity {args.granularity})"
    if config_routing_kind(model.config) == EXPERT_CHOICE_ROUTING:
        equivalence = (f"Expert-choice routing changes the dense model's function (a token gets a varying number of "
                       f"experts, weighted by unnormalised affinities); the experts are scaled by E/c = "
                       f"{args.num_experts / args.expert_capacity_factor:g} so that the expected output with "
                       "near-uniform routers is the dense one. Until training has estimated the routers' thresholds, "
                       f"inference routes each token to its top-{max(1, round(args.expert_capacity_factor))} experts.")
    elif args.breaks_equivalence:
        equivalence = "This initialisation changes the dense model's function on purpose."
    else:
        equivalence = ("At initialisation the model computes the same function as the dense model (copied experts, "
                       "renormalised top-k, dropless); `hf-moe upcycle --verify` checks it in float32.")
    lineage = source_lineage(dense)
    rows = [("dense source", f"`{lineage.parent}` ({dense.config.model_type})"),
            ("expert init", init), ("router init", args.router_init), ("weights dtype", dtype),
            ("seed", str(args.seed))]
    upcycling = {"rows": rows, "equivalence": equivalence}
    if routing_accuracy is not None:
        upcycling["routing_accuracy"] = routing_accuracy_markdown(args.experts, routing_accuracy)
    card = render_card("upcycled", model.config, model=model, model_name=model_name, lineage=lineage,
                       upcycling=upcycling, command=command_line())
    return write_card(folder, card)
