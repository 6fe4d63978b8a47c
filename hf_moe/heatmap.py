"""A rows x experts matrix as a PNG heatmap (expert loads while training, saliency when pruning)."""

from pathlib import Path

import numpy as np
import torch


def save_heatmap(matrix: torch.Tensor, row_labels: list, path: Path, title: str, colorbar_label: str,
                 column_label: str = "expert", row_label: str = "layer", vmax: float | None = None,
                 marks: list[tuple[int, int]] = (), size: tuple[float, float, float, float] = (1.2, 0.45, 1.2, 0.28)
                 ) -> np.ndarray:
    """Write `matrix` as a PNG, an "x" at each (row, column) of `marks`; return the image as (H, W, 3) uint8.
    `size`: figure width = size[0] + size[1] * columns, height = size[2] + size[3] * rows (inches at 100 dpi)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    rows, columns = matrix.shape
    figure, axes = plt.subplots(figsize=(size[0] + size[1] * columns, size[2] + size[3] * rows), dpi=100)
    shown = axes.imshow(matrix.float().numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
    for row, column in marks:
        axes.text(column, row, "x", ha="center", va="center", color="white", fontsize=9, fontweight="bold")
    axes.set_xlabel(column_label)
    axes.set_ylabel(row_label)
    axes.set_xticks(range(columns))
    axes.set_yticks(range(rows), [str(label) for label in row_labels])
    axes.set_title(title, fontsize=9)
    figure.colorbar(shown, ax=axes, label=colorbar_label)
    figure.tight_layout()
    figure.savefig(path)
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image
