"""Expert LoRA adapters that travel: a peft adapter with LoRA on the routed experts rewritten per expert (vLLM,
SGLang, peft's v4 converter), fused (peft `target_parameters`, vLLM's 3-D MoE LoRA) or merged into its base."""

from .export import LAYOUTS, AdapterExportArguments, ExportedAdapter, export_adapter, run_adapter_export
from .per_expert import PerExpertRefusedError

__all__ = ["export_adapter", "run_adapter_export", "AdapterExportArguments", "ExportedAdapter", "LAYOUTS",
           "PerExpertRefusedError"]
