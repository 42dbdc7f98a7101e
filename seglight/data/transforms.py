"""Joint image + mask augmentation on tensors.

Images enter as uint8 [C, H, W] (or float in [0, 255]) and leave float32, normalised; masks enter
as integer [H, W] and leave int64. Geometry (scale, crop, flip) is applied to both with the same
random draws: images bilinearly, masks by nearest neighbour so no new label values appear.
Photometric jitter touches the image only. Padding fills the image with the mean colour (0 after
normalisation) and the mask with the ignore label, so padded pixels never count.

Randomness comes from torch's global generator, which the training loader seeds per sample
(SeededSamples: a function of the run's seed, the epoch and the position, for exact resume).

Masks may carry leading dimensions ([..., H, W]): every channel gets the same geometry. Instance
data uses this (`WithInstances`): its binary instance masks [N, H, W] travel stacked under the
semantic mask, so boxes, masks and image stay aligned by construction.
"""

from __future__ import annotations

import math
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


def _resize(
    image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int], antialias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image [C,H,W] (float) bilinearly and mask [..., H,W] by nearest-exact, to `size`."""
    h, w = mask.shape[-2:]
    if size == (h, w):
        return image, mask
    image = F.interpolate(
        image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=antialias
    )[0]
    iy, ix = _nearest_index(h, size[0], 0, size[0]), _nearest_index(w, size[1], 0, size[1])
    return image, _gather(mask, iy, ix)


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """The size of an h x w image rescaled by `scale` (rounded, at least 1 x 1)."""
    return max(1, round(h * scale)), max(1, round(w * scale))


def rescale(
    image: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize image [C,H,W] (float) and mask [..., H,W] by `scale` (antialiased below 1)."""
    return _resize(image, mask, scaled_size(*mask.shape[-2:], scale), antialias=scale < 1)


def _linear_taps(
    in_size: int, out_size: int, start: int, count: int, antialias: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Source pixels int64 [count, K] and weights float32 [count, K] of output pixels
    start..start+count-1 when a line of `in_size` pixels is resized to `out_size` as
    F.interpolate(mode="bilinear", align_corners=False, antialias=antialias) resizes each axis;
    None when the line is copied (same size). Taps past the line's end carry weight 0.

    The formulas are torch's (aten/src/ATen/native/UpSample.h, and the antialiased kernel's
    triangle filter widened by the scale, normalised, as PIL does); tests check them against
    F.interpolate. They differ from it only in float32 rounding: torch computes the source
    coordinate scale * (i + 0.5) - 0.5 in float32 (precision ~3e-5 pixel at coordinate 500).
    """
    if in_size == out_size:  # both modes copy (the antialiased filter at scale 1 is a unit tap)
        return None
    i = torch.arange(start, start + count, dtype=torch.float64)
    if antialias:
        scale = in_size / out_size
        support = max(scale, 1.0)  # the triangle's half-width: widened by the scale when shrinking
        centre = scale * (i + 0.5)
        first = torch.floor(centre - support + 0.5).clamp(min=0)
        end = torch.floor(centre + support + 0.5).clamp(max=in_size)
        index = first[:, None] + torch.arange(2 * math.ceil(support) + 1, dtype=torch.float64)
        weight = (1 - ((index - centre[:, None] + 0.5) / support).abs()).clamp(min=0)
        weight = torch.where(index < end[:, None], weight, 0)
        weight = weight / weight.sum(1, keepdim=True)
        return index.clamp(max=in_size - 1).long(), weight.float()
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    real = (scale * (i.float() + 0.5) - 0.5).clamp(min=0)  # the source coordinate
    i0 = real.floor().clamp(max=in_size - 1)
    frac = (real - i0).clamp(0, 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    return torch.stack([i0, i1], 1).long(), torch.stack([1 - frac, frac], 1)


def _resample(x: torch.Tensor, dim: int, taps: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x resampled along `dim` with taps (source index [n, K], weight [n, K]): [.., n, ..]."""
    index, weight = taps[0].to(x.device), taps[1].to(x.device)  # (no-ops on the CPU)
    shape = [1] * x.ndim
    shape[dim] = -1
    out = x.index_select(dim, index[:, 0]).mul_(weight[:, 0].view(shape))
    for k in range(1, index.shape[1]):
        out.addcmul_(x.index_select(dim, index[:, k]), weight[:, k].view(shape))
    return out


def _nearest_index(in_size: int, out_size: int, start: int, count: int) -> torch.Tensor:
    """Source pixels int64 [count] of output pixels start..start+count-1 of a nearest-exact
    resize from `in_size` to `out_size`: F.interpolate's own choice (it resizes a ramp of
    source indices). Masks are resized by gathering these rows and columns: nearest-exact
    samples at pixel centres, like bilinear with align_corners=False (plain "nearest" is shifted
    by half a pixel and would misalign mask and image), and a gather takes any dtype (interpolate
    has no int64 kernel for a one-channel mask)."""
    ramp = torch.arange(in_size, dtype=torch.float32).view(1, 1, -1)
    ramp = F.interpolate(ramp, size=out_size, mode="nearest-exact")[0, 0, start : start + count]
    return ramp.long()


