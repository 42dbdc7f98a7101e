"""Run a study (a grid of `seglight fit` + `seglight test` runs) resumably, recording each finished
run as one row of results/<study>.csv and its validation history in results/<study>_curves.csv.

    python scripts/study.py semi --data.root /path/to/camvid --seeds 0,1,2 --jobs 2
    python scripts/study.py maskrcnn --seeds 0
    python scripts/study.py mask2former --data.root /path/to/camvid --seeds 0,1,2
    python scripts/study.py semi ... --dry-run        # print the commands, run nothing
    nohup python scripts/study.py semi --data.root $CAMVID --jobs 2 > study.log 2>&1 &

Each run trains in its own folder runs/study/<study>/<run name> with `--threads 1` (on 2 cores,
`--jobs 2` runs two at a time). A run already in the CSV is skipped; a run whose folder holds a
last.ckpt but no row yet (an interrupted one) is resumed with `--ckpt_path last` (resume is
exact), so the study survives any interruption: start the same command again. After fit, the
final weights (last.ckpt, the end of the poly schedule: no choice on val) are tested on the test
split. The runner drives the CLI and reads each run's metrics.json: there is no second training
path. scripts/render_results.py turns the CSVs into README's tables and plots.

Seed s fixes the labelled subset (SemiSupervised's seed) and the initialisation and data order
(seed_everything) alike for every method: the comparison is paired.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
COLUMNS = [
    "study", "method", "network", "labeled", "seed", "steps", "val_mIoU", "val_mIoU_75",
    "val_mIoU_best", "test_mIoU", "mask_mAP", "mask_mAP50", "converged", "wall_s", "commit",
    "command",
]  # fmt: skip
CURVE_COLUMNS = ["study", "method", "labeled", "seed", "step", "metric", "value"]
#: the file in a run's folder that holds the command it was started with (a resume must match)
STARTED_WITH = "study_command.txt"
#: how many validations a run makes (one every steps / VALIDATIONS steps; 75% is the 15th)
VALIDATIONS = 20


@dataclass
class Run:
    """One fit (and test) of a study."""

    study: str
    method: str
    network: str
    labeled: float | None
    seed: int
    steps: int
    args: list[str]  # fit's arguments after `fit` (configs and overrides), without run folder
    monitor: str = "mIoU"  # the history key that val_mIoU columns read (mask_mAP50 for Mask R-CNN)
    extra: dict[str, str] = field(default_factory=dict)
    threads: int = 1  # torch threads of the run (the quickstart study compares 1 and 2)

    @property
    def name(self) -> str:
        frac = "" if self.labeled is None else f"-l{self.labeled:g}"
        return f"{self.method}{frac}-s{self.seed}"

    @property
    def key(self) -> tuple[str, ...]:
        return (self.method, self.network, fmt(self.labeled), str(self.seed), str(self.steps))


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


# ----------------------------------------------------------------------------- the studies
#: the CPU-scale protocol's network (README "Results at CPU scale"): every row but DecoupledNet's
PROTOCOL_NETWORK = "DDRNet"
PROTOCOL = "experiments/cpu/camvid_quarter.yaml"
#: semi-supervised methods: config file and the option that names their network
SEMI_METHODS = {
    "supervised": "experiments/semi/supervised.yaml",
    "mean_teacher": "experiments/semi/mean_teacher.yaml",
    "fixmatch": "experiments/semi/fixmatch.yaml",
    "cps": "experiments/semi/cps.yaml",
    "advsemiseg": "experiments/semi/advsemiseg.yaml",
    "gansemiseg": "experiments/semi/gansemiseg.yaml",
    "decoupled": "experiments/semi/decoupled.yaml",
}
#: steps per labelled fraction: long enough for the supervised reference at that fraction to
#: reach its plateau (README); every method at a fraction gets the same budget
SEMI_STEPS = {1.0: 1500, 0.25: 1000, 0.125: 1000}


def budget(seed: int, steps: int, passthrough: list[str]) -> list[str]:
    """The arguments every study run ends with: its seed, its step budget, validation every
    1/VALIDATIONS of it, then the user's own options."""
    return [
        "--seed_everything", str(seed),
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps // VALIDATIONS),
        *passthrough,
    ]  # fmt: skip


