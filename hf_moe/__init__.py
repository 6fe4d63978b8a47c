"""hf_moe: Mixture-of-Experts decoders (MoE, Switch, MH-MoE) for Hugging Face transformers.

`import hf_moe` registers the model types `hf_moe`, `hf_switch` and `hf_mh_moe` with the Auto classes (the model
classes and the model-card hooks follow with the first hf_moe config, see `hf_moe.auto`); everything else
(upcycling, export, the Hub helpers, 4-bit experts) is imported on first use, so importing hf_moe costs about what
transformers' own Auto import does.
"""

import importlib
import sys
from pathlib import Path

from . import offline_bitsandbytes

__version__ = "0.1.0"

# Public name -> the module that defines it (imported on first access, PEP 562).
_PUBLIC = {
    **dict.fromkeys(
        ["MoeConfig", "SwitchConfig", "MHMoeConfig", "mh_moe_matched_config", "MoeModel", "MoeForCausalLM",
         "MoeForSequenceClassification", "SwitchModel", "SwitchForCausalLM", "SwitchForSequenceClassification",
         "MHMoeModel", "MHMoeForCausalLM", "MHMoeForSequenceClassification", "MoeCausalLMOutput",
         "load_balancing_loss", "router_z_loss", "sequence_balance_loss"], ".modeling"),
    **dict.fromkeys(["upcycle", "UpcycleArguments", "verify_upcycling"], ".upcycling"),
    "UnsupportedCheckpointError": ".errors",
    **dict.fromkeys(["ExportArguments", "ExportRefusedError", "verify_export"], ".export"),
    **dict.fromkeys(["prune", "PruneArguments", "verify_pruning"], ".pruning"),
    **dict.fromkeys(["check_folder", "publish"], ".hub"),
}
__all__ = [*_PUBLIC, "export"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'hf_moe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


offline_bitsandbytes.install()  # bitsandbytes, whoever imports it, without Hub kernels and their notices


def _register() -> None:
    from .auto import register_auto_classes

    register_auto_classes()  # the model classes, card hooks and 4-bit experts follow with the first hf_moe config


# The `hf-moe` command registers when it runs a subcommand (`hf_moe.cli`), so `hf-moe --help` and `--version`
# start without importing torch; every other importer gets the registration at import.
if Path(sys.argv[0] if sys.argv else "").name != "hf-moe":
    _register()
    # `hf_moe.export` is the function, as `hf_moe.upcycle` is: importing the subpackage `hf_moe.export` binds the
    # module to that name, so the function is bound after it, once.
    from .export import export
