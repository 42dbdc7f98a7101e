"""Segmentation losses, and their composition from YAML.

Every loss takes logits [B, C, H, W] (any float dtype) and a target [B, H, W] (int64) whose value
`ignore_index` (255) marks pixels that contribute nothing (no loss, no gradient), and returns a
float32 scalar. Losses are computed in float32 with autocast disabled, so they are safe inside a
bf16/fp16 autocast region. A batch in which every pixel is ignored gives a loss of 0 with zero,
finite gradients. No loss waits for the GPU (no host sync), except "unet", whose weight maps
are computed on the host.

Names for `loss:` in a model's options (`build_loss`):

    ce       cross-entropy, with class weights and label smoothing   CrossEntropyLoss
    focal    focal loss (Lin et al. 2017)                           FocalLoss
    dice     soft multiclass Dice (Milletari et al. 2016)           DiceLoss
    lovasz   Lovasz-softmax (Berman et al. 2018)                    LovaszSoftmaxLoss
    ohem     online hard example mining cross-entropy (PSPNet)      OhemCrossEntropyLoss
    unet     U-Net's border-weighted cross-entropy (Ronneberger 2015, eq. 2)  UNetWeightedLoss

The model's `class_weights` go to the losses that take a `weight` (ce, focal, ohem, unet) and its
`label_smoothing` to ce and ohem.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seglight.errors import ConfigError

MEDIAN_FREQUENCY = "median_frequency"


# ----------------------------------------------------------------------------- class weights
def load_class_weights(
    spec: list[float] | str | Path | None, num_classes: int
) -> torch.Tensor | None:
    """Class weights from a list or a file (JSON list, JSON {"weights": [...]}, or whitespace-separated
    numbers, one per class). Returns a float32 tensor [num_classes] or None.

    "median_frequency" also gives None here: those weights come from the training masks, which
    the model reads at setup (seglight.data.stats)."""
    if spec is None or spec == MEDIAN_FREQUENCY:
        return None
    where = "class_weights"
    if isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        where = f"class_weights file {str(path)!r}"
        if not path.is_file():
            raise FileNotFoundError(
                f"{where} does not exist (class_weights is a list, a file or {MEDIAN_FREQUENCY!r})"
            )
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


def set_class_weights(loss: nn.Module, weight: torch.Tensor) -> None:
    """Give `weight` [C] to every loss inside `loss` that takes class weights (a `weight` buffer)."""
    for module in loss.modules():
        if "weight" in module._buffers:
            module.weight = weight.clone()


# ----------------------------------------------------------------------------- the losses
class SegmentationLoss(nn.Module):
    """Base of the losses here: casts the logits to float32 and disables autocast around `loss`,
    which subclasses implement on logits [B, C, H, W] float32 and target [B, H, W] int64."""

    def __init__(self, ignore_index: int = 255) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            return self.loss(logits.float(), target)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _valid(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(valid mask [B, H, W] bool, target with ignored pixels set to class 0)."""
        valid = target != self.ignore_index
        return valid, target.masked_fill(~valid, 0)


