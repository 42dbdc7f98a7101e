"""Metrics against a hand-computed confusion matrix (ignore pixels, a class absent)."""

import math

import pytest
import torch

from seglight.metrics import confusion_counts, segmentation_metrics

IGN = 255


def test_against_hand_computed_confusion_matrix():
    # 4 classes; class 3 appears in neither target nor prediction. Two batches.
    target1 = torch.tensor([[[0, 0, 1, 1], [2, 2, IGN, IGN]]])
    pred1 = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 3]]])  # the 3 sits on an ignored pixel
    target2 = torch.tensor([[[1, 1, 0, 2], [IGN, 2, 2, 0]]])
    pred2 = torch.tensor([[[1, 0, 0, 2], [1, 2, 1, 0]]])
    # hand count over non-ignored pixels, rows = target, cols = prediction:
    #   target 0: (0->0),(0->1) | (0->0),(0->0)        -> [3, 1, 0, 0]
    #   target 1: (1->1),(1->1) | (1->1),(1->0)        -> [1, 3, 0, 0]
    #   target 2: (2->2),(2->0) | (2->2),(2->2),(2->1) -> [1, 1, 3, 0]
    confmat = torch.tensor([[3, 1, 0, 0], [1, 3, 0, 0], [1, 1, 3, 0], [0, 0, 0, 0]])
    assert torch.equal(
        confusion_counts(pred1, target1, 4) + confusion_counts(pred2, target2, 4), confmat
    )

    metrics = segmentation_metrics(4, IGN)
    metrics.update(pred1, target1)
    metrics.update(pred2, target2)
    out = metrics.compute()

    # IoU_c = tp / (row + col - tp)
    iou = [3 / (4 + 5 - 3), 3 / (4 + 5 - 3), 3 / (5 + 3 - 3)]
    assert out["IoU"][:3].tolist() == pytest.approx(iou)
    assert math.isnan(out["IoU"][3])  # absent class: NaN, and left out of the mean
    assert out["mIoU"].item() == pytest.approx(sum(iou) / 3)
    assert out["acc"].item() == pytest.approx(9 / 13)
    assert out["mAcc"].item() == pytest.approx((3 / 4 + 3 / 4 + 3 / 5) / 3)


def test_logits_are_argmaxed_and_reset_clears():
    target = torch.tensor([[[0, 1], [1, IGN]]])
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = 1.0  # predicts class 1 everywhere
    metrics = segmentation_metrics(2, IGN)
    metrics.update(logits, target)
    out = metrics.compute()
    assert out["acc"].item() == pytest.approx(2 / 3)
    assert out["IoU"].tolist() == pytest.approx([0.0, 2 / 3])
    metrics.reset()
    metrics.update(torch.tensor([[[0, 0]]]), torch.tensor([[[0, 0]]]))
    assert metrics.compute()["mIoU"].item() == 1.0


def test_one_update_serves_all_metrics():
    metrics = segmentation_metrics(3, IGN)
    metrics.update(torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0, 1, 1]]]))
    states = {id(m.confmat) for m in metrics.values(copy_state=False)}
    assert len(states) == 1  # one shared confusion matrix, counted once


def test_agrees_with_torchmetrics_reference():
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 6, (4, 17, 23), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = IGN
    pred = torch.randint(0, 6, (4, 17, 23), generator=g)
    reference = MulticlassJaccardIndex(6, ignore_index=IGN, average="macro")
    ours = segmentation_metrics(6, IGN)
    ours.update(pred, target)
    assert ours.compute()["mIoU"].item() == pytest.approx(reference(pred, target).item())
