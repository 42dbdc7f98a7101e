"""Synthetic shapes: a procedural dataset with no files, for the one-minute CPU demo and tests.

Each image has a smoothly varying background and a few filled shapes (disc, square, triangle,
ring). A shape's colour is drawn around its class's hue with much overlap and noise is added, so
a network must use both colour and shape; a small U-Net learns it in about a minute on a CPU.
Sample i of a split is the same every time (seeded by split and index).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset

from seglight.data.base import SegmentationDataModule, Transform

SPLIT_SEEDS = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def _hue_to_rgb(h: torch.Tensor) -> torch.Tensor:
    """Fully saturated colour for hue h in [0, 1): [3]."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h * 6) % 6
    return 1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def gradient_background(
    size: tuple[int, int], g: torch.Generator, brightness: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random linear gradient between two dark colours (each channel below `brightness`):
    image float [3, H, W] in [0, 1], and the pixel grid's row and column coordinates [H, W]."""
    h, w = size
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    c0, c1 = torch.rand(3, generator=g) * brightness, torch.rand(3, generator=g) * brightness
    angle = torch.rand((), generator=g) * 2 * math.pi
    t = ((xx / w) * torch.cos(angle) + (yy / h) * torch.sin(angle)).clamp(0, 1)
    return c0.view(3, 1, 1) * (1 - t) + c1.view(3, 1, 1) * t, yy, xx


def shape_mask(kind: int, dy: torch.Tensor, dx: torch.Tensor, r: float) -> torch.Tensor:
    """Where shape `kind` (1 disc, 2 axis-aligned square, 3 triangle pointing up, 4 ring) of
    radius r lies, at offsets dy, dx [H, W] from its centre: bool [H, W]."""
    if kind == 1:
        return dy**2 + dx**2 <= r**2
    if kind == 2:
        return (dy.abs() <= r * 0.85) & (dx.abs() <= r * 0.85)
    if kind == 3:
        return (dy <= r * 0.7) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.6)
    d2 = dy**2 + dx**2
    return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)


def make_shapes(
    size: tuple[int, int], seed: int, max_shapes: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthetic sample: image uint8 [3, H, W] and mask uint8 [H, W] (0 = background)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    image, yy, xx = gradient_background(size, g)
    mask = torch.zeros(h, w, dtype=torch.uint8)
    n = int(torch.randint(1, max_shapes + 1, (), generator=g))
    for _ in range(n):
        cls = int(torch.randint(1, 5, (), generator=g))
        cy, cx = (torch.rand(2, generator=g) * torch.tensor([h, w])).tolist()
        r = float(min(h, w) * (0.08 + 0.14 * torch.rand((), generator=g)))
        inside = shape_mask(cls, yy - cy, xx - cx, r)
        hue = (cls - 1) / 4 + 0.18 * torch.randn((), generator=g)
        colour = _hue_to_rgb(hue % 1.0) * (0.6 + 0.4 * torch.rand((), generator=g))
        image = torch.where(inside, colour.view(3, 1, 1), image)
        mask[inside] = cls
    image = image + 0.06 * torch.randn(image.shape, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), mask


class SyntheticShapesDataset(Dataset):
    """`length` procedural samples of `size`, transformed like file-based data."""

    def __init__(self, length: int, size: tuple[int, int], seed: int, transform: Transform) -> None:
        self.length, self.size, self.seed, self.transform = length, tuple(size), seed, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = make_shapes(self.size, self.seed + index)
        image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, "name": f"shapes_{self.seed + index:08d}"}


class Synthetic(SegmentationDataModule):
    """Procedural shapes (background, disc, square, triangle, ring); no files, no download.

    Args:
        num_train: training samples; num_val / num_test likewise.
        image_size: (H, W) of every sample.
        **kwargs: batch size, workers and augmentation: see SegmentationDataModule.
    """

    class_names: ClassVar[tuple[str, ...]] = ("background", "disc", "square", "triangle", "ring")
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = (
        (0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48),
    )  # fmt: skip

    def __init__(
        self,
        num_train: int = 512,
        num_val: int = 64,
        num_test: int = 64,
        image_size: tuple[int, int] = (64, 64),
        **kwargs,
    ) -> None:
        kwargs.setdefault("num_workers", 0)
        super().__init__(**kwargs)
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.image_size = tuple(image_size)

    def build_dataset(self, split: str, train: bool) -> SyntheticShapesDataset:
        transform = self.train_transform() if train else self.eval_transform()
        return SyntheticShapesDataset(
            self.sizes[split], self.image_size, SPLIT_SEEDS[split], transform
        )
