"""Instance data: samples that carry per-image instance targets beside the semantic mask.

A sample is the semantic contract plus `instances`:

    {"image": float [3, H, W], "mask": int64 [H, W], "name": str,
     "instances": {"boxes": float [N, 4] (x0, y0, x1, y1 in pixels), "labels": int64 [N],
                   "masks": uint8 [N, H, W] (0/1)}}

and a batch holds `instances` as a list, one dict per image (seglight.data.base.collate pads their
masks with the images). Labels are class indices 1..num_classes-1: class 0 is the background,
which is never an instance (torchvision's detection models reserve label 0 for it too).

Boxes are always the tight boxes of the masks, recomputed after augmentation, so image, masks and
boxes stay aligned (seglight.data.transforms.WithInstances); an instance whose mask is empty (cut
away by a crop, or a zero-area annotation) is dropped. The semantic mask is kept for the semantic
metrics (val/mIoU), so an instance model is scored like every other model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from seglight.data.base import SegmentationDataset
from seglight.data.transforms import WithInstances, instance_targets
from seglight.errors import DataError

#: (index, height, width) -> (instance masks uint8 [N, H, W], labels int64 [N])
InstanceReader = Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]


def no_instances(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty targets: masks uint8 [0, H, W] and labels int64 [0]."""
    return torch.zeros((0, height, width), dtype=torch.uint8), torch.zeros(0, dtype=torch.long)


def masks_from_ids(ids: np.ndarray, label_of: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary masks uint8 [N, H, W] and labels int64 [N] of the ids in `label_of` (id -> class
    index) that occur in the id map `ids` [H, W], in increasing id order."""
    present = [int(i) for i in np.unique(ids) if int(i) in label_of]
    if not present:
        return no_instances(*ids.shape)
    masks = np.stack([ids == i for i in present]).astype(np.uint8)
    labels = torch.tensor([label_of[i] for i in present], dtype=torch.long)
    return torch.from_numpy(masks), labels


class InstanceDataset(SegmentationDataset):
    """Image / semantic-mask pairs plus instance targets -> samples as in the module docstring.

    Args:
        pairs, num_classes, label_map, ignore_index: as SegmentationDataset (the semantic mask).
        transform: a WithInstances transform (augments image, mask and instance masks together).
        read_instances: (index, height, width) -> (masks uint8 [N, H, W], labels int64 [N]) at the
            image's size, before augmentation.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path | None]],
        num_classes: int,
        transform: WithInstances,
        read_instances: InstanceReader,
        label_map: np.ndarray | None = None,
        ignore_index: int = 255,
    ) -> None:
        super().__init__(pairs, num_classes, transform, label_map, ignore_index)
        self.read_instances = read_instances

    def load_instances(
        self, index: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw image uint8 [3, H, W], semantic mask [H, W], instance masks uint8 [N, H, W] and
        labels int64 [N]."""
        image, mask = self.load(index)
        masks, labels = self.read_instances(index, *image.shape[-2:])
        return image, mask, masks, labels

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask, masks, labels = self.load_instances(index)
        image, mask, masks = self.transform(image, mask, masks)
        return {
            "image": image,
            "mask": mask,
            "name": self.pairs[index][0].stem,
            "instances": instance_targets(masks, labels),
        }


class InstanceData:
    """Mixin for a SegmentationDataModule whose samples carry instances: put it first in the
    bases (`class COCOInstances(InstanceData, COCO)`); its transforms become WithInstances and its
    datasets InstanceDatasets (built by the subclass)."""

    #: tells models that train on instance targets (MaskRCNN) that this data has them
    has_instances: ClassVar[bool] = True

    def train_transform(self) -> WithInstances:
        return WithInstances(super().train_transform())  # type: ignore[misc]

    def eval_transform(self) -> WithInstances:
        return WithInstances(super().eval_transform())  # type: ignore[misc]

    def setup(self, stage: str | None = None) -> None:
        if self.gpu_resident:  # type: ignore[attr-defined]
            raise DataError(
                f"{type(self).__name__}: gpu_resident does not carry instance masks; set "
                "--data.gpu_resident false"
            )
        super().setup(stage)  # type: ignore[misc]
