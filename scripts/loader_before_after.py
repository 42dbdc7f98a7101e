"""The training loader's costs with seglight's current TrainTransform against the one of an
earlier commit, interleaved in one process (README "Data loading").

    python scripts/loader_before_after.py --camvid /path/to/camvid --before afcc54b \
        [--workers 0,1,2] [--samples 300] [--rounds 5] [--batches 20]

The data are experiments/unet.yaml's (CamVid train, 360x480 crops of images scaled by 0.5-2.0,
batch 8). "before" is TrainTransform from seglight/data/transforms.py at the commit `--before`
(read with `git show`), built with the same arguments; "after" is the checkout's. The
measurement is `python -m seglight bench --loader`'s (seglight.commands.bench.data.bench_loader): per
sample, both transforms run on the same decoded pair with the same seed (the same random scale
and crop), on the CPU clock with one torch thread; then DataLoader images/s per worker count,
(workers, transform) in turn for `--rounds` rounds. Linux (workers are forked: they inherit the
module read from git).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def transforms_at(commit: str) -> types.ModuleType:
    """seglight/data/transforms.py as it was at `commit`, as a module."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{commit}:seglight/data/transforms.py"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    module = types.ModuleType(f"transforms_{commit}")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{commit}:seglight/data/transforms.py", "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--camvid", required=True, help="CamVid root (SegNet layout)")
    parser.add_argument("--before", required=True, help="the commit to compare against")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = parser.parse_args()

    from seglight.commands.bench.data import bench_loader
    from seglight.commands.bench.measure import use_clock
    from seglight.commands.bench.report import print_loader_report
    from seglight.data.base import DATASETS
    from seglight.threads import configure_threads

    config = yaml.safe_load((REPO / "experiments/unet.yaml").read_text())["data"]
    dm = DATASETS[config["class_path"]](**{**config["init_args"], "root": args.camvid})
    old = transforms_at(args.before).TrainTransform(
        dm.crop_size, dm.scale_range, dm.hflip, dm.color_jitter, dm.mean, dm.std, dm.ignore_index
    )
    threads = configure_threads(0, requested=1)
    use_clock(args.clock)
    workers = [int(w) for w in args.workers.split(",")]
    transforms = {f"before ({args.before})": old, "after": dm.train_transform()}
    results = bench_loader(dm, workers, transforms, args.samples, args.rounds, args.batches)
    print_loader_report(
        results,
        f"CamVid train, crop {dm.crop_size}, scale {dm.scale_range}, batch {dm.batch_size}; "
        f"{args.clock} clock, {threads} torch thread",
    )


if __name__ == "__main__":
    main()