class CrossEntropyLoss(SegmentationLoss):
    """Cross-entropy with ignore_index, optional class weights and label smoothing.

    Reduction: the weighted mean over non-ignored pixels (PyTorch's convention).

    Args:
        weight: class weights [C] or None.
        ignore_index: the ignored target value.
        label_smoothing: PyTorch's label smoothing (mass spread uniformly over the classes).
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = 255,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(ignore_index)
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight, persistent=False)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # reduction "sum" (what "mean" divides): no per-pixel loss tensor is kept
        loss = F.cross_entropy(
            logits,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )
        valid, safe = self._valid(target)
        denom = valid.sum() if self.weight is None else (self.weight[safe] * valid).sum()
        # clamp instead of branching on the count: no host sync, finite when all are ignored
        return loss / denom.clamp(min=1e-12 if self.weight is not None else 1)


class FocalLoss(SegmentationLoss):
    """Focal loss (Lin et al., ICCV 2017): FL = -alpha_y (1 - p_y)^gamma log p_y per pixel,
    averaged over non-ignored pixels (gamma = 0 and no weight is plain cross-entropy).

    Args:
        gamma: focusing parameter (2 in the paper).
        weight: per-class alpha [C], or None for 1.
        ignore_index: the ignored target value.
    """

    def __init__(
        self, gamma: float = 2.0, weight: torch.Tensor | None = None, ignore_index: int = 255
    ) -> None:
        super().__init__(ignore_index)
        self.gamma = gamma
        self.register_buffer("weight", weight, persistent=False)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, safe = self._valid(target)
        log_p = F.log_softmax(logits, 1).gather(1, safe[:, None])[:, 0]  # [B, H, W]
        p = log_p.exp()
        loss = -((1 - p).clamp(min=0) ** self.gamma) * log_p
        if self.weight is not None:
            loss = loss * self.weight[safe]
        return (loss * valid).sum() / valid.sum().clamp(min=1)


class DiceLoss(SegmentationLoss):
    """Soft multiclass Dice loss over the batch: with p = softmax(logits) and y one-hot, over the
    non-ignored pixels of the whole batch,

        dice_c = (2 sum p_c y_c + smooth) / (sum p_c + sum y_c + smooth),  loss = 1 - mean_c dice_c

    where the mean runs over the classes present in the target (as segmentation_models.pytorch
    does; a class absent from the batch would otherwise only push its probabilities to 0).

    Args:
        smooth: added to numerator and denominator.
        eps: keeps the denominator positive.
        ignore_index: the ignored target value.
    """

    def __init__(self, smooth: float = 0.0, eps: float = 1e-7, ignore_index: int = 255) -> None:
        super().__init__(ignore_index)
        self.smooth, self.eps = smooth, eps

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, safe = self._valid(target)
        num_classes = logits.shape[1]
        probs = logits.softmax(1)  # the only [B, C, H, W] tensor made here
        weight = valid.to(probs.dtype)  # [B, H, W]
        # sums per class without a one-hot [B, C, H, W] (which made Dice 5x CE and super-linear
        # in the pixels): sum p_c y_c is the true class's probability summed per class, sum y_c
        # the class's pixel count, sum p_c one contraction over the valid pixels
        p_true = probs.gather(1, safe[:, None])[:, 0] * weight
        index = safe.flatten()
        inter = probs.new_zeros(num_classes).scatter_add(0, index, p_true.flatten())
        count = probs.new_zeros(num_classes).scatter_add(0, index, weight.flatten())
        denom = torch.einsum("bchw,bhw->c", probs, weight) + count
        dice = (2 * inter + self.smooth) / (denom + self.smooth).clamp(min=self.eps)
        present = count > 0
        return ((1 - dice) * present).sum() / present.sum().clamp(min=1)


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors (Berman et al.,
    Alg. 1): gt_sorted [..., N] in {0, 1}, sorted by decreasing error. Returns [..., N]."""
    gts = gt_sorted.sum(-1, keepdim=True)
    intersection = gts - gt_sorted.cumsum(-1)
    union = gts + (1 - gt_sorted).cumsum(-1)
    jaccard = 1 - intersection / union
    return torch.cat([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], -1)


class LovaszSoftmaxLoss(SegmentationLoss):
    """Lovasz-softmax loss (Berman, Rannen Triki and Blaschko, CVPR 2018): for each class c
    present in the target, the Lovasz extension of the Jaccard loss applied to the errors
    |[y = c] - p_c| of the non-ignored pixels; averaged over the present classes.

    Ignored pixels are given error 0 and label 0 rather than removed (which would need a host
    sync): sorted last, they multiply a zero error and change nothing.

    Args:
        per_image: compute the loss per image and average over images (Berman's per_image);
            default: over the whole batch as one image.
        ignore_index: the ignored target value.
    """

    def __init__(self, per_image: bool = False, ignore_index: int = 255) -> None:
        super().__init__(ignore_index)
        self.per_image = per_image

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, safe = self._valid(target)
        b, c = logits.shape[:2]
        groups = b if self.per_image else 1
        probs = logits.softmax(1).transpose(0, 1).reshape(c, b, -1)  # [C, B, HW]
        fg = safe.reshape(1, b, -1) == torch.arange(c, device=logits.device)[:, None, None]
        fg = (fg & valid.reshape(1, b, -1)).float()
        errors = (fg - probs).abs() * valid.reshape(1, b, -1)
        # [groups, C, N]: one row per (image or batch, class)
        errors = errors.reshape(c, groups, -1).transpose(0, 1)
        fg = fg.reshape(c, groups, -1).transpose(0, 1)
        errors_sorted, order = errors.sort(-1, descending=True)
        losses = (errors_sorted * lovasz_grad(fg.gather(-1, order))).sum(-1)  # [groups, C]
        present = (fg.sum(-1) > 0).float()
        per_group = (losses * present).sum(-1) / present.sum(-1).clamp(min=1)
        has_any = (present.sum(-1) > 0).float()
        return (per_group * has_any).sum() / has_any.sum().clamp(min=1)


