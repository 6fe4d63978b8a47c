"""What the command line runs end to end: fine-tuning, evaluation, the replication study, the demo and the
benchmarks. Recipes import the library; the library never imports a recipe (tests/test_layout.py checks it)."""

from .evaluate import EvaluateArguments, evaluate_model, run_evaluate
from .finetune import FinetuneArguments, FinetuneTrainingArguments, build_trainer, load_for_finetuning, run_finetune

__all__ = ["FinetuneArguments", "FinetuneTrainingArguments", "build_trainer", "run_finetune", "load_for_finetuning",
           "EvaluateArguments", "evaluate_model", "run_evaluate"]
