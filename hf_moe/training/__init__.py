"""Add-ons for the stock `transformers.Trainer` (and TRL) on MoE models: callbacks, guards, freezing, rollback.

Names are imported on first access (PEP 562): `import hf_moe.training` costs nothing more than `import hf_moe`,
and a callback costs what transformers' `TrainerCallback` does (transformers imports peft with it where installed).
"""

import importlib

# Public name -> the submodule that defines it.
_PUBLIC = {
    **dict.fromkeys(["AuxLossFreeBalancingCallback", "SelectionBiasBalancer"], ".balancing"),
    **dict.fromkeys(["ExpertStatsCallback", "NonFiniteGuardCallback", "add_moe_callbacks", "all_gradients_finite"],
                    ".callbacks"),
    "freeze_moe": ".freezing",
    **dict.fromkeys(["OptimizerStepCallback", "begin_optimizer_step", "end_optimizer_steps", "optimizer_step_skipped"],
                    ".optimizer_step"),
    "train_with_rollback": ".rollback",
    "RouterStatsRecorder": ".router_stats",
    **dict.fromkeys(["find_routers", "find_moe_layers"], "..moe_layers"),
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'hf_moe.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