class OhemCrossEntropyLoss(SegmentationLoss):
    """Cross-entropy over the hard pixels only (OHEM, as PSPNet's and mmseg's OHEMPixelSampler):
    the non-ignored pixels whose probability of the true class is below a threshold, where the
    threshold is raised if needed so that at least `min_kept` pixels per image are kept:
    threshold = max(thresh, k-th smallest true-class probability), k = min(min_kept * B, n - 1).
    The loss is the (class-weighted) mean cross-entropy over the kept pixels.

    Args:
        thresh: probability below which a pixel is hard (0.7 in mmseg's configs).
        min_kept: pixels kept at least, per image (mmseg's default 100000).
        weight: class weights [C] or None.
        label_smoothing: label smoothing of the cross-entropy.
        ignore_index: the ignored target value.
    """

    def __init__(
        self,
        thresh: float = 0.7,
        min_kept: int = 100_000,
        weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int = 255,
    ) -> None:
        super().__init__(ignore_index)
        self.thresh, self.min_kept, self.label_smoothing = thresh, min_kept, label_smoothing
        self.register_buffer("weight", weight, persistent=False)

    def hard_pixels(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """bool [B, H, W]: the pixels the loss keeps."""
        valid, safe = self._valid(target)
        with torch.no_grad():
            p_true = logits.softmax(1).gather(1, safe[:, None])[:, 0]
            # the k-th smallest true-class probability, k = min(min_kept * B, n_valid - 1), by
            # selection (kthvalue: linear time), not a sort of every pixel. Ignored pixels rank
            # last (2 > any probability), so at the static k = min_kept * B the value is right
            # whenever n_valid > k; otherwise k = n_valid - 1 picks the largest valid value. No
            # boolean indexing, no host sync.
            flat = p_true.masked_fill(~valid, 2.0).flatten()
            k = min(self.min_kept * len(target), flat.numel() - 1)
            kth_static = flat.kthvalue(k + 1).values
            largest = p_true.masked_fill(~valid, -1.0).max()
            kth = torch.where(valid.sum() - 1 < k, largest, kth_static)
            threshold = torch.maximum(kth, kth.new_tensor(self.thresh))
            return valid & (p_true < threshold)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        keep = self.hard_pixels(logits, target)
        _, safe = self._valid(target)
        loss = F.cross_entropy(
            logits, safe, weight=self.weight, label_smoothing=self.label_smoothing, reduction="none"
        )
        w = keep.float() if self.weight is None else self.weight[safe] * keep
        return (loss * keep).sum() / w.sum().clamp(min=1e-12 if self.weight is not None else 1)


# ----------------------------------------------------------------------------- U-Net's weights
def unet_weight_map(
    mask: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: np.ndarray | None = None,
    ignore_index: int = 255,
    background_class: int | None = None,
) -> np.ndarray:
    """U-Net's pixel weights (Ronneberger et al. 2015, eq. 2) for one mask [H, W]:

        w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

    The "cells" are the connected components (4-connectivity) of each class, except
    `background_class` (the paper's background, which is not an object); d1 and d2 are the
    distances to the nearest and second-nearest component (0 for a pixel's own component, so
    pixels where two objects touch get the most weight). w_c is `class_weights[class]` (1 if
    None). Ignored pixels get 0.

    Exact where d1 + d2 < 5 sigma; beyond, the border term (< w0 * 4e-6) is taken as 0, which
    lets each component's distance transform run on its bounding box plus a 5 sigma margin.
    Returns float32 [H, W].
    """
    from scipy import ndimage

    h, w = mask.shape
    valid = mask != ignore_index
    if class_weights is None:
        weights = valid.astype(np.float32)
    else:
        weights = np.where(
            valid, np.asarray(class_weights, np.float32)[np.where(valid, mask, 0)], 0
        )
        weights = weights.astype(np.float32)
    margin = int(math.ceil(5 * sigma))
    d1 = np.full((h, w), np.inf, np.float32)
    d2 = np.full((h, w), np.inf, np.float32)
    for cls in np.unique(mask[valid]):
        if cls == background_class:
            continue
        components, _ = ndimage.label(mask == cls)
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            ys = slice(max(0, box[0].start - margin), min(h, box[0].stop + margin))
            xs = slice(max(0, box[1].start - margin), min(w, box[1].stop + margin))
            dist = ndimage.distance_transform_edt(components[ys, xs] != index).astype(np.float32)
            near1, near2 = d1[ys, xs], d2[ys, xs]
            # keep the two smallest distances seen so far
            near2[...] = np.minimum(near2, np.maximum(near1, dist))
            near1[...] = np.minimum(near1, dist)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))  # inf -> 0
    return np.where(valid, weights + border, 0).astype(np.float32)


