"""GPU-resident data path for small datasets: a split is decoded once into device memory as uint8,
and every batch is scaled, cropped, flipped and colour-jittered there, all its images at once, so
a training step never waits for a loader.

Switched on by the DataModule option `gpu_resident: true`, for any dataset whose Dataset is file
based (has `load(index)`, as every SegmentationDataset). On a machine without a GPU the "device" is
the CPU: it works the same (tests run it there), though seldom faster than loader workers.

Memory: the split's images (N x C x H x W bytes) and masks (N x H x W bytes); CamVid's train split
is 367 x 3 x 360 x 480 = 190 MB of images and 63 MB of masks.

Training batches follow TrainTransform's distribution, drawn per image: a random scale in
`scale_range`, padding to at least `crop_size` (mean colour, ignore label), a random crop, a
horizontal flip, colour jitter, normalisation. Scale, crop and flip are one resampling at per-pixel
source coordinates: bilinear for the image (F.grid_sample, sampling where F.interpolate does) and
the nearest source pixel for the mask (nearest-exact, the pixel TrainTransform picks), at the same
coordinates, so masks stay aligned with their images. One difference: downscaling is not
antialiased here. Evaluation batches are normalised full images, as EvalTransform gives them.

Randomness: the order of an epoch comes from a CPU generator seeded with seed + epoch (the same on
every rank under DDP, each rank taking its share), the augmentation from a generator on the device
seeded from (seed, epoch, rank). Given `seed` a run is repeatable; by default it is drawn from
torch's global generator, so `seed_everything` fixes it. Nothing is read back from the device.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from seglight.data.transforms import EvalTransform, TrainTransform, adjust_colour
from seglight.errors import ConfigError, DataError


@dataclass
class ResidentSplit:
    """A decoded split on one device.

    images: uint8 [N, C, H, W], each image at the top left, smaller ones padded with the mean colour
    masks: uint8 [N, H, W] (int64 if a value exceeds 255), padding = the ignore index
    sizes: int64 [N, 2], each sample's own (height, width), on the device
    names: the N sample names
    """

    images: torch.Tensor
    masks: torch.Tensor
    sizes: torch.Tensor
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)


def load_split(
    dataset: Any,
    device: torch.device | str,
    fill: tuple[int, ...],
    ignore_index: int = 255,
    what: str = "split",
) -> ResidentSplit:
    """Decode every sample of a file-based dataset (threads) and move the lot to `device`.

    fill: the uint8 colour of padding, per channel (the mean colour).
    """
    if not hasattr(dataset, "load"):
        raise ConfigError(
            f"gpu_resident: the {what} dataset ({type(dataset).__name__}) has no load(index) method "
            "returning the raw uint8 image and mask; set gpu_resident: false for this dataset"
        )
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        samples = list(pool.map(dataset.load, range(len(dataset))))
    channels = {image.shape[0] for image, _ in samples}
    if len(channels) != 1:
        raise DataError(f"gpu_resident: the {what} images have different channel counts {channels}")
    n, c = len(samples), channels.pop()
    h = max(mask.shape[-2] for _, mask in samples)
    w = max(mask.shape[-1] for _, mask in samples)
    wide = any(mask.dtype != torch.uint8 and int(mask.max()) > 255 for _, mask in samples)
    images = torch.empty((n, c, h, w), dtype=torch.uint8)
    images[:] = torch.tensor(fill[:c], dtype=torch.uint8).view(-1, 1, 1)
    masks = torch.full((n, h, w), ignore_index, dtype=torch.int64 if wide else torch.uint8)
    sizes = torch.empty((n, 2), dtype=torch.int64)
    for i, (image, mask) in enumerate(samples):
        ih, iw = mask.shape[-2:]
        images[i, :, :ih, :iw] = image
        masks[i, :ih, :iw] = mask
        sizes[i] = torch.tensor([ih, iw])
    pairs = getattr(dataset, "pairs", None)
    names = [Path(p[0]).stem for p in pairs] if pairs else [str(i) for i in range(n)]
    try:
        return ResidentSplit(images.to(device), masks.to(device), sizes.to(device), names)
    except torch.OutOfMemoryError as e:
        gb = (images.numel() + masks.numel() * masks.element_size()) / 1e9
        raise ConfigError(
            f"gpu_resident: the {what} split ({n} samples, {gb:.2f} GB) does not fit in {device} "
            "memory; set gpu_resident: false"
        ) from e


class ResidentLoader:
    """Batches of a ResidentSplit, made on its device (an iterable a Trainer takes as a loader).

    Yields {"image": float32 [B, C, h, w] normalised, "mask": int64 [B, h, w], "name": list[str]};
    (h, w) is the transform's crop_size, or the split's (largest) image size.

    Args:
        data: the decoded split.
        batch_size: images per batch.
        transform: a TrainTransform (its random augmentation, batched here) or an EvalTransform.
        shuffle: a new order every epoch (default: for a TrainTransform).
        drop_last: drop the last incomplete batch (default: in training, if there is a full one).
        seed: base seed of the order and the augmentation (default: drawn from torch's generator).
        rank, world_size: this process's share of each epoch under DDP.
    """

    def __init__(
        self,
        data: ResidentSplit,
        batch_size: int,
        transform: TrainTransform | EvalTransform,
        shuffle: bool | None = None,
        drop_last: bool | None = None,
        seed: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not isinstance(transform, (TrainTransform, EvalTransform)):
            raise ConfigError(
                f"gpu_resident supports TrainTransform and EvalTransform, not {type(transform).__name__} "
                "(a custom transform runs per sample in a DataLoader); set gpu_resident: false"
            )
        self.data, self.batch_size, self.transform = data, batch_size, transform
        self.train = isinstance(transform, TrainTransform)
        self.shuffle = self.train if shuffle is None else shuffle
        self.rank, self.world_size = rank, world_size
        self.drop_last = (
            self.train and self._share() > batch_size if drop_last is None else drop_last
        )
        self.seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
        self.epoch = 0
        self.device = data.images.device
        # constants made once: building a small tensor on a GPU in every batch is a blocking copy
        c = data.images.shape[1]
        mean = torch.tensor(transform.mean[:c], dtype=torch.float32).view(-1, 1, 1) * 255
        std = torch.tensor(transform.std[:c], dtype=torch.float32).view(-1, 1, 1) * 255
        self._mean, self._std = mean.to(self.device), std.to(self.device)
        crop = transform.crop_size if self.train and transform.crop_size else (0, 0)
        self._crop = torch.tensor(crop, dtype=torch.float32).to(self.device)

    def _share(self) -> int:
        n = len(self.data)
        if self.world_size == 1:
            return n
        # training: equal shares, so every rank runs as many steps; evaluation: each sample once
        return n // self.world_size if self.shuffle else len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        share = self._share()
        return share // self.batch_size if self.drop_last else math.ceil(share / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """Sample indices of this rank's share of `epoch` (CPU int64)."""
        n = len(self.data)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(n)
        return order[self.rank :: self.world_size][: self._share()]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        order = self.order(epoch)
        if self.device.type == "cuda":  # from pinned memory: a copy that does not wait for the GPU
            order = order.pin_memory()
        on_device = order.to(self.device, non_blocking=True)  # one copy per epoch
        generator = torch.Generator(device=self.device)
        generator.manual_seed((self.seed * 1_000_003 + epoch * 10_007 + self.rank) % 2**63)
        for b in range(len(self)):
            rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
            index = on_device[rows]
            if self.train:
                image, mask = self.augment(index, generator)
            else:
                image = self.data.images.index_select(0, index)
                mask = self.data.masks.index_select(0, index)
            yield {
                "image": (image.float() - self._mean) / self._std,
                "mask": mask.long(),
                "name": [self.data.names[i] for i in order[rows].tolist()],
            }

    def augment(
        self, index: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented images float [B, C, h, w] in [0, 255] and masks [B, h, w] of samples `index`."""
        t: TrainTransform = self.transform  # type: ignore[assignment]
        images = self.data.images.index_select(0, index)
        b, c, height, width = images.shape
        size = self.data.sizes.index_select(0, index).float()  # [B, 2] each sample's (h, w)
        u = torch.rand((b, 7), generator=generator, device=self.device)
        if t.crop_size is None:  # TrainTransform: full images, no scaling
            crop = (height, width)
            scaled = size
            offset = torch.zeros_like(size)
        else:
            crop = t.crop_size
            lo, hi = t.scale_range
            scale = lo + (hi - lo) * u[:, :1]
            scaled = (size * scale).round().clamp(min=1)  # as transforms.scaled_size sizes it
            room = torch.maximum(scaled, self._crop) - self._crop
            offset = (u[:, 1:3] * (room + 1)).floor()  # TrainTransform's crop, padding included
        # centres of the output pixels, in the coordinates of the scaled (and padded) image
        ys = torch.arange(crop[0], device=self.device) + 0.5
        xs = torch.arange(crop[1], device=self.device) + 0.5
        if t.hflip:
            flip = (u[:, 3:4] < 0.5).float()
            xs = xs * (1 - flip) + (crop[1] - xs) * flip  # [B, w]: flipped crops read right to left
        else:
            xs = xs.expand(b, -1)
        ys = ys[None] + offset[:, :1]  # [B, h]
        xs = xs + offset[:, 1:]
        inside = (ys < scaled[:, :1])[:, :, None] & (xs < scaled[:, 1:])[:, None, :]  # [B, h, w]
        # the same points in the stored image's pixels; clamped to the sample's own border, as
        # F.interpolate clamps (and as bilinear sampling of an unpadded image would)
        sy = torch.minimum((ys * (size[:, :1] / scaled[:, :1])).clamp(min=0.5), size[:, :1] - 0.5)
        sx = torch.minimum((xs * (size[:, 1:] / scaled[:, 1:])).clamp(min=0.5), size[:, 1:] - 0.5)
        grid = torch.stack(
            [
                (2 * sx / width - 1)[:, None, :].expand(-1, crop[0], -1),
                (2 * sy / height - 1)[:, :, None].expand(-1, -1, crop[1]),
            ],
            dim=-1,
        )
        out = F.grid_sample(images.float(), grid, mode="bilinear", align_corners=False)
        out = torch.where(inside[:, None], out, self._mean.view(1, -1, 1, 1))
        # nearest-exact: the source pixel whose area holds the point
        iy, ix = sy.long(), sx.long()
        masks = self.data.masks[index[:, None, None], iy[:, :, None], ix[:, None, :]]
        masks = masks.masked_fill(~inside, t.ignore_index)
        if c == 3 and t.color_jitter > 0:
            factors = 1 - t.color_jitter + 2 * t.color_jitter * u[:, 4:7]
            out = adjust_colour(out, factors[:, 0], factors[:, 1], factors[:, 2])
        return out, masks


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resident_split(
    dataset: Any, device: torch.device, fill: tuple[int, ...], ignore_index: int, what: str
) -> ResidentSplit:
    """`dataset` decoded onto `device` (see load_split), once per dataset and device: the
    training and evaluation loaders of a DataModule share it."""
    per_device = _CACHE.setdefault(dataset, {})
    if device not in per_device:
        per_device[device] = load_split(dataset, device, fill, ignore_index, what)
    return per_device[device]
