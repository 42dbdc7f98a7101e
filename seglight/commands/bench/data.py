"""Data: the throughput of a dataset's DataLoader next to its GPU-resident path (`bench --data`),
and `bench --loader 0,1,2`: the training loader's per-sample costs (decode, transform; median
and min-max) and its images/s with each worker count."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from seglight.commands.bench.measure import median_ci, now, sync


def bench_data(
    datamodule: Any, device: torch.device, rounds: int, max_batches: int | None = None
) -> list[dict]:
    """Images/s of the training split through the DataLoader (batches moved to `device`) and
    through the GPU-resident path (decoded once: `setup_s`), a whole epoch (or `max_batches`)
    per round, interleaved. Whole epochs, because loader workers stopped mid-epoch would go on
    prefetching during the other path's round."""
    from seglight.data.gpu import ResidentLoader, load_split

    datamodule.setup("fit")
    datamodule.gpu_resident = False  # the DataLoader row, whatever the config says
    loader = datamodule.train_dataloader()
    t0 = time.perf_counter()
    fill = tuple(round(255 * m) for m in datamodule.mean)
    split = load_split(datamodule.datasets["train"], device, fill, datamodule.ignore_index)
    resident = ResidentLoader(split, datamodule.batch_size, datamodule.train_transform())
    decode_s = time.perf_counter() - t0
    workers = getattr(loader, "num_workers", 0)
    rows = [
        {"path": f"DataLoader ({workers} workers)", "seconds": [], "images": [], "setup_s": None},
        {"path": f"resident ({device.type})", "seconds": [], "images": [], "setup_s": decode_s},
    ]

    def epoch(source: Any) -> int:
        n = 0
        for i, batch in enumerate(source):
            if max_batches is not None and i >= max_batches:
                break
            batch["image"].to(device, non_blocking=True)
            batch["mask"].to(device, non_blocking=True)
            n += len(batch["mask"])
        return n

    epoch(loader)  # warm-up: starts the workers
    for _ in range(rounds):
        for row, source in zip(rows, (loader, resident), strict=True):
            sync(device)
            t0 = time.perf_counter()
            n = epoch(source)
            sync(device)
            row["seconds"].append(time.perf_counter() - t0)
            row["images"].append(n)
    for row in rows:
        rates = [n / s for n, s in zip(row["images"], row["seconds"], strict=True)]
        row.update(images_per_s=statistics.median(rates), min=min(rates), max=max(rates))
    return rows


def bench_loader(
    datamodule: Any,
    workers: list[int],
    transforms: dict[str, Callable] | None = None,
    samples: int = 200,
    rounds: int = 3,
    batches: int | None = 20,
) -> dict[str, list[dict]]:
    """The training split's per-sample costs and DataLoader images/s (one torch thread per
    worker, as PyTorch sets it), interleaved, for each of `transforms` (default: the
    datamodule's training transform; pass two to compare them).

    Per sample (the first `samples` of the split, cycled), on `--clock`: the Dataset's `load`
    (decode image and mask, check the values), the image decode alone (`read_image`), then each
    transform on that pair with the same seed, so every transform draws the same random scale and
    crop and their costs pair up sample by sample. Split by the drawn scale s (< 1, >= 1) when
    the transform has a scale_range. Then `rounds` rounds of every (workers, transform) in turn:
    images/s of `batches` batches through the training DataLoader (seglight.data.stats.
    loader_throughput, wall clock, after the start-up and prefetched batches).

    With several transforms, each one's row also gives the median of its per-sample time ratios
    to the first transform's, with a 95% confidence interval (`median_ci`); and each one's images/s, the median of
    its per-round ratios (the rounds ran back to back).

    Returns {"costs": [{"step", "subset", "ms", "min", "max", "n", "ratio", "ratio_ci"}],
    "rates": [{"transform", "workers", "images_per_s", "min", "max", "rounds", "ratio",
    "ratio_ci"}]}.
    """
    from seglight.data.base import read_image
    from seglight.data.stats import loader_throughput

    if "train" not in datamodule.datasets:
        datamodule.datasets["train"] = datamodule.build_dataset("train", train=True)
    dataset = datamodule.datasets["train"]
    transforms = transforms or {type(dataset.transform).__name__: dataset.transform}
    times: dict[tuple[str, str], list[float]] = {}

    def timed(subsets: tuple[tuple[str, str], ...], work: Callable, *args: Any) -> Any:
        t0 = now()
        out = work(*args)
        for key in subsets:
            times.setdefault(key, []).append(1000 * (now() - t0))
        return out

    with torch.random.fork_rng(devices=[]):  # the seeds below leave the caller's generator be
        for k in range(samples):
            index = k % len(dataset)
            load = ("load: decode image + mask, check", "all")
            image, mask = timed((load,), dataset.load, index)
            timed((("  of which image decode", "all"),), read_image, dataset.pairs[index][0])
            for name, transform in transforms.items():
                subsets = [(name, "all")]
                if getattr(transform, "scale_range", None) and transform.crop_size:
                    lo, hi = transform.scale_range  # TrainTransform's first draw: the scale
                    torch.manual_seed(k)
                    scale = lo + (hi - lo) * torch.rand(()).item()
                    subsets.append((name, "s < 1" if scale < 1 else "s >= 1"))
                torch.manual_seed(k)
                timed(tuple(subsets), transform, image, mask)
    costs = []
    first = next(iter(transforms))
    for (step, subset), values in times.items():
        row = {"step": step, "subset": subset, "ms": statistics.median(values), "min": min(values),
               "max": max(values), "n": len(values), "ratio": None, "ratio_ci": None}  # fmt: skip
        if step in transforms and step != first:  # paired: the same samples and draws
            ratios = [b / a for a, b in zip(times[(first, subset)], values, strict=True)]
            row.update(ratio=statistics.median(ratios), ratio_ci=median_ci(ratios))
        costs.append(row)
    order = ["all", "s < 1", "s >= 1"]  # each transform's rows under one another, per subset
    costs.sort(key=lambda row: (row["step"] in transforms, order.index(row["subset"])))

    original = dataset.transform
    rates: dict[tuple[str, int], list[float]] = {}
    try:
        for _ in range(rounds):
            for n in workers:
                for name, transform in transforms.items():
                    dataset.transform = transform
                    result = loader_throughput(datamodule, n, batches)
                    rates.setdefault((name, n), []).append(result["images_per_s"])
    finally:
        dataset.transform = original
    rows = []
    for (name, n), values in rates.items():
        row = {"transform": name, "workers": n, "images_per_s": statistics.median(values),
               "min": min(values), "max": max(values), "rounds": len(values), "ratio": None,
               "ratio_ci": None}  # fmt: skip
        if name != first:  # per round: the two ran back to back
            ratios = [b / a for a, b in zip(rates[(first, n)], values, strict=True)]
            row.update(ratio=statistics.median(ratios), ratio_ci=median_ci(ratios))
        rows.append(row)
    return {"costs": costs, "rates": rows}