class UNetWeightedLoss(SegmentationLoss):
    """U-Net's weighted cross-entropy (Ronneberger et al. 2015, eq. 1-2): sum over non-ignored
    pixels of w(x) * CE(x), divided by their number; w from `unet_weight_map` (w0 = 10 and
    sigma = 5 pixels are the paper's values).

    The weight maps are computed on the host (scipy distance transforms) from the masks the
    loss sees, and cached in memory (LRU, `cache_size` maps) keyed by the mask's content: a
    sample's name would not identify its randomly cropped and flipped mask. Without
    augmentation (and in validation) each sample's map is computed once; with random crops most
    maps are new, at a few ms to ~100 ms per 360x480 mask on one core.

    Args:
        w0: border weight.
        sigma: border width in pixels.
        weight: w_c, class weights [C] (e.g. class_weights: median_frequency), or None for 1.
        background_class: a class that is not an object (the paper's background), or None.
        cache_size: weight maps kept in memory.
        ignore_index: the ignored target value.
    """

    def __init__(
        self,
        w0: float = 10.0,
        sigma: float = 5.0,
        weight: torch.Tensor | None = None,
        background_class: int | None = None,
        cache_size: int = 256,
        ignore_index: int = 255,
    ) -> None:
        super().__init__(ignore_index)
        self.w0, self.sigma, self.background_class = w0, sigma, background_class
        self.cache_size = cache_size
        self.register_buffer("weight", weight, persistent=False)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def weight_maps(self, target: torch.Tensor) -> torch.Tensor:
        """float32 [B, H, W] on target's device."""
        masks = target.detach().cpu().numpy()
        class_weights = None if self.weight is None else self.weight.cpu().numpy()
        maps = []
        for mask in masks:
            key = hashlib.blake2b(mask.tobytes(), digest_size=16)
            key.update(str((mask.shape, class_weights is None or class_weights.tobytes())).encode())
            digest = key.hexdigest()
            if digest in self._cache:
                self._cache.move_to_end(digest)
            else:
                self._cache[digest] = unet_weight_map(
                    mask, self.w0, self.sigma, class_weights, self.ignore_index,
                    self.background_class,
                )  # fmt: skip
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            maps.append(self._cache[digest])
        return torch.from_numpy(np.stack(maps)).to(target.device)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, safe = self._valid(target)
        ce = F.cross_entropy(logits, safe, reduction="none")
        return (ce * self.weight_maps(target)).sum() / valid.sum().clamp(min=1)


# ----------------------------------------------------------------------------- composition
LOSSES: dict[str, type[SegmentationLoss]] = {
    "ce": CrossEntropyLoss,
    "focal": FocalLoss,
    "dice": DiceLoss,
    "lovasz": LovaszSoftmaxLoss,
    "ohem": OhemCrossEntropyLoss,
    "unet": UNetWeightedLoss,
}


class WeightedSumLoss(nn.Module):
    """sum_name weights[name] * losses[name](logits, target)."""

    def __init__(self, losses: dict[str, nn.Module], weights: dict[str, float]) -> None:
        super().__init__()
        self.losses = nn.ModuleDict(losses)
        self.weights = dict(weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms = [self.weights[name] * loss(logits, target) for name, loss in self.losses.items()]
        return torch.stack(terms).sum()


def build_loss(
    loss: str | dict[str, float] = "ce",
    options: dict[str, dict[str, Any]] | None = None,
    ignore_index: int = 255,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """The loss of a model's `loss` and `loss_options` options.

    loss: a name ("ce") or {name: weight} for a weighted sum ({"ce": 1.0, "dice": 0.5}).
    options: {name: {option: value}}, the named loss's constructor options
        (e.g. {"focal": {"gamma": 2}, "ohem": {"thresh": 0.7, "min_kept": 100000}}).
    class_weights, label_smoothing: given to the losses that take them (see the module doc).
    """
    weights = {loss: 1.0} if isinstance(loss, str) else dict(loss)
    options = dict(options or {})
    if not weights:
        raise ConfigError("loss: name at least one loss")
    unknown = [n for n in [*weights, *options] if n not in LOSSES]
    if unknown:
        raise ConfigError(f"unknown loss {unknown[0]!r}; known: {', '.join(LOSSES)}")
    unused = [n for n in options if n not in weights]
    if unused:
        raise ConfigError(f"loss_options for {unused[0]!r}, which is not in loss: {loss}")
    built = {}
    for name in weights:
        cls = LOSSES[name]
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "ignore_index"}
        given = dict(options.get(name) or {})
        bad = (set(given) - accepted) | (set(given) & {"weight"})
        if bad:
            raise ConfigError(
                f"loss_options.{name}: unknown option(s) {sorted(bad)}; {name} takes "
                f"{sorted(accepted - {'weight'})} (class weights come from class_weights)"
            )
        kwargs: dict[str, Any] = {"ignore_index": ignore_index}
        if "weight" in accepted:
            kwargs["weight"] = None if class_weights is None else class_weights.clone()
        if "label_smoothing" in accepted:
            kwargs["label_smoothing"] = label_smoothing
        built[name] = cls(**{**kwargs, **given})
    if len(built) == 1 and next(iter(weights.values())) == 1.0:
        return next(iter(built.values()))
    return WeightedSumLoss(built, weights)
