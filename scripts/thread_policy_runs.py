"""Measure seglight's thread policy against torch's default thread count, quiet and beside one
busy process, in interleaved rounds (README "Threads and workers").

    python scripts/thread_policy_runs.py --camvid /path/to/camvid [--rounds 2]

Each run is a real `python -m seglight fit`; its training images/s is read from the run's
metrics.json (the MetricsSummary callback: batches after the first of each epoch, loading
included). "torch default" is torch's own count (one thread per usable core, passed as
--threads), "policy" is seglight's choice (no option). The busy process is `while True: pass`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def runs(camvid: str | None) -> dict[str, list[str]]:
    out = {
        "quickstart": ["--config", str(REPO / "experiments/quickstart.yaml"),
                       "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "8",
                       "--trainer.limit_val_batches", "0"],
    }  # fmt: skip
    if camvid:
        out["camvid-unet"] = [
            "--config", str(REPO / "experiments/unet.yaml"), "--data.root", camvid,
            "--data.num_workers", "2", "--data.batch_size", "4",
            "--data.crop_size", "[240, 320]", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "5", "--trainer.limit_val_batches", "0",
        ]  # fmt: skip
    return out


def fit(
    args: list[str], threads: int | None, extra_env: dict[str, str] | None = None
) -> tuple[float, float, str]:
    """(training images/s, wall seconds, seglight's thread line) of one run, with the thread
    variables of this shell removed (and `extra_env` set)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "seglight", "fit", *args, "--trainer.logger", "false",
               "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
               "--trainer.default_root_dir", tmp]  # fmt: skip
        if threads is not None:
            cmd += ["--threads", str(threads)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "SEGLIGHT_THREADS"):
            env.pop(name, None)
        env.update(extra_env or {})
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        summary = json.loads((Path(tmp) / "metrics.json").read_text())
        line = next((x for x in done.stderr.splitlines() if "torch thread" in x), "")
        return summary["throughput"]["train_images_per_s"], wall, line


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--camvid", help="CamVid root (adds the bounded U-Net run)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    import torch

    default = torch.get_num_threads()  # torch's own count in a fresh process
    # (label, --threads): None is seglight's policy. Where the policy equals torch's default
    # (the quickstart loads in the main process), one thread is shown beside it instead.
    settings = {
        "quickstart": [("policy (= torch default)", None), ("--threads 1", 1)],
        "camvid-unet": [("torch default", default), ("policy", None)],
    }
    results: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(args.rounds):
        for busy in (False, True):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                for name, run_args in runs(args.camvid).items():
                    for label, threads in settings[name]:
                        rate, wall, _ = fit(run_args, threads)
                        key = (name, "busy" if busy else "quiet", label)
                        results.setdefault(key, []).append(rate)
                        print(f"{key}: {rate:.2f} images/s, {wall:.1f} s wall", flush=True)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
    print(f"\ntorch default: {default} threads; rounds: {args.rounds}")
    print("| run | beside | A | A img/s | B | B img/s | B / A |")
    print("| --- | --- | --- | ---: | --- | ---: | ---: |")
    for name in runs(args.camvid):
        (label_a, _), (label_b, _) = settings[name]
        for where in ("quiet", "busy"):
            a, b = results[(name, where, label_a)], results[(name, where, label_b)]
            ratios = [y / x for x, y in zip(a, b, strict=True)]
            print(
                f"| {name} | {where} | {label_a} | {statistics.median(a):.1f} | {label_b} | "
                f"{statistics.median(b):.1f} | {statistics.median(ratios):.2f} |"
            )


if __name__ == "__main__":
    main()