def semi_runs(opts: argparse.Namespace, seeds: list[int], passthrough: list[str]) -> list[Run]:
    methods = opts.methods.split(",") if opts.methods else list(SEMI_METHODS)
    fractions = [float(f) for f in opts.labeled.split(",")]
    runs = []
    for frac in fractions:
        for method in methods:
            if method not in SEMI_METHODS:
                raise SystemExit(
                    f"study.py: unknown method {method!r}; known: {list(SEMI_METHODS)}"
                )
            if method != "supervised" and frac >= 1.0:
                continue  # no unlabelled images at full labels
            steps = opts.steps or SEMI_STEPS.get(frac, SEMI_STEPS[0.125])
            args = ["--config", SEMI_METHODS[method], "--config", PROTOCOL]
            network = PROTOCOL_NETWORK
            if method == "supervised":
                args += ["--model", PROTOCOL_NETWORK]
            elif method == "decoupled":
                network = "DecoupledNet"  # a network of its own (classification + decoder)
                # the paper's setting: image-level labels for every training image
                args += [
                    "--data.init_args.image_labels",
                    str(camvid_image_labels(passthrough, Path(opts.runs_dir))),
                ]
            else:
                args += ["--model.network", PROTOCOL_NETWORK]
            if method == "gansemiseg":  # its generator draws images of the crop's size
                args += ["--model.init_args.image_size", "[90, 120]"]
            for seed in seeds:
                run_args = [
                    *args,
                    "--data.init_args.labeled", f"{frac:g}",
                    "--data.init_args.seed", str(seed),
                    *budget(seed, steps, passthrough),
                ]  # fmt: skip
                runs.append(Run("semi", method, network, frac, seed, steps, run_args))
    return runs


def quickstart_runs(
    opts: argparse.Namespace, seeds: list[int], passthrough: list[str]
) -> list[Run]:
    """The README's main job as a new user runs it, at 1 and 2 threads per seed: the recipe must
    land above 80% and within 2 points across thread counts (issue 23). The method column names
    the thread count; 1600 steps (10 epochs of 160)."""
    return [
        Run(
            "quickstart",
            f"threads{threads}",
            "UNet-original",
            None,
            seed,
            opts.steps or 1600,
            [
                "--config",
                "experiments/quickstart.yaml",
                "--seed_everything",
                str(seed),
                *passthrough,
            ],
            threads=threads,
        )  # fmt: skip
        for seed in seeds
        for threads in (1, 2)
    ]


def maskrcnn_runs(opts: argparse.Namespace, seeds: list[int], passthrough: list[str]) -> list[Run]:
    steps = opts.steps or 1200  # experiments/cpu/maskrcnn_synthetic.yaml's header: the probe
    return [
        Run(
            "maskrcnn",
            "maskrcnn",
            "MaskRCNN-R18",
            None,
            seed,
            steps,
            [
                "--config",
                "experiments/cpu/maskrcnn_synthetic.yaml",
                *budget(seed, steps, passthrough),
            ],
            monitor="mask_mAP50",
        )  # fmt: skip
        for seed in seeds
    ]


def mask2former_runs(
    opts: argparse.Namespace, seeds: list[int], passthrough: list[str]
) -> list[Run]:
    """The small Mask2Former on the protocol at full labels, at the supervised full-label
    budget; its per-pixel baseline is the semi study's supervised full-label rows (the same
    protocol, steps and seeds), not run twice."""
    steps = opts.steps or SEMI_STEPS[1.0]
    config = "experiments/cpu/mask2former_small.yaml"
    return [
        Run(
            "mask2former",
            "mask2former",
            "Mask2Former-R18",
            1.0,
            seed,
            steps,
            [
                "--config",
                SEMI_METHODS["supervised"],
                "--config",
                PROTOCOL,
                "--config",
                config,
                "--data.init_args.labeled",
                "1.0",
                "--data.init_args.seed",
                str(seed),
                *budget(seed, steps, passthrough),
            ],
        )  # fmt: skip
        for seed in seeds
    ]


def data_root(passthrough: list[str]) -> Path:
    """The dataset root given on the command line (--data.root or its long form)."""
    for i, arg in enumerate(passthrough):
        for option in ("--data.root", "--data.init_args.dataset.init_args.root"):
            if arg == option and i + 1 < len(passthrough):
                return Path(passthrough[i + 1])
            if arg.startswith(option + "="):
                return Path(arg.split("=", 1)[1])
    raise SystemExit("study.py: give the CamVid folder with --data.root PATH")


