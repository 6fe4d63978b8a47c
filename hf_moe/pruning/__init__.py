"""MoE → smaller MoE of the same architecture: expert saliency on calibration data (REAP, routing frequency, expert
activation norm), pruning the least salient experts or merging experts (HC-SMoE), written as a model folder."""

from .arguments import PruneArguments
from .calibration import calibration_inputs
from .merge import average_linkage_clusters, euclidean_distances, merge_tensors, merging_plan
from .plan import LayerPlan, accepted_counts, keep_count, pruning_plan
from .prune import SUPPORTED_MODEL_TYPES, open_source, prune, run_prune, write_pruned_folder
from .saliency import METHODS, ExpertSaliency, measure_saliency
from .verify import format_routing_flips, verify_pruning

__all__ = ["prune", "run_prune", "PruneArguments", "measure_saliency", "ExpertSaliency", "METHODS",
           "calibration_inputs", "LayerPlan", "keep_count", "accepted_counts", "pruning_plan",
           "merging_plan", "average_linkage_clusters", "euclidean_distances", "merge_tensors", "open_source",
           "write_pruned_folder", "SUPPORTED_MODEL_TYPES", "verify_pruning", "format_routing_flips"]
