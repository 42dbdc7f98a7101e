"""Class pixel frequencies, median-frequency class weights and the data loader's throughput
(used by the models' `class_weights: median_frequency` and by `seglight stats`).

Median-frequency balancing (Eigen & Fergus, ICCV 2015; used by SegNet): freq(c) = pixels of
class c / all pixels of the images in which c is present; w(c) = median over classes of freq /
freq(c). A class absent from the split gets weight 0 (it has no pixels to weight) and is left out
of the median. `--void-as-class` also counts the ignored pixels as a class in the median, which
is how SegNet's published CamVid weights were computed; it scales every weight by the same
factor, which a weighted-mean cross-entropy cancels, so training is the same either way.

The JSON written by --out is what `class_weights: file.json` of a model reads:
{"weights": [...], "classes": [...], "frequencies": [...], ...}.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seglight.data.base import (
    SegmentationDataModule,
    SegmentationDataset,
    invalid_values,
    read_mask,
)
from seglight.errors import ConfigError, DataError


# ------------------------------------------------------------------------------- statistics
def mask_counts(
    mask: np.ndarray | torch.Tensor, num_classes: int, ignore_index: int = 255, where: str = "mask"
) -> np.ndarray:
    """Pixels per class of one mask [H, W]: int64 [num_classes + 1], the last entry counting
    ignored pixels. A value that is neither a class nor ignore_index is a DataError."""
    mask = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    bad = invalid_values(mask, num_classes, ignore_index)
    if bad:
        raise DataError(
            f"{where} has values {bad} outside [0, {num_classes}) and not {ignore_index}"
        )
    values = np.where(mask == ignore_index, num_classes, mask).ravel()
    return np.bincount(values, minlength=num_classes + 1)


def class_pixel_stats(counts: Iterable[np.ndarray]) -> dict[str, Any]:
    """Sum per-mask counts (see mask_counts) into

    - pixels[c]: pixels of class c (c = num_classes: the ignored pixels);
    - image_pixels[c]: all pixels (ignored ones included) of the images where c is present;
    - images: the number of masks.
    """
    pixels = image_pixels = None
    images = 0
    for c in counts:
        if pixels is None:
            pixels, image_pixels = np.zeros_like(c), np.zeros_like(c)
        pixels += c
        image_pixels += (c > 0) * c.sum()
        images += 1
    if pixels is None:
        raise DataError("no masks to count")
    return {"pixels": pixels, "image_pixels": image_pixels, "images": images}


def median_frequency_weights(
    pixels: np.ndarray, image_pixels: np.ndarray, void_as_class: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(weights [C], frequencies [C]) from class_pixel_stats' counts ([C + 1], last = ignored).

    Classes that never occur get frequency 0 and weight 0 and are left out of the median."""
    pixels, image_pixels = np.asarray(pixels, float), np.asarray(image_pixels, float)
    freq = np.divide(pixels, image_pixels, out=np.zeros_like(pixels), where=image_pixels > 0)
    classes = freq if void_as_class else freq[:-1]
    present = classes[classes > 0]
    if not len(present):
        raise DataError("no labelled pixels: cannot compute class frequencies")
    median = np.median(present)
    weights = np.divide(median, freq[:-1], out=np.zeros(len(freq) - 1), where=freq[:-1] > 0)
    return weights, freq[:-1]


def split_counts(dm: SegmentationDataModule, split: str) -> Iterator[np.ndarray]:
    """mask_counts of every mask of a split, un-augmented (file datasets: the mask files only,
    read in threads, no image decoding)."""
    if split not in dm.splits:
        raise ConfigError(
            f"{type(dm).__name__} has no split {split!r} (it has {', '.join(dm.splits)})"
        )
    dataset = dm.build_dataset(split, train=False)
    c, ignore = dm.num_classes, dm.ignore_index
    if isinstance(dataset, SegmentationDataset):
        paths = [m for _, m in dataset.pairs if m is not None]

        def count(path: Path) -> np.ndarray:
            return mask_counts(read_mask(path, dataset.label_map), c, ignore, f"mask {str(path)!r}")

        with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
            yield from pool.map(count, paths)
    else:
        for i in range(len(dataset)):
            yield mask_counts(dataset[i]["mask"], c, ignore, f"{split} sample {i}")


def dataset_statistics(
    dm: SegmentationDataModule, split: str = "train", void_as_class: bool = False
) -> dict[str, Any]:
    """Class statistics and median-frequency weights of a split, as written to the JSON file."""
    counts = class_pixel_stats(split_counts(dm, split))
    weights, freq = median_frequency_weights(
        counts["pixels"], counts["image_pixels"], void_as_class
    )
    return {
        "weights": [round(float(w), 6) for w in weights],
        "classes": list(dm.class_names),
        "frequencies": [float(f) for f in freq],
        "pixels": [int(v) for v in counts["pixels"][:-1]],
        "image_pixels": [int(v) for v in counts["image_pixels"][:-1]],
        "ignored_pixels": int(counts["pixels"][-1]),
        "images": counts["images"],
        "dataset": type(dm).__name__,
        "split": split,
        "method": "median frequency balancing (Eigen & Fergus 2015)"
        + (", ignored pixels counted as a class in the median (SegNet)" if void_as_class else ""),
    }


# ------------------------------------------------------------------------------- throughput
def loader_throughput(
    dm: SegmentationDataModule, num_workers: int, batches: int | None = None
) -> dict[str, float]:
    """Images/s of the training loader (augmentation included) with `num_workers` workers.

    Returns {"images_per_s": steady rate, "first_batch_s": start-up time (worker start and
    first batch), "images": images timed}. `batches`: stop after this many (default: one
    epoch). The clock starts after the first batch and, with workers, after the batches they
    prefetched meanwhile (2 each, the DataLoader's prefetch_factor), which would otherwise count
    as made at no cost.
    """
    if "train" not in dm.datasets:
        dm.datasets["train"] = dm.build_dataset("train", train=True)
    dm.num_workers = num_workers
    loader = dm.train_dataloader()
    untimed = 1 + 2 * num_workers
    start = time.perf_counter()
    first = steady = None
    images = 0
    try:
        for i, batch in enumerate(loader):
            if first is None:
                first = time.perf_counter()
            if i + 1 == untimed:
                steady = time.perf_counter()
            elif i + 1 > untimed:
                images += len(batch["name"])
            if batches is not None and i + 1 >= batches:
                break
    finally:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()  # persistent workers: do not leave them running
    if first is None or steady is None or images == 0:
        raise DataError(
            f"the training loader gave fewer than {untimed + 1} batches: cannot time it with "
            f"{num_workers} worker(s)"
        )
    return {
        "images_per_s": images / (time.perf_counter() - steady),
        "first_batch_s": first - start,
        "images": images,
    }
