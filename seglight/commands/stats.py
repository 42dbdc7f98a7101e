"""`seglight stats`: class pixel frequencies, median-frequency class weights, and the data
loader's throughput (the statistics themselves: seglight.data.stats).

    python -m seglight stats --config experiments/unet.yaml --data.root /data/camvid \\
        [--split train] [--out class_weights.json] [--void-as-class] [--throughput 0,1,2]
    python -m seglight stats --data CamVid --data.root /data/camvid
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from seglight.config import check_class_names, with_defaults
from seglight.data.base import DATASETS, SegmentationDataModule
from seglight.data.stats import dataset_statistics, loader_throughput
from seglight.errors import ConfigError


def data_from_args(argv: list[str]) -> tuple[SegmentationDataModule, list[str]]:
    """Build the DataModule from --config files (their `data:` part, defaults.yaml first),
    `--data NAME` and `--data.OPTION VALUE`; returns it and the arguments left over."""
    check_class_names(argv)
    argv = with_defaults(argv)
    name, init_args, rest = None, {}, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, _, inline = arg.partition("=")
        takes_value = not inline and i + 1 < len(argv)
        value = inline if inline else (argv[i + 1] if takes_value else None)
        if key in ("--config", "-c") or key == "--data" or key.startswith("--data."):
            if value is None:
                raise ConfigError(f"{key} needs a value")
            i += 1 if inline else 2
        else:
            rest.append(arg)
            i += 1
            continue
        if key in ("--config", "-c"):
            section = (yaml.safe_load(Path(value).read_text()) or {}).get("data")
            if isinstance(section, str):
                section = {"class_path": section}
            if isinstance(section, dict):
                new = section.get("class_path", name)
                if name is not None and new != name:
                    init_args = {}  # another dataset: the options set so far were for the old one
                name = new
                init_args.update(section.get("init_args") or {})
        elif key == "--data":
            if name is not None and value != name:
                init_args = {}
            name = value
        else:
            init_args[key[len("--data.") :]] = yaml.safe_load(value)
    if name is None:
        raise ConfigError("no dataset: give --config with a data: section, or --data NAME")
    short = str(name).rsplit(".", 1)[-1]
    if short not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}. Known: {', '.join(sorted(DATASETS))}")
    try:
        return DATASETS[short](**init_args), rest
    except TypeError as e:
        raise ConfigError(f"{short}: bad option ({e})") from e


def _print_table(stats: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{stats['dataset']} {stats['split']}: {stats['images']} images, "
        f"{stats['ignored_pixels']} ignored pixels"
    )
    for col in ("class", "pixels", "frequency", "weight"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for c, name in enumerate(stats["classes"]):
        table.add_row(
            name,
            str(stats["pixels"][c]),
            f"{stats['frequencies'][c]:.5f}",
            f"{stats['weights'][c]:.4f}",
        )
    Console().print(table)


def main(argv: list[str]) -> None:
    """Entry point of `python -m seglight stats`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="seglight stats",
        description="Class frequencies and median-frequency class weights of a dataset split.",
        epilog="The dataset: --config FILE (its data: section) and/or --data NAME, then "
        "--data.OPTION VALUE, as for `seglight fit`.",
    )
    parser.add_argument("--split", default="train", help="the split to count (default: train)")
    parser.add_argument("--out", help="write the statistics and weights to this JSON file")
    parser.add_argument(
        "--void-as-class",
        action="store_true",
        help="count ignored pixels as a class in the median (SegNet's convention)",
    )
    parser.add_argument(
        "--throughput",
        metavar="WORKERS",
        help="also time the training loader with these worker counts, e.g. 0,1,2",
    )
    parser.add_argument(
        "--batches", type=int, help="batches per throughput measurement (default: one epoch)"
    )
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        return
    dm, rest = data_from_args(argv)
    args = parser.parse_args(rest)
    stats = dataset_statistics(dm, args.split, args.void_as_class)
    _print_table(stats)
    if args.out:
        Path(args.out).write_text(json.dumps(stats, indent=2) + "\n")
        print(f"seglight: wrote {args.out}", file=sys.stderr)
    if args.throughput:
        crop = "x".join(map(str, dm.crop_size)) if dm.crop_size else "full images"
        for workers in (int(w) for w in args.throughput.split(",")):
            result = loader_throughput(dm, workers, args.batches)
            print(
                f"{type(dm).__name__} train loader, crop {crop}, batch {dm.batch_size}, "
                f"{workers} worker(s): {result['images_per_s']:.1f} images/s "
                f"(first batch after {result['first_batch_s']:.2f} s, {result['images']} images "
                f"timed; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads in the "
                "main process)"
            )
