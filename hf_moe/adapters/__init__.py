"""Expert LoRA adapters that travel: a peft adapter with LoRA on the routed experts rewritten per expert (vLLM,
SGLang, peft's v4 converter), fused (peft `target_parameters`, vLLM's 3-D MoE LoRA) or merged into its base; and
checked against what an engine reads (`check_adapter`)."""

from .check import ENGINES, AdapterCheck, AdapterCheckArguments, Problem, TensorTarget, check_adapter, run_adapter_check
from .export import LAYOUTS, AdapterExportArguments, ExportedAdapter, export_adapter, run_adapter_export
from .per_expert import PerExpertRefusedError

__all__ = ["export_adapter", "run_adapter_export", "AdapterExportArguments", "ExportedAdapter", "LAYOUTS",
           "PerExpertRefusedError", "check_adapter", "run_adapter_check", "AdapterCheckArguments", "AdapterCheck",
           "Problem", "TensorTarget", "ENGINES"]
