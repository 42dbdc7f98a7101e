"""Inference recipes: sliding-window inference, multi-scale and flip test-time augmentation, CRF
post-processing; and `Images`, a folder of unlabelled images to run `predict` on.

A model's `inference` option (an `InferenceConfig`) selects them for validate, test and predict:

    model:
      init_args:
        inference: {mode: slide, window: [512, 512], overlap: 0.33, scales: [0.75, 1.0, 1.25],
                    flip: true, crf: conv}

or on the command line `--model.inference.flip true`. Predictions are averaged as softmax
probabilities (over windows, scales and flips), as in mmseg's and PSPNet's evaluation.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Sampler, SequentialSampler

from seglight.crf import apply_crf
from seglight.data.base import (
    DATASETS,
    IMAGE_EXTENSIONS,
    SegmentationDataModule,
    SegmentationDataset,
    collate,
)
from seglight.errors import ConfigError, DataError

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class InferenceConfig:
    """How validate, test and predict turn images into predictions.

    Args:
        mode: "whole" (the network sees each full image) or "slide" (overlapping windows of
            `window`, for images larger than the training crop; images smaller than the window
            are padded).
        window: sliding window (H, W), e.g. the training crop; needed for mode slide.
        overlap: fraction of a window shared with its neighbour (stride = window * (1 - overlap)).
        blend: weighting of overlapping windows: "gaussian" (nnU-Net's, sigma = window / 8:
            window borders, which see less context, count less) or "uniform".
        scales: image scales to average over (e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]).
        flip: also average over horizontally flipped images.
        crf: post-processing: "none", "dense" (DeepLab's fully connected CRF, pydensecrf2) or
            "conv" (ConvCRF, pure torch, on the device).
        crf_options: override the CRF's parameters (seglight.crf.DENSE_CRF_DEFAULTS or
            CONV_CRF_DEFAULTS), e.g. {iterations: 5}.
        during_fit: also use these settings for the validation of `fit` (default: plain
            whole-image inference there, which is faster).
    """

    mode: Literal["whole", "slide"] = "whole"
    window: tuple[int, int] | None = None
    overlap: float = 1 / 3
    blend: Literal["gaussian", "uniform"] = "gaussian"
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    crf: Literal["none", "dense", "conv"] = "none"
    crf_options: dict[str, float] | None = None
    during_fit: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise ConfigError(f"inference.mode must be 'whole' or 'slide', got {self.mode!r}")
        if self.mode == "slide" and (
            self.window is None or len(self.window) != 2 or min(self.window) < 1
        ):
            raise ConfigError(
                f"inference.mode slide needs inference.window [H, W], got {self.window}"
            )
        if self.window is not None:
            self.window = (int(self.window[0]), int(self.window[1]))
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"inference.overlap must be in [0, 1), got {self.overlap}")
        if self.blend not in ("gaussian", "uniform"):
            raise ConfigError(f"inference.blend must be gaussian or uniform, got {self.blend!r}")
        self.scales = [float(s) for s in self.scales]
        if not self.scales or min(self.scales) <= 0:
            raise ConfigError(f"inference.scales must be positive numbers, got {self.scales}")
        if self.crf not in ("none", "dense", "conv"):
            raise ConfigError(f"inference.crf must be none, dense or conv, got {self.crf!r}")

    @classmethod
    def from_any(cls, value: InferenceConfig | dict | None) -> InferenceConfig:
        """From an InferenceConfig, a dict of its fields (a checkpoint's hparams) or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return cls(**asdict(value))
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ConfigError(
                    f"inference: unknown option(s) {sorted(unknown)}; "
                    f"known: {', '.join(cls.__dataclass_fields__)}"
                )
            return cls(**value)
        raise ConfigError(f"inference must be a mapping of options, got {value!r}")

    @property
    def is_plain(self) -> bool:
        """One whole-image forward pass and no post-processing."""
        return (
            self.mode == "whole" and self.scales == [1.0] and not self.flip and self.crf == "none"
        )


# ------------------------------------------------------------------------------- sliding window
def gaussian_weights(size: tuple[int, int], sigma_scale: float = 1 / 8) -> torch.Tensor:
    """nnU-Net's window weights [H, W]: a Gaussian centred on the window, sigma = size *
    sigma_scale, scaled to a maximum of 1 and floored at its smallest non-zero value."""
    axes = []
    for n in size:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        axes.append(torch.exp(-(x**2) / (2 * max(n * sigma_scale, 1e-6) ** 2)))
    weights = axes[0][:, None] * axes[1][None, :]
    weights = weights / weights.max()
    return weights.clamp(min=weights[weights > 0].min())


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering [0, length) with the last window flush with the end (mmseg)."""
    if length <= window:
        return [0]
    n = math.ceil((length - window) / stride) + 1
    return sorted({min(i * stride, length - window) for i in range(n)})


def sliding_window(
    forward: Forward,
    image: torch.Tensor,
    window: tuple[int, int],
    overlap: float = 1 / 3,
    blend: str = "gaussian",
) -> torch.Tensor:
    """Probabilities [B, K, H, W] of images [B, C, H, W] from overlapping windows.

    Each window's softmax is weighted (uniformly or by `gaussian_weights`) and the weighted sum
    divided by the sum of weights. An image smaller than the window is padded at the bottom and
    right with zeros (the mean colour after normalisation) and the padding cropped off.
    """
    b, _, h, w = image.shape
    wh, ww = window
    ph, pw = max(0, wh - h), max(0, ww - w)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph))
    height, width = image.shape[-2:]
    wh, ww = min(wh, height), min(ww, width)
    stride_h = max(1, int(wh * (1 - overlap)))
    stride_w = max(1, int(ww * (1 - overlap)))
    if blend == "gaussian":
        weights = gaussian_weights((wh, ww)).to(image.device)
    else:
        weights = torch.ones((wh, ww), device=image.device)
    total = None
    norm = torch.zeros((height, width), device=image.device)
    for top in window_starts(height, wh, stride_h):
        for left in window_starts(width, ww, stride_w):
            crop = image[..., top : top + wh, left : left + ww]
            probs = forward(crop).float().softmax(1) * weights
            if total is None:
                total = probs.new_zeros((b, probs.shape[1], height, width))
            total[..., top : top + wh, left : left + ww] += probs
            norm[top : top + wh, left : left + ww] += weights
    return (total / norm)[..., :h, :w]


# ------------------------------------------------------------------------------- TTA
def predict_probs(forward: Forward, image: torch.Tensor, config: InferenceConfig) -> torch.Tensor:
    """Probabilities [B, K, H, W] of images [B, C, H, W]: softmax averaged over `config.scales`
    (bilinear resizing of the image, then of the probabilities back to H x W) and, with
    `config.flip`, horizontal flips; each pass whole-image or sliding-window."""
    h, w = image.shape[-2:]
    total, count = None, 0
    for scale in config.scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        scaled = image
        if size != (h, w):
            scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flip in (False, True) if config.flip else (False,):
            x = scaled.flip(-1) if flip else scaled
            if config.mode == "slide":
                probs = sliding_window(forward, x, config.window, config.overlap, config.blend)
            else:
                probs = forward(x).float().softmax(1)
            if flip:
                probs = probs.flip(-1)
            if size != (h, w):
                probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
            total = probs if total is None else total + probs
            count += 1
    return total / count


def infer(
    forward: Forward,
    image: torch.Tensor,
    config: InferenceConfig,
    rgb: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """`predict_probs`, then the CRF of `config.crf` if any. `rgb()` gives the images as uint8
    RGB [B, 3, H, W] (the CRF's colour features), only called when a CRF runs."""
    probs = predict_probs(forward, image, config)
    if config.crf != "none":
        if rgb is None:
            raise ConfigError("inference.crf needs the RGB images (pass rgb=...)")
        probs = apply_crf(config.crf, probs, rgb(), config.crf_options)
    return probs


# ------------------------------------------------------------------------------- overlays
def overlay(image: torch.Tensor, colours: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Side by side: the image | the image blended with the coloured mask.

    image, colours: uint8 [3, H, W]. Returns uint8 [3, H, 2W]."""
    blended = (image.float() * (1 - alpha) + colours.float() * alpha).round().to(torch.uint8)
    return torch.cat([image, blended], -1)


# ------------------------------------------------------------------------------- Images
class Images(SegmentationDataModule):
    """A folder of images without masks, for `predict` (any image format, sorted by name).

        python -m seglight predict --config experiments/unet.yaml --ckpt_path best \\
            --data Images --data.root photos/ --data.like CamVid

    The classes, palette and normalisation come from `like`, the dataset the model was trained
    on (or from `class_names`). Images keep their size; a batch holds images of one size.

    Args:
        root: the folder of images.
        like: a dataset name (e.g. CamVid) whose classes, palette, mean and std to use.
        class_names: the classes, when there is no `like` dataset.
        recursive: also take images in subfolders (names keep the subfolder, a/b.png -> a/b).
        **kwargs: batch size and workers: see SegmentationDataModule.
    """

    splits: ClassVar[tuple[str, ...]] = ("predict",)

    def __init__(
        self,
        root: str,
        like: str | None = None,
        class_names: list[str] | None = None,
        recursive: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs["predict_split"] = "predict"  # its only split, whatever the config's default
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.recursive = recursive
        if like is not None:
            if like not in DATASETS or like == "Images":
                known = ", ".join(sorted(n for n in DATASETS if n != "Images"))
                raise ConfigError(f"Images: like={like!r} is not a dataset; known: {known}")
            source = DATASETS[like]
            self.class_names = tuple(class_names or source.class_names)
            self.palette = tuple(source.palette)
            self.mean, self.std = source.mean, source.std
        elif class_names:
            self.class_names = tuple(class_names)
        if not self.class_names:
            raise ConfigError(
                "Images needs the classes the model predicts: --data.like <dataset it was trained "
                "on> (e.g. CamVid) or --data.class_names [a, b, ...]"
            )

    def build_dataset(self, split: str, train: bool) -> SegmentationDataset:
        if not self.root.is_dir():
            raise DataError(f"Images: folder {str(self.root)!r} does not exist")
        pattern = "**/*" if self.recursive else "*"
        files = sorted(
            p
            for p in self.root.glob(pattern)
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not files:
            raise DataError(f"Images: no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.root}")
        return _NamedImages([(p, None) for p in files], self.root, self.num_classes, self)

    def setup(self, stage: str | None = None) -> None:
        if stage not in (None, "predict"):
            raise DataError(
                f"Images has no masks: it serves predict only, not {stage}. Use a dataset with "
                "masks (e.g. Folder) to train or evaluate"
            )
        super().setup("predict")

    def predict_dataloader(self) -> DataLoader:
        from PIL import Image

        dataset = self.datasets["predict"]
        sizes = []
        for path, _ in dataset.pairs:
            with Image.open(path) as im:  # reads the header only
                sizes.append(im.size)
        return DataLoader(
            dataset,
            batch_sampler=SameSizeBatchSampler(
                SequentialSampler(dataset), self.val_batch_size, False, sizes
            ),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate,
        )


class SameSizeBatchSampler(BatchSampler):
    """Batches of up to `batch_size` indices of the same image size, in the sampler's order.

    Padding a batch of different sizes would change a network's predictions (its receptive field
    sees the padding): with this, each image is predicted as if alone. A BatchSampler with a
    `sampler` argument, so that Lightning can put a distributed sampler in it.

    Args:
        sampler: the indices to batch.
        batch_size: the largest batch.
        drop_last: drop each size's last incomplete batch.
        sizes: the size of each index's image (any hashable).
    """

    def __init__(
        self, sampler: Sampler[int], batch_size: int, drop_last: bool, sizes: list[Any]
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.sizes = sizes

    def __iter__(self) -> Iterator[list[int]]:
        pending: dict[Any, list[int]] = {}
        for index in self.sampler:
            group = pending.setdefault(self.sizes[index], [])
            group.append(index)
            if len(group) == self.batch_size:
                yield pending.pop(self.sizes[index])
        if not self.drop_last:
            yield from (group for group in pending.values() if group)

    def __len__(self) -> int:
        counts = Counter(self.sizes[index] for index in self.sampler)
        round_ = math.floor if self.drop_last else math.ceil
        return sum(round_(n / self.batch_size) for n in counts.values())


class _NamedImages(SegmentationDataset):
    """Unlabelled images named by their path under root without the extension (a/b.png -> a/b)."""

    def __init__(self, pairs, root: Path, num_classes: int, dm: SegmentationDataModule) -> None:
        super().__init__(pairs, num_classes, dm.eval_transform(), None, dm.ignore_index)
        self.root = root

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        sample["name"] = self.pairs[index][0].relative_to(self.root).with_suffix("").as_posix()
        return sample
