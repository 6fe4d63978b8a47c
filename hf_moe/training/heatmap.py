"""Per-layer x per-expert load heatmaps as PNG files."""

from pathlib import Path

import numpy as np
import torch


def save_load_heatmap(matrix: torch.Tensor, row_labels: list, path: Path, title: str,
                      column_label: str = "expert", row_label: str = "layer") -> np.ndarray:
    """Write `matrix` (rows x experts, fractions of assignments) as a PNG; return the image as (H, W, 3) uint8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    rows, columns = matrix.shape
    figure, axes = plt.subplots(figsize=(1.2 + 0.45 * columns, 1.2 + 0.28 * rows), dpi=100)
    shown = axes.imshow(matrix.numpy(), aspect="auto", cmap="viridis", vmin=0.0)
    axes.set_xlabel(column_label)
    axes.set_ylabel(row_label)
    axes.set_xticks(range(columns))
    axes.set_yticks(range(rows), [str(label) for label in row_labels])
    axes.set_title(title, fontsize=9)
    figure.colorbar(shown, ax=axes, label="fraction of assignments")
    figure.tight_layout()
    figure.savefig(path)
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image
