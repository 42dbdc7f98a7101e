"""Segmentation losses. Every loss takes logits [B, C, H, W] and a target [B, H, W] (int64) whose
value `ignore_index` (255) marks pixels that contribute nothing, and returns a scalar.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def load_class_weights(
    spec: list[float] | str | Path | None, num_classes: int
) -> torch.Tensor | None:
    """Class weights from a list or a file (JSON list, JSON {"weights": [...]}, or whitespace-separated
    numbers, one per class). Returns a float32 tensor [num_classes] or None."""
    if spec is None:
        return None
    where = "class_weights"
    if isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        where = f"class_weights file {str(path)!r}"
        if not path.is_file():
            raise FileNotFoundError(f"{where} does not exist")
        text = path.read_text()
        try:
            data = json.loads(text)
            values = data["weights"] if isinstance(data, dict) else data
        except (json.JSONDecodeError, KeyError, TypeError):
            try:
                values = [float(v) for v in text.replace(",", " ").split()]
            except ValueError as e:
                raise ValueError(f"{where}: cannot parse numbers ({e})") from e
    else:
        values = list(spec)
    weights = torch.as_tensor(values, dtype=torch.float32)
    if weights.ndim != 1 or weights.numel() != num_classes:
        raise ValueError(
            f"{where}: expected {num_classes} weights (one per class), got {weights.numel()}"
        )
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"{where}: weights must be finite and >= 0, got {weights.tolist()}")
    return weights


class CrossEntropyLoss(nn.Module):
    """Cross-entropy with ignore_index, optional class weights and label smoothing.

    Reduction: the weighted mean over non-ignored pixels (PyTorch's convention), except that a
    batch in which every pixel is ignored gives a loss of 0 with zero gradients, not NaN.

    Shapes: logits [B, C, H, W] (any float dtype; computed in float32), target [B, H, W] int64.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = 255,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(
            logits.float(),
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction="none",
        )
        valid = target != self.ignore_index
        if self.weight is None:
            denom = valid.sum()
        else:
            denom = (self.weight[target.masked_fill(~valid, 0)] * valid).sum()
        # clamp instead of branching on the count: no host sync, finite when all are ignored
        return loss.sum() / denom.clamp(min=1e-12 if self.weight is not None else 1)
