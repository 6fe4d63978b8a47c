"""Training MoE models with the stock `transformers.Trainer`: callbacks, guards, freezing, instruction tuning."""

from .callbacks import ExpertStatsCallback, NonFiniteGuardCallback, all_gradients_finite
from .evaluation import EvaluateArguments, evaluate_model, run_evaluate
from .finetune import FinetuneArguments, build_trainer, run_finetune
from .freezing import freeze_moe
from .optimizer_step import OptimizerStepCallback
from .rollback import train_with_rollback
from .router_stats import RouterStatsRecorder, find_routers

__all__ = ["ExpertStatsCallback", "NonFiniteGuardCallback", "all_gradients_finite", "freeze_moe",
           "train_with_rollback", "RouterStatsRecorder", "find_routers", "FinetuneArguments", "build_trainer",
           "run_finetune", "EvaluateArguments", "evaluate_model", "run_evaluate"]
__all__ += ["OptimizerStepCallback"]
