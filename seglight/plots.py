"""Figures shared by the callbacks (confusion matrices logged during validation and test) and
`seglight compare` (per-class bars, curves): matplotlib Figures without pyplot, so no global
state and no GUI backend (they work in threads, notebooks and DDP workers)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike


def figure(width: float, height: float):
    # a Figure without pyplot: no global state, no GUI backend, works in threads and notebooks
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def class_scores(confmat: ArrayLike) -> dict[str, np.ndarray]:
    """From a confusion matrix [C, C] (rows: target, columns: prediction): per-class "IoU" and
    "acc" (recall; NaN where undefined, as in seglight.metrics), "pixels" (target pixels) and
    "predicted" (predicted pixels), each [C]."""
    m = np.asarray(confmat, dtype=np.float64)
    tp, pixels, predicted = np.diag(m), m.sum(1), m.sum(0)
    union = pixels + predicted - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(pixels > 0, tp / pixels, np.nan)
    return {"IoU": iou, "acc": acc, "pixels": pixels, "predicted": predicted}


def plot_confusion(
    confmat: ArrayLike,
    class_names: Sequence[str],
    path: str | Path | None = None,
    title: str = "",
) -> np.ndarray:
    """The confusion matrix with each row (true class) normalised to sum to 1, as an RGB image
    uint8 [H, W, 3]; also written to `path` (PNG) when given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = confusion_figure(confmat, class_names, title)
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        save(fig, path)
    return image


def confusion_figure(confmat: ArrayLike, class_names: Sequence[str], title: str = ""):
    """The Figure of `plot_confusion`: confmat [C, C] (rows: target, columns: prediction)."""
    m = np.asarray(confmat, dtype=np.float64)
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    c = len(class_names)
    size = max(4.0, 0.42 * c + 2.0)
    fig = figure(size + 1.0, size)
    ax = fig.subplots()
    shown = ax.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(c), [str(n) for n in class_names], rotation=60, ha="right")
    ax.set_yticks(range(c), [str(n) for n in class_names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if c <= 30:  # the percentages stay readable up to about this many classes
        for i in range(c):
            for j in range(c):
                if rows[i, j] >= 0.005:
                    colour = "white" if rows[i, j] > 0.5 else "black"
                    ax.text(j, i, f"{100 * rows[i, j]:.0f}", ha="center", va="center",
                            fontsize=7, color=colour)  # fmt: skip
    return fig
