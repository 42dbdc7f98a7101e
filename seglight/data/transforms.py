"""Joint image + mask augmentation on tensors.

Images enter as uint8 [C, H, W] (or float in [0, 255]) and leave float32, normalised; masks enter
as integer [H, W] and leave int64. Geometry (scale, crop, flip) is applied to both with the same
random draws: images bilinearly, masks by nearest neighbour so no new label values appear.
Photometric jitter touches the image only. Padding fills the image with the mean colour (0 after
normalisation) and the mask with the ignore label, so padded pixels never count.

Randomness comes from torch's global generator, which the DataLoader seeds per worker.

Masks may carry leading dimensions ([..., H, W]): every channel gets the same geometry. Instance
data uses this (`WithInstances`): its binary instance masks [N, H, W] travel stacked under the
semantic mask, so boxes, masks and image stay aligned by construction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


def normalize(image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[.., C, H, W] in [0, 255] -> float32 (x / 255 - mean) / std."""
    m = torch.tensor(mean, dtype=torch.float32, device=image.device).view(-1, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32, device=image.device).view(-1, 1, 1) * 255
    return (image.float() - m) / s


def denormalize(
    image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Inverse of normalize: float [.., C, H, W] -> uint8 in [0, 255]."""
    m = torch.tensor(mean, device=image.device).view(-1, 1, 1)
    s = torch.tensor(std, device=image.device).view(-1, 1, 1)
    return ((image.float() * s + m) * 255).round().clamp(0, 255).to(torch.uint8)


def rescale(
    image: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize image [C,H,W] (float) and mask [..., H,W] by `scale`."""
    h, w = mask.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size == (h, w):
        return image, mask
    image = F.interpolate(
        image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=scale < 1
    )[0]
    # nearest-exact samples at pixel centres, like bilinear with align_corners=False; plain
    # "nearest" is shifted by half a pixel and would misalign mask and image
    lead = mask.shape[:-2]
    mask = F.interpolate(mask.reshape(1, -1, h, w), size=size, mode="nearest-exact")
    return image, mask.reshape(*lead, *size)


def pad_to_at_least(
    image: torch.Tensor,
    mask: torch.Tensor,
    size: tuple[int, int],
    fill: tuple[float, ...],
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (bottom/right) to at least `size`: image with `fill` per channel, mask [..., H, W]
    with ignore_index."""
    h, w = mask.shape[-2:]
    ph, pw = max(0, size[0] - h), max(0, size[1] - w)
    if ph == 0 and pw == 0:
        return image, mask
    out = torch.empty((image.shape[0], h + ph, w + pw), dtype=image.dtype, device=image.device)
    out[:] = torch.tensor(fill, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    out[:, :h, :w] = image
    padded = torch.full(
        (*mask.shape[:-2], h + ph, w + pw), ignore_index, dtype=mask.dtype, device=mask.device
    )
    padded[..., :h, :w] = mask
    return out, padded


def random_crop(
    image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random `size` window of image [C,H,W] and mask [..., H,W] (both at least that large)."""
    h, w = mask.shape[-2:]
    top = int(torch.randint(0, h - size[0] + 1, ()).item())
    left = int(torch.randint(0, w - size[1] + 1, ()).item())
    return (
        image[:, top : top + size[0], left : left + size[1]],
        mask[..., top : top + size[0], left : left + size[1]],
    )


def adjust_colour(
    image: torch.Tensor,
    brightness: float | torch.Tensor,
    contrast: float | torch.Tensor,
    saturation: float | torch.Tensor,
) -> torch.Tensor:
    """Scale brightness, then contrast, then saturation of images [..., 3, H, W] in [0, 255].

    Each factor is a float, or for a batch [B, 3, H, W] a tensor [B] (one factor per image, so a
    whole batch is jittered at once on its device). Returns the same shape, clamped to [0, 255].
    """

    def per_image(f: float | torch.Tensor) -> float | torch.Tensor:
        return f.reshape(*f.shape, 1, 1, 1) if isinstance(f, torch.Tensor) else f

    def gray(x: torch.Tensor) -> torch.Tensor:  # luma [..., 1, H, W]
        # Python-number weights: a small weight tensor built on a GPU would be a blocking copy
        return 0.299 * x[..., 0:1, :, :] + 0.587 * x[..., 1:2, :, :] + 0.114 * x[..., 2:3, :, :]

    image = image * per_image(brightness)
    mean = gray(image).mean((-3, -2, -1), keepdim=True)
    image = (image - mean) * per_image(contrast) + mean
    luma = gray(image)
    image = (image - luma) * per_image(saturation) + luma
    return image.clamp(0, 255)


def color_jitter(image: torch.Tensor, strength: float) -> torch.Tensor:
    """Random brightness, contrast and saturation in [1 - strength, 1 + strength], each drawn once.

    image: float [3, H, W] in [0, 255]; returns the same range.
    """
    if strength <= 0:
        return image
    lo, hi = 1 - strength, 1 + strength
    return adjust_colour(image, _uniform(lo, hi), _uniform(lo, hi), _uniform(lo, hi))


def as_labels(mask: torch.Tensor) -> torch.Tensor:
    """A semantic mask [H, W] as int64 (the label contract); stacked masks [K, H, W] (instance
    data, see WithInstances) keep their dtype: int64 copies of many instance masks would take
    eight times the memory."""
    return mask.long() if mask.ndim == 2 else mask


class TrainTransform:
    """Random scale, pad-and-crop to `crop_size`, horizontal flip, colour jitter, normalisation.

    Args:
        crop_size: (H, W) of the training crop; None keeps the full image (and skips scaling).
        scale_range: the random scale factor's range, applied before cropping.
        hflip: flip left-right with probability 0.5.
        color_jitter: strength of the photometric jitter (0 disables it).
        mean, std: normalisation, in [0, 1] units (ImageNet's by default).
        ignore_index: the mask value written into padding.
    """

    def __init__(
        self,
        crop_size: tuple[int, int] | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: bool = True,
        color_jitter: float = 0.2,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        ignore_index: int = 255,
    ) -> None:
        self.crop_size = tuple(crop_size) if crop_size else None
        self.scale_range = tuple(scale_range)
        self.hflip = hflip
        self.color_jitter = color_jitter
        self.mean, self.std = tuple(mean), tuple(std)
        self.ignore_index = ignore_index

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = image.float()
        if self.crop_size is not None:
            if self.scale_range != (1.0, 1.0):
                image, mask = rescale(image, mask, _uniform(*self.scale_range))
            fill = tuple(255 * m for m in self.mean[: image.shape[0]])
            image, mask = pad_to_at_least(image, mask, self.crop_size, fill, self.ignore_index)
            image, mask = random_crop(image, mask, self.crop_size)
        if self.hflip and torch.rand(()).item() < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        if image.shape[0] == 3:
            image = color_jitter(image, self.color_jitter)
        return normalize(image, self.mean, self.std), as_labels(mask)


class EvalTransform:
    """Deterministic: normalisation only, at the full size."""

    def __init__(
        self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
    ) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(image, self.mean, self.std), as_labels(mask)


class Prescale:
    """Rescale image and mask by a fixed `scale` (bilinear / nearest-exact), then `transform`:
    the data's `image_scale` option, for studies at a lower resolution."""

    def __init__(self, transform: Callable, scale: float) -> None:
        self.transform = transform
        self.scale = scale

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(*rescale(image.float(), mask, self.scale))


class WithInstances:
    """A joint image+mask transform (TrainTransform, EvalTransform, Prescale) applied to the
    semantic mask and binary instance masks at once, with the same random draws.

    The instance masks uint8 [N, H, W] are stacked under the semantic mask (values 0..255) and
    transformed as one [1 + N, H, W] mask: resized by nearest neighbour, padded, cropped and
    flipped together. Padding writes the ignore index, which is not 1, so it leaves the instance
    masks 0. Instances that leave the crop come back empty; `instance_targets` drops them.

    Returns (image float [C, H', W'], mask int64 [H', W'], instance masks uint8 [N, H', W']).
    """

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stacked = torch.cat([mask.to(torch.uint8)[None], masks.to(torch.uint8)])
        image, stacked = self.transform(image, stacked)
        return image, stacked[0].long(), (stacked[1:] == 1).to(torch.uint8)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes float [N, 4] (x0, y0, x1, y1 in pixels, x1/y1 exclusive: a one-pixel mask has
    area 1) of binary masks [N, H, W]; every mask must be non-empty."""
    if len(masks) == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    rows, cols = masks.bool().any(2), masks.bool().any(1)  # [N, H], [N, W]
    h, w = masks.shape[-2:]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    x0 = torch.where(cols, ar_w, w).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    return torch.stack([x0, y0, x1, y1], 1).float()


def instance_targets(masks: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"boxes" float [N, 4] xyxy, "labels" int64 [N], "masks" uint8 [N, H, W]} of the non-empty
    masks: instances with an empty mask (cropped away, or a zero-area annotation) are dropped, as
    boxes without area can be neither learned nor scored."""
    keep = masks.flatten(1).bool().any(1)
    masks = masks[keep]
    return {"boxes": mask_boxes(masks), "labels": labels[keep].long(), "masks": masks}
