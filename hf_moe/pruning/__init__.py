"""MoE → smaller MoE of the same architecture: expert saliency on calibration data (REAP, routing frequency, expert
activation norm), pruning the least salient experts or merging experts (HC-SMoE), written as a model folder.

Exported here: what users and the command line call (`prune`, `run_prune`, `PruneArguments`, `verify_pruning`) and
the saliency `prune(..., saliency=...)` accepts (`measure_saliency`, `ExpertSaliency`); the rest is internal to its
module."""

from .arguments import PruneArguments
from .prune import prune, run_prune
from .saliency import ExpertSaliency, measure_saliency
from .verify import verify_pruning

__all__ = ["prune", "run_prune", "PruneArguments", "measure_saliency", "ExpertSaliency", "verify_pruning"]
