"""Add-ons for the stock `transformers.Trainer` (and TRL) on MoE models: callbacks, guards, freezing, rollback."""

from ..moe_layers import find_moe_layers, find_routers
from .balancing import AuxLossFreeBalancingCallback, SelectionBiasBalancer
from .callbacks import ExpertStatsCallback, NonFiniteGuardCallback, add_moe_callbacks, all_gradients_finite
from .freezing import freeze_moe
from .optimizer_step import OptimizerStepCallback
from .rollback import train_with_rollback
from .router_stats import RouterStatsRecorder

__all__ = ["AuxLossFreeBalancingCallback", "SelectionBiasBalancer", "ExpertStatsCallback", "NonFiniteGuardCallback",
           "OptimizerStepCallback", "add_moe_callbacks", "all_gradients_finite", "freeze_moe", "train_with_rollback",
           "RouterStatsRecorder", "find_routers", "find_moe_layers"]
