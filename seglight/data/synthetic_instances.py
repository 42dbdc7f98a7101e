"""Synthetic instances: a procedural instance-segmentation set with no files, for Mask R-CNN on a
CPU budget (README "Mask R-CNN on a CPU budget") and tests.

Each image has a smoothly varying dark background and 1 to `max_instances` filled shapes of
three classes (disc, square, triangle), each class drawn around its own hue, plus pixel noise.
Shapes never overlap and keep a gap of at least `GAP` pixels between their boxes, so every
instance is one connected region that no other instance touches: the instances are separable,
and each instance's mask is exactly its shape. The semantic mask is the union of the instance
masks, each pixel labelled with its instance's class (0 = background).

Sample i of a split is the same every time (seeded by split and index), as for Synthetic. Samples
follow the instance contract of seglight.data.instances (`instances`: boxes, labels, masks),
augmented by WithInstances, so a flip moves image, semantic mask, instance masks and boxes alike.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset

from seglight.data.instances import InstanceData
from seglight.data.synthetic import (
    SPLIT_SEEDS,
    Synthetic,
    _hue_to_rgb,
    gradient_background,
    shape_mask,
)
from seglight.data.transforms import WithInstances, instance_targets
from seglight.errors import DataError

#: empty pixels kept between two shapes' boxes (nearest-neighbour resizing never merges them)
GAP = 2
#: placements tried per shape before it is left out (a crowded image gets fewer shapes)
TRIES = 20
#: each class's hue (disc red, square green, triangle blue), drawn with a little spread
HUES = (0.0, 0.33, 0.62)


def make_instances(
    size: tuple[int, int], seed: int, max_instances: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample: image uint8 [3, H, W], semantic mask uint8 [H, W] (0 = background), instance
    masks uint8 [N, H, W] (0/1, disjoint) and labels int64 [N] (1..3), 1 <= N <= max_instances."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    image, yy, xx = gradient_background(size, g, brightness=0.35)
    mask = torch.zeros(h, w, dtype=torch.uint8)
    taken = torch.zeros(h, w, dtype=torch.bool)  # the shapes' boxes, grown by GAP
    masks, labels = [], []
    n = int(torch.randint(1, max_instances + 1, (), generator=g))
    for _ in range(n):
        cls = int(torch.randint(1, len(HUES) + 1, (), generator=g))
        r = float(min(h, w) * (0.10 + 0.10 * torch.rand((), generator=g)))
        for _ in range(TRIES):
            # the centre keeps the whole shape inside the image
            cy, cx = (
                r + torch.rand(2, generator=g) * torch.tensor([h - 2 * r, w - 2 * r])
            ).tolist()
            inside = shape_mask(cls, yy - cy, xx - cx, r)
            rows, cols = inside.any(1).nonzero(), inside.any(0).nonzero()
            if len(rows) == 0:
                continue
            y0, y1 = max(0, int(rows[0]) - GAP), int(rows[-1]) + GAP + 1
            x0, x1 = max(0, int(cols[0]) - GAP), int(cols[-1]) + GAP + 1
            if not taken[y0:y1, x0:x1].any():
                break
        else:
            continue  # no room left for this shape
        taken[y0:y1, x0:x1] = True
        hue = HUES[cls - 1] + 0.04 * torch.randn((), generator=g)
        colour = _hue_to_rgb(hue % 1.0) * (0.65 + 0.35 * torch.rand((), generator=g))
        image = torch.where(inside, colour.view(3, 1, 1), image)
        mask[inside] = cls
        masks.append(inside.to(torch.uint8))
        labels.append(cls)
    image = image + 0.05 * torch.randn(image.shape, generator=g)
    image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    # the first shape always fits (an empty image): N >= 1
    return image, mask, torch.stack(masks), torch.tensor(labels, dtype=torch.long)


class SyntheticInstancesDataset(Dataset):
    """`length` procedural instance samples of `size` (seglight.data.instances' sample format)."""

    def __init__(
        self,
        length: int,
        size: tuple[int, int],
        seed: int,
        transform: WithInstances,
        max_instances: int = 4,
    ) -> None:
        self.length, self.size, self.seed = length, tuple(size), seed
        self.transform, self.max_instances = transform, max_instances

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask, masks, labels = make_instances(
            self.size, self.seed + index, self.max_instances
        )
        image, mask, masks = self.transform(image, mask, masks)
        return {
            "image": image,
            "mask": mask,
            "name": f"instances_{self.seed + index:08d}",
            "instances": instance_targets(masks, labels),
        }


class SyntheticInstances(InstanceData, Synthetic):
    """Procedural instances (discs, squares, triangles on a noisy background); no files.

    Args:
        max_instances: at most this many shapes per image (at least one; fewer when they do not
            fit without touching).
        **kwargs: the sizes as Synthetic's (num_train, num_val, num_test, image_size: (H, W), at
            least 16 x 16); batch size, workers and augmentation: see SegmentationDataModule.
    """

    class_names: ClassVar[tuple[str, ...]] = Synthetic.class_names[:4]  # no ring
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = Synthetic.palette[:4]

    def __init__(self, max_instances: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if len(self.image_size) != 2 or min(self.image_size) < 16:
            raise DataError(
                f"image_size must be [height, width], each >= 16, got {list(self.image_size)}"
            )
        if max_instances < 1:
            raise DataError(f"max_instances must be >= 1, got {max_instances}")
        self.max_instances = max_instances

    def build_dataset(self, split: str, train: bool) -> SyntheticInstancesDataset:
        transform = self.train_transform() if train else self.eval_transform()
        return SyntheticInstancesDataset(
            self.sizes[split], self.image_size, SPLIT_SEEDS[split], transform, self.max_instances
        )
