"""Per-layer x per-expert load heatmaps as PNG files."""

from pathlib import Path

import numpy as np
import torch

from ..heatmap import save_heatmap


def save_load_heatmap(matrix: torch.Tensor, row_labels: list, path: Path, title: str,
                      column_label: str = "expert", row_label: str = "layer") -> np.ndarray:
    """Write `matrix` (rows x experts, fractions of assignments) as a PNG; return the image as (H, W, 3) uint8."""
    return save_heatmap(matrix, row_labels, path, title, "fraction of assignments", column_label, row_label)
