"""Thread options on a busy machine (issue 22, item 3; README "Threads and workers"): real
`seglight fit` runs of the quickstart beside 1 and 3 `while True: pass` processes, in interleaved
rounds, each option's training images/s read from the run's metrics.json.

    python scripts/busy_threads.py [--rounds 2] [--busy 1,3] [--batches 12]

Options: two threads (the old default on 2 cores without loader workers), two threads with
OpenMP's passive wait policy (OMP_WAIT_POLICY=PASSIVE: a waiting thread sleeps at once instead of
spinning), two threads with a short spin (GOMP_SPINCOUNT=10000), one thread, and seglight's
default (no option: the policy, which leaves out the cores other programs keep busy). Each
option's ratio is to the best option of that round, the median over the rounds. The machine's
own load (other users) is printed before and after each round: name it beside the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from thread_policy_runs import fit as fit_run  # scripts/ is on the path

REPO = Path(__file__).resolve().parents[1]

#: label -> (--threads or None for the default, extra environment)
OPTIONS: dict[str, tuple[int | None, dict[str, str]]] = {
    "2 threads": (2, {}),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "2 threads, GOMP_SPINCOUNT=10000": (2, {"GOMP_SPINCOUNT": "10000"}),
    "1 thread": (1, {}),
    "seglight default": (None, {}),
}


def fit(batches: int, threads: int | None, extra_env: dict[str, str]) -> tuple[float, float, str]:
    """(training images/s, wall seconds, seglight's thread line) of one quickstart run."""
    return fit_run(
        ["--config", str(REPO / "experiments/quickstart.yaml"), "--trainer.max_epochs", "1",
         "--trainer.limit_train_batches", str(batches), "--trainer.limit_val_batches", "0",
         "--trainer.enable_progress_bar", "false"],
        threads, extra_env,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--busy", default="1,3", help="busy processes beside the runs")
    parser.add_argument("--batches", type=int, default=12, help="training batches per run")
    args = parser.parse_args()
    busy_counts = [int(b) for b in args.busy.split(",")]
    rates: dict[tuple[int, str], list[float]] = {}
    ratios: dict[tuple[int, str], list[float]] = {}
    for r in range(args.rounds):
        for busy in busy_counts:
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    for _ in range(busy)]  # fmt: skip
            try:
                time.sleep(5)
                print(f"round {r}, {busy} busy: load {os.getloadavg()[0]:.1f}", flush=True)
                # a different order each round, so no option always runs first
                labels = list(OPTIONS)[r % len(OPTIONS) :] + list(OPTIONS)[: r % len(OPTIONS)]
                got = {}
                for label in labels:
                    threads, extra = OPTIONS[label]
                    rate, wall, line = fit(args.batches, threads, extra)
                    got[label] = rate
                    rates.setdefault((busy, label), []).append(rate)
                    print(f"  {label}: {rate:.2f} images/s, {wall:.0f} s wall  [{line}]",
                          flush=True)  # fmt: skip
                best = max(got.values())
                for label, rate in got.items():
                    ratios.setdefault((busy, label), []).append(rate / best)
                print(f"  load after: {os.getloadavg()[0]:.1f}", flush=True)
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
    print("\n| beside | option | images/s (median) | to the round's best (median) |")
    print("| --- | --- | ---: | ---: |")
    for busy in busy_counts:
        for label in OPTIONS:
            print(f"| {busy} busy | {label} | {statistics.median(rates[(busy, label)]):.2f} | "
                  f"{statistics.median(ratios[(busy, label)]):.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
