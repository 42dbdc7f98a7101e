"""Segmentation metrics on one confusion matrix, kept on the device and synced across DDP ranks.

All metrics here subclass torchmetrics' MulticlassConfusionMatrix (the IoU ones its
MulticlassJaccardIndex), so they share one `confmat` state: put in one MetricCollection with a
compute group, a batch is counted once for all of them. The update is our own: torchmetrics
removes ignored pixels with boolean indexing and counts with bincount, both of which wait for the
GPU (a host sync per step); here ignored pixels go to an extra bin and a scatter_add counts, with
no sync. The reductions are torchmetrics' own.

Definitions (C classes, confusion matrix M[target, pred] over non-ignored pixels):
- IoU_c = M[c,c] / (sum_j M[c,j] + sum_i M[i,c] - M[c,c]);  NaN when class c is in neither the
  targets nor the predictions (absent classes are left out of the mean, as in mmseg and torchmetrics).
- mIoU = mean of IoU_c over the classes that are present (torchmetrics' macro average).
- acc = sum_c M[c,c] / sum M   (pixel accuracy).
- mAcc = mean over classes with target pixels of M[c,c] / sum_j M[c,j]  (mean class accuracy).
"""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex
from torchmetrics.functional.classification.jaccard import _jaccard_index_reduce


def confusion_counts(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Confusion matrix [C, C] (rows: target, cols: prediction) of one batch, without a host sync.

    preds: int labels [B, H, W] or logits [B, C, H, W]; target: int labels [B, H, W].
    """
    if preds.ndim == target.ndim + 1:
        preds = preds.argmax(1)
    preds, target = preds.reshape(-1).long(), target.reshape(-1).long()
    n = num_classes * num_classes
    index = torch.where(target == ignore_index, n, target * num_classes + preds)
    counts = torch.zeros(n + 1, dtype=torch.long, device=target.device)
    counts.scatter_add_(0, index, torch.ones_like(index))
    return counts[:n].view(num_classes, num_classes)


class _FastUpdate:
    """Sync-free update of the shared `confmat` state (see the module docstring)."""

    num_classes: int
    ignore_index: int | None
    confmat: torch.Tensor

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.confmat += confusion_counts(preds, target, self.num_classes, self.ignore_index)


class MeanIoU(_FastUpdate, MulticlassJaccardIndex):
    """mIoU: per-class IoU, averaged over the classes present (torchmetrics' macro average)."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__(
            num_classes, average="macro", ignore_index=ignore_index, validate_args=False
        )


class ClassIoU(_FastUpdate, MulticlassJaccardIndex):
    """Per-class IoU [C]; NaN for a class in neither targets nor predictions."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__(
            num_classes, average="none", ignore_index=ignore_index, validate_args=False
        )

    def compute(self) -> torch.Tensor:
        iou = _jaccard_index_reduce(self.confmat, average="none")
        union = self.confmat.sum(0) + self.confmat.sum(1)
        return iou.masked_fill(union == 0, float("nan"))


class PixelAccuracy(_FastUpdate, MulticlassConfusionMatrix):
    """Fraction of non-ignored pixels labelled correctly."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index=ignore_index, validate_args=False)

    def compute(self) -> torch.Tensor:
        m = self.confmat.double()
        return (m.diagonal().sum() / m.sum().clamp(min=1)).float()


class MeanClassAccuracy(_FastUpdate, MulticlassConfusionMatrix):
    """Mean over classes that have target pixels of the per-class recall."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index=ignore_index, validate_args=False)

    def compute(self) -> torch.Tensor:
        m = self.confmat.double()
        support = m.sum(1)
        recall = m.diagonal() / support.clamp(min=1)
        present = support > 0
        return (recall[present].sum() / present.sum().clamp(min=1)).float()


def segmentation_metrics(
    num_classes: int, ignore_index: int = 255, prefix: str = ""
) -> MetricCollection:
    """mIoU, per-class IoU, pixel accuracy and mean class accuracy, updated once per batch.

    compute() returns {prefix+"mIoU": scalar, prefix+"IoU": [C], prefix+"acc": scalar,
    prefix+"mAcc": scalar}.
    """
    metrics = {
        "mIoU": MeanIoU(num_classes, ignore_index),
        "IoU": ClassIoU(num_classes, ignore_index),
        "acc": PixelAccuracy(num_classes, ignore_index),
        "mAcc": MeanClassAccuracy(num_classes, ignore_index),
    }
    return MetricCollection(metrics, prefix=prefix, compute_groups=[list(metrics)])