def camvid_image_labels(passthrough: list[str], folder: Path) -> Path:
    """folder/camvid_image_labels.json, {image name: [classes present]} of CamVid's training
    images, from their masks (DecoupledNet's image-level supervision); written once."""
    import numpy as np
    from PIL import Image

    from seglight.data.camvid import CamVid

    path = folder / "camvid_image_labels.json"
    if path.is_file():
        return path
    labels = {}
    for mask in sorted((data_root(passthrough) / "trainannot").glob("*.png")):
        values = np.unique(np.asarray(Image.open(mask)))
        labels[mask.stem] = [CamVid.class_names[v] for v in values if v < len(CamVid.class_names)]
    if not labels:
        raise SystemExit(f"study.py: no masks in {data_root(passthrough) / 'trainannot'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(labels, indent=0))
    return path


STUDIES = {
    "semi": semi_runs,
    "maskrcnn": maskrcnn_runs,
    "mask2former": mask2former_runs,
    "quickstart": quickstart_runs,
}


# ----------------------------------------------------------------------------- records
def recorded(study: str) -> set[tuple[str, ...]]:
    path = RESULTS / f"{study}.csv"
    if not path.is_file():
        return set()
    with path.open(newline="") as f:
        return {
            (r["method"], r["network"], r["labeled"], r["seed"], r["steps"])
            for r in csv.DictReader(f)
        }


_LOCK = threading.Lock()


def append_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Append rows to a CSV (header first if new), flushed to disk before returning."""
    with _LOCK:
        new = not path.is_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, columns)
            if new:
                writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "seglight", "experiments")
    return rev + ("-dirty" if dirty else "")


def at_fraction(history: list[dict], key: str, steps: int, fraction: float) -> float | None:
    """The value of `key` at the last validation at or before `fraction` of the steps."""
    points = [h for h in history if h.get(key) is not None and h["step"] <= fraction * steps]
    return points[-1][key] if points else None


def flat_point(point: dict) -> dict[str, float]:
    """A history point's numbers: the validation metrics, and the training means of each
    train/* value the model logs (MetricsSummary's "train": {name: mean}) as train/<name>."""
    flat = {}
    for key, value in point.items():
        if key in ("step", "epoch"):
            continue
        if isinstance(value, dict):
            for name, v in value.items():
                full = name if name.startswith(f"{key}/") else f"{key}/{name}"
                if isinstance(v, int | float):
                    flat[full] = v
        elif isinstance(value, int | float):
            flat[key] = value
    return flat


def summarise(run: Run, run_dir: Path, wall_s: float, command: str) -> tuple[dict, list[dict]]:
    """The CSV row and the curve rows of a finished run, from its metrics.json."""
    summary = json.loads((run_dir / "metrics.json").read_text())
    history = sorted(summary.get("history", []), key=lambda h: h["step"])
    if not history or history[-1]["step"] != run.steps:
        raise RuntimeError(f"{run.name}: no validation at the last step {run.steps}")
    tests = [e for e in summary.get("evaluations", []) if e.get("stage") == "test"]
    test = tests[-1]["metrics"] if tests else {}
    final, at75 = history[-1].get(run.monitor), at_fraction(history, run.monitor, run.steps, 0.75)
    ious = [h["mIoU"] for h in history if h.get("mIoU") is not None]

    def percent(v: float | None) -> str:  # metrics.json holds fractions; the CSV percent
        return "" if v is None else f"{100 * v:.2f}"

    row = {
        "study": run.study, "method": run.method, "network": run.network,
        "labeled": fmt(run.labeled), "seed": run.seed, "steps": run.steps,
        "val_mIoU": percent(history[-1].get("mIoU")),
        "val_mIoU_75": percent(at_fraction(history, "mIoU", run.steps, 0.75)),
        "val_mIoU_best": percent(max(ious, default=None)),
        "test_mIoU": percent(test.get("mIoU")),
        "mask_mAP": percent(history[-1].get("mask_mAP")),
        "mask_mAP50": percent(history[-1].get("mask_mAP50")),
        # README's criterion: the monitored metric at 75% of the steps within 1 point of the end
        "converged": "" if final is None or at75 is None else str(abs(final - at75) * 100 <= 1.0),
        "wall_s": f"{wall_s:.0f}", "commit": commit(), "command": command,
    }  # fmt: skip
    curves = [
        {
            "study": run.study,
            "method": run.method,
            "labeled": fmt(run.labeled),
            "seed": run.seed,
            "step": h["step"],
            "metric": metric,
            "value": value,
        }  # fmt: skip
        for h in history
        for metric, value in flat_point(h).items()
    ]
    return row, curves


# ----------------------------------------------------------------------------- running
def seglight(stage: str, args: list[str], threads: int = 1) -> list[str]:
    return [sys.executable, "-m", "seglight", stage, *args, "--threads", str(threads)]


def command_of(run: Run) -> str:
    """The fit command a run is started with (its row's `command`), without its run folder."""
    return shlex.join(["python", "-m", "seglight", "fit", *run.args, "--threads", str(run.threads)])


def execute(run: Run, runs_dir: Path, log: Path, dry_run: bool) -> None:
    run_dir = runs_dir / run.study / run.name
    fit = [*run.args, "--trainer.default_root_dir", str(run_dir)]
    command = shlex.join(
        ["python", "-m", "seglight", "fit", *run.args, "--threads", str(run.threads)]
    )
    resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
    started_with = run_dir / STARTED_WITH
    if resume:
        before = started_with.read_text().strip() if started_with.is_file() else "(not recorded)"
        if before != command:  # resuming would mix two settings in one row
            say(
                f"REFUSED {run.study}/{run.name}: {run_dir} holds a run started with another "
                f"command ({before}); remove the folder to start it again"
            )
            return
        fit += ["--ckpt_path", "last"]
    elif run_dir.exists() and not dry_run:  # a start that wrote nothing worth keeping
        import shutil

        shutil.rmtree(run_dir)
    if dry_run:
        print(("resume: " if resume else "") + command)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    started_with.write_text(command + "\n")
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    started = time.time()
    say(f"start {run.study}/{run.name}{' (resumed)' if resume else ''}")
    log.parent.mkdir(parents=True, exist_ok=True)
    with (log.parent / f"{run.study}-{run.name}.log").open("a") as out:
        done = subprocess.run(
            seglight("fit", fit, run.threads), cwd=REPO, stdout=out, stderr=out, env=env
        )
        if done.returncode != 0:
            say(f"FAILED {run.study}/{run.name} (exit {done.returncode}; see {out.name})")
            return
        last = run_dir / "checkpoints" / "last.ckpt"
        test = [*run.args, "--trainer.default_root_dir", str(run_dir), "--ckpt_path", str(last)]
        done = subprocess.run(
            seglight("test", test, run.threads), cwd=REPO, stdout=out, stderr=out, env=env
        )
        if done.returncode != 0:
            say(f"FAILED test of {run.study}/{run.name} (see {out.name})")
            return
    summary = json.loads((run_dir / "metrics.json").read_text())
    history = summary.get("history") or [{}]
    wall = history[-1].get("wall_s") or (time.time() - started)
    row, curves = summarise(run, run_dir, wall, command)
    append_rows(RESULTS / f"{run.study}.csv", COLUMNS, [row])
    append_rows(RESULTS / f"{run.study}_curves.csv", CURVE_COLUMNS, curves)
    say(
        f"done {run.study}/{run.name}: val {row['val_mIoU']} (75%: {row['val_mIoU_75']}), "
        f"test {row['test_mIoU']}, {row['wall_s']} s"
    )


def say(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def iterate(runs: list[Run], done: set[tuple[str, ...]]) -> Iterator[Run]:
    for run in runs:
        if run.key in done:
            continue
        yield run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--methods", default=None, help="semi: comma-separated subset")
    parser.add_argument("--labeled", default="0.125", help="semi: comma-separated fractions")
    parser.add_argument("--steps", type=int, default=None, help="override the study's budget")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (1 thread each)")
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "study"))
    parser.add_argument("--dry-run", action="store_true")
    opts, passthrough = parser.parse_known_args(argv)
    seeds = [int(s) for s in opts.seeds.split(",")]
    runs = STUDIES[opts.study](opts, seeds, passthrough)
    todo = list(iterate(runs, recorded(opts.study)))
    say(f"{opts.study}: {len(runs)} runs, {len(runs) - len(todo)} recorded, {len(todo)} to run")
    runs_dir = Path(opts.runs_dir)
    log = runs_dir / "logs" / "x"
    with ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
        for future in [pool.submit(execute, r, runs_dir, log, opts.dry_run) for r in todo]:
            future.result()


if __name__ == "__main__":
    main()