def _gather(mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """mask [..., H, W] at rows [h] x cols [w]: [..., h, w] (one gather of h * w pixels)."""
    flat = (rows[:, None] * mask.shape[-1] + cols).flatten().to(mask.device)
    return mask.flatten(-2).index_select(-1, flat).view(*mask.shape[:-2], len(rows), len(cols))


def scaled_crop(
    image: torch.Tensor,
    mask: torch.Tensor,
    size: tuple[int, int],
    offset: tuple[int, int],
    crop: tuple[int, int],
    fill: tuple[float, ...],
    ignore_index: int,
    antialias: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `crop` window at `offset` (top, left) of image [C,H,W] and mask [..., H,W] resized to
    `size` and padded bottom/right to at least `crop` (image with `fill` per channel, mask with
    `ignore_index`), made from the source pixels under the window only.

    Equal to resizing the whole image with F.interpolate (bilinear, align_corners=False,
    `antialias`; masks nearest-exact), padding and slicing, up to float32 rounding of the image
    (masks exactly), at a cost that follows the crop instead of the scaled image (a random
    scale of 2 made the whole-image resize 4 times the crop). F.interpolate cannot resample a
    window itself: a window's first source pixel generally falls between scaled pixels (at
    offset * H / size), and interpolate has no sub-pixel origin, so each axis is resampled with
    the weights interpolate uses for those output pixels (`_linear_taps`). When the window holds
    the whole scaled image (nothing is thrown away), interpolate resizes it all, as before.

    Returns image float32 [C, crop_h, crop_w] and mask [..., crop_h, crop_w] (the mask's dtype).
    """
    h, w = mask.shape[-2:]
    top, left = offset
    # rows and columns of the window inside the scaled image (the rest is padding)
    nh, nw = min(size[0] - top, crop[0]), min(size[1] - left, crop[1])
    if (nh, nw) == size:
        image, mask = _resize(image.float(), mask, size, antialias)
    else:
        rows = _linear_taps(h, size[0], top, nh, antialias)
        cols = _linear_taps(w, size[1], left, nw, antialias)
        y0, y1 = (int(rows[0].min()), int(rows[0].max()) + 1) if rows else (top, top + nh)
        x0, x1 = (int(cols[0].min()), int(cols[0].max()) + 1) if cols else (left, left + nw)
        # each pass gathers whole rows (fast; a gather along the last dimension is ~10x slower):
        # columns first on the transposed window, then rows, which leaves it contiguous
        image = image[:, y0:y1, x0:x1]
        if cols:
            image = image.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
            image = _resample(image, 1, (cols[0] - x0, cols[1])).transpose(1, 2)
        image = image.float()
        if rows:
            image = _resample(image.contiguous(), 1, (rows[0] - y0, rows[1]))
        mask = _gather(
            mask, _nearest_index(h, size[0], top, nh), _nearest_index(w, size[1], left, nw)
        )
    if (nh, nw) == tuple(crop):
        return image.contiguous(), mask.contiguous()
    out = torch.empty((image.shape[0], *crop), dtype=torch.float32, device=image.device)
    out[:] = torch.tensor(fill, dtype=torch.float32, device=image.device).view(-1, 1, 1)
    out[:, :nh, :nw] = image
    padded = torch.full(
        (*mask.shape[:-2], *crop), ignore_index, dtype=mask.dtype, device=mask.device
    )
    padded[..., :nh, :nw] = mask
    return out, padded


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

    The scale s is uniform in `scale_range`; the crop's position is uniform over the image
    scaled by s and padded (bottom/right) to at least `crop_size`. Only the source pixels under
    the crop are resized (`scaled_crop`): the same pixels as resizing the whole image, then
    padding and cropping, at the cost of the crop. The draws (s, top, left, flip, jitter) come
    from torch's global generator in that order, so a sample's augmentation is a function of
    the seed its loader gives it (exact resume).

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
        if self.crop_size is None:
            image = image.float()
        else:
            scale = _uniform(*self.scale_range) if self.scale_range != (1.0, 1.0) else 1.0
            size = scaled_size(*mask.shape[-2:], scale)
            # a uniform crop position over the scaled image padded (bottom/right) to at least
            # crop_size; then only the source pixels under that window are resized
            ch, cw = self.crop_size
            top = int(torch.randint(0, max(size[0], ch) - ch + 1, ()).item())
            left = int(torch.randint(0, max(size[1], cw) - cw + 1, ()).item())
            fill = tuple(255 * m for m in self.mean[: image.shape[0]])
            image, mask = scaled_crop(
                image, mask, size, (top, left), self.crop_size, fill, self.ignore_index, scale < 1
            )
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
