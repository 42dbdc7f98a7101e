"""Compare runs without W&B: `python -m seglight compare RUN_DIR... [--out DIR]`.

Every run directory holds `config.yaml` (the resolved config) and `metrics.json` (written by
`seglight.callbacks.MetricsSummary`). This module reads them and shows, side by side, the config
keys that differ between the runs and their results (mIoU, mAcc, pixel accuracy, parameters,
training throughput, activation memory), and draws per-class IoU bars and val/mIoU curves.

    python -m seglight compare 'runs/*/version_*' --out results/

Python API (used by the notebooks):

    runs = load_runs(["runs/fcn*/version_*"])
    print_table(runs)              # or compare_table(runs) -> rich Table
    plot_per_class(runs, "per_class_iou.png")
    plot_curves(runs, "miou_curves.png")
    report(runs, out="results/")   # all of the above, plus runs.csv and runs.md

Metrics are read from one section of metrics.json for all runs (`source`): "test" (the newest
`seglight test` evaluation of the run, whose checkpoint the table names), "best_val" (the
validation with the best mIoU during fit), or "val" (the last validation of fit); "auto" takes
the first of these that every run has.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from seglight.config import flatten_config, is_compared
from seglight.errors import ConfigError, DataError
from seglight.plots import figure, save

SOURCES = ("test", "best_val", "val")
SWEEP_FILE = "sweep.json"  # written into each run directory by `seglight sweep`


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One run directory: its flattened config and its metrics.json."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    @classmethod
    def load(cls, path: str | Path) -> Run:
        path = Path(path)
        config = _read(path / "config.yaml", yaml.safe_load) or {}
        metrics = _read(path / "metrics.json", json.loads) or {}
        sweep = _read(path / SWEEP_FILE, json.loads) or {}
        if not isinstance(config, dict) or not isinstance(metrics, dict):
            raise DataError(f"{path}: config.yaml and metrics.json must each hold a mapping")
        flat = flatten_config(config)
        name = sweep.get("name") or flat.get("trainer.logger.name") or _short_path(path)
        return cls(path=path, config=flat, metrics=metrics, name=str(name))

    def scores(self, source: str) -> dict[str, Any]:
        """The metrics of one section ("test", "best_val", "val"): {"mIoU": ..., "IoU/<class>": ...}.
        "test" is the newest test evaluation (`evaluations` in metrics.json; a top-level "test",
        as metrics.json had before evaluations were recorded, otherwise)."""
        if source == "test" and self.test_evaluation is not None:
            return self.test_evaluation.get("metrics") or {}
        return self.metrics.get(source) or {}

    @property
    def test_evaluation(self) -> dict[str, Any] | None:
        """The newest `seglight test` of this run: {"checkpoint", "metrics", "time", ...}."""
        tests = [e for e in self.metrics.get("evaluations") or [] if e.get("stage") == "test"]
        return tests[-1] if tests else None

    @property
    def test_checkpoint(self) -> str | None:
        """The file name of the checkpoint that the newest test evaluated."""
        checkpoint = (self.test_evaluation or {}).get("checkpoint")
        return Path(checkpoint).name if checkpoint else None

    def per_class(self, source: str) -> dict[str, float | None]:
        """Per-class IoU, {class name: IoU or None when the class was absent}, in the dataset's
        class order where metrics.json records it."""
        scores = {k[4:]: v for k, v in self.scores(source).items() if k.startswith("IoU/")}
        order = [c for c in self.metrics.get("class_names") or [] if c in scores]
        return {c: scores[c] for c in [*order, *(c for c in scores if c not in order)]}

    @property
    def params(self) -> int | None:
        return self.metrics.get("params")

    @property
    def throughput(self) -> float | None:
        """Training images per second (all ranks)."""
        return (self.metrics.get("throughput") or {}).get("train_images_per_s")

    @property
    def memory(self) -> dict[str, Any]:
        """{"activations_mb", "batch_size", "peak_cuda_mb"} where measured."""
        return self.metrics.get("memory") or {}

    @property
    def history(self) -> list[dict[str, Any]]:
        """One {"epoch", "step", "mIoU", ...} per validation during fit (older runs: none)."""
        return list(self.metrics.get("history") or [])


def _read(path: Path, parse) -> Any:
    if not path.is_file():
        return None
    try:
        return parse(path.read_text())
    except (ValueError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot be parsed ({e})") from e


def _short_path(path: Path) -> str:
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _natural_key(path: Path) -> list[Any]:
    """version_10 after version_9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _is_run_dir(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / "config.yaml").is_file()


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories named by `paths`: run directories themselves, glob patterns, or folders
    searched for run directories (e.g. `runs/`)."""
    found: list[Path] = []
    for pattern in paths:
        pattern = str(pattern)
        matches = sorted(glob.glob(pattern), key=_natural_key) if glob.has_magic(pattern) else []
        if not matches and not Path(pattern).exists():
            raise ConfigError(f"{pattern}: no such run directory (nothing matches)")
        dirs: list[Path] = []
        for match in matches or [pattern]:
            match = Path(match)
            if _is_run_dir(match):
                dirs.append(match)
            elif match.is_dir():
                below = {p.parent for n in ("metrics.json", "config.yaml") for p in match.rglob(n)}
                dirs += sorted(below, key=_natural_key)
        if not dirs:
            raise ConfigError(
                f"{pattern}: not a run directory (no metrics.json or config.yaml in it or below)"
            )
        found += dirs
    return list(dict.fromkeys(found))  # in order, without repeats


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Load every run directory named by `paths` (see find_run_dirs)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return [Run.load(p) for p in find_run_dirs(paths)]


def choose_source(runs: Sequence[Run], source: str = "auto") -> str:
    """`source`, or for "auto" the first of test, best_val, val that every run has."""
    if source != "auto":
        if source not in SOURCES:
            raise ConfigError(f"metrics source must be one of auto, {', '.join(SOURCES)}")
        return source
    for candidate in SOURCES:
        if runs and all(run.scores(candidate) for run in runs):
            return candidate
    return "val"


def extra_sources(runs: Sequence[Run], source: str = "auto") -> list[str]:
    """With "auto", the other sections (test, best_val) that some run has but that the table's
    main source is not: each gets its own mIoU column, empty where a run lacks it (a tested run
    beside an untested one keeps its test score)."""
    if source != "auto":
        return []
    chosen = choose_source(runs, source)
    return [s for s in ("test", "best_val") if s != chosen and any(run.scores(s) for run in runs)]


def _sources(runs: Sequence[Run], source: str) -> str:
    """The metrics shown: "best_val", or "best_val; test mIoU where a run has it"."""
    extras = extra_sources(runs, source)
    also = f"; {', '.join(extras)} mIoU where a run has it" if extras else ""
    return f"{choose_source(runs, source)}{also}"


# ----------------------------------------------------------------------------- the table
def _frozen(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose value is not the same in every run (a missing key counts as a value),
    in the order they first appear, without those that cannot matter (config.is_compared: run
    directory, logger, display settings)."""
    keys = list(dict.fromkeys(k for run in runs for k in run.config))
    out = []
    for key in keys:
        if not is_compared(key):
            continue
        values = {_frozen(run.config.get(key, "<unset>")) for run in runs}
        if len(values) > 1:
            out.append(key)
    return out


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """The last part of each dotted key, longer where two keys would share it."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if sum(k == name or k.endswith("." + name) for k in keys) == 1:
                break
        names[key] = name
    return names


def format_value(value: Any, none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def settings(run: Run, keys: Sequence[str], short: dict[str, str], none: str = "-") -> str:
    """`key=value` of the given config keys, two spaces apart, without spaces inside a value
    (so that a wrapped table cell or a legend breaks between settings, not inside one)."""
    return "  ".join(
        f"{short[k]}={format_value(run.config.get(k), none).replace(', ', ',').replace(': ', ':')}"
        for k in keys
    )


#: a legend entry names the run (as the table does) and, up to this many characters, its settings
LEGEND_SETTINGS_CHARS = 40


def labels(runs: Sequence[Run]) -> list[str]:
    """A legend label per run: its name, as in the table's first column, followed by the config
    values that differ between the runs when they are short enough for every run."""
    keys = differing_keys(runs)
    short = short_names(keys)
    # a setting the name shows already (a sweep names its runs by their settings) is not
    # repeated; null as in the config files and the sweep's names
    values = [
        settings(
            run, [k for k in keys if f"{k.rsplit('.', 1)[-1]}=" not in run.name], short, "null"
        )
        for run in runs
    ]
    if any(values) and max(map(len, values)) <= LEGEND_SETTINGS_CHARS:
        return [f"{run.name}: {v}" if v else run.name for run, v in zip(runs, values, strict=True)]
    return [run.name for run in runs]


def _percent(value: Any) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{100 * value:.2f}"
    )


def _megabytes(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"  # small models: 3 digits still


def table_rows(
    runs: Sequence[Run], source: str = "auto", keys: Sequence[str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """(column headers, rows of strings): run, the config keys (default: those that differ),
    mIoU / mAcc / acc in %, parameters, training images/s, activation and peak CUDA memory;
    with "auto", also "<section> mIoU %" for each section only some runs have (extra_sources)."""
    extras = extra_sources(runs, source)
    source = choose_source(runs, source)
    keys = differing_keys(runs) if keys is None else list(keys)
    short = short_names(keys)
    columns = ["run", *(short[k] for k in keys), "mIoU %", "mAcc %", "acc %"]
    columns += [f"{extra} mIoU %" for extra in extras]
    columns += ["params (M)", "train img/s", "act. MB"]
    tested = source == "test" and any(run.test_checkpoint for run in runs)
    if tested:
        columns.append("test checkpoint")
    peak = any("peak_cuda_mb" in run.memory for run in runs)
    if peak:
        columns.append("peak CUDA MB")
    rows = []
    for run in runs:
        scores = run.scores(source)
        row = [run.name, *(format_value(run.config.get(k)) for k in keys)]
        row += [_percent(scores.get(m)) for m in ("mIoU", "mAcc", "acc")]
        row += [_percent(run.scores(extra).get("mIoU")) for extra in extras]
        row.append("-" if run.params is None else f"{run.params / 1e6:.3f}")
        row.append("-" if run.throughput is None else f"{run.throughput:.1f}")
        row.append(_megabytes(run.memory.get("activations_mb")))
        if tested:
            row.append(run.test_checkpoint or "-")
        if peak:
            row.append(_megabytes(run.memory.get("peak_cuda_mb")))
        rows.append(row)
    return columns, rows


#: the terminal width the table is laid out for, at least (wider terminals get their width)
TABLE_WIDTH = 120


def compare_table(
    runs: Sequence[Run],
    source: str = "auto",
    keys: Sequence[str] | None = None,
    width: int = TABLE_WIDTH,
):
    """The comparison as a rich Table (print it with rich.print or a Console) fitting `width`
    columns: one column per differing config key when they fit, else the keys gathered in one
    "settings" column whose cell wraps between `key=value` pairs. Run names and numbers are
    never cut."""
    from rich.table import Table

    title = f"{len(runs)} runs (metrics: {_sources(runs, source)})"
    keys = differing_keys(runs) if keys is None else list(keys)
    columns, rows = table_rows(runs, source, keys)
    n_keys = len(keys)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    if sum(widths) + 3 * len(widths) + 1 > width and n_keys:  # too wide: one settings column
        short = short_names(keys)
        columns = [columns[0], *columns[1 + n_keys :], "settings"]
        rows = [
            [row[0], *row[1 + n_keys :], settings(run, keys, short)]
            for row, run in zip(rows, runs, strict=True)
        ]
    table = Table(title=title)
    for i, column in enumerate(columns):
        wraps = column == "settings"
        table.add_column(
            column,
            justify="left" if i == 0 or wraps else "right",
            no_wrap=not wraps,
            overflow="fold" if wraps else "ellipsis",
            ratio=1 if wraps else None,
        )
    for row in rows:
        table.add_row(*row)
    return table


def print_table(runs: Sequence[Run], source: str = "auto") -> None:
    from rich.console import Console

    width = max(TABLE_WIDTH, Console().width)
    Console(width=width).print(compare_table(runs, source, width=width))


def write_csv(runs: Sequence[Run], path: str | Path, source: str = "auto") -> Path:
    """The table as CSV, with full key names and raw numbers (mIoU etc. as fractions)."""
    extras = extra_sources(runs, source)
    source = choose_source(runs, source)
    keys = differing_keys(runs)
    classes = list(dict.fromkeys(c for run in runs for c in run.per_class(source)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["run", "path", *keys, "source", "mIoU", "mAcc", "acc"]
            + [f"{extra}_mIoU" for extra in extras]
            + ["params"]
            + ["train_images_per_s", "activations_mb", "peak_cuda_mb"]
            + [f"IoU/{c}" for c in classes]
        )
        for run in runs:
            scores = run.scores(source)
            writer.writerow(
                [run.name, str(run.path), *(_csv_value(run.config.get(k)) for k in keys), source]
                + [scores.get(m) for m in ("mIoU", "mAcc", "acc")]
                + [run.scores(extra).get("mIoU") for extra in extras]
                + [run.params, run.throughput]
                + [run.memory.get("activations_mb"), run.memory.get("peak_cuda_mb")]
                + [run.per_class(source).get(c) for c in classes]
            )
    return path


def _csv_value(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def write_markdown(runs: Sequence[Run], path: str | Path, source: str = "auto") -> Path:
    """The table as a Markdown table (for a README or a report)."""
    columns, rows = table_rows(runs, source)
    lines = [f"Metrics: {_sources(runs, source)}.", "", "| " + " | ".join(columns) + " |"]
    lines.append("| " + " | ".join("---" for _ in columns) + " |")
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- plots
def _legend_below(fig, ax, n: int) -> None:
    """The legend under the plot, in as many columns as fit, so that it never squeezes the axes
    nor runs off the figure (constrained layout makes room for it)."""
    if not ax.get_legend_handles_labels()[0]:
        return
    longest = max(len(t) for t in ax.get_legend_handles_labels()[1])
    # ~0.075 inch per character at the small font, plus the marker
    per_column = 0.075 * longest + 0.6
    ncols = max(1, min(n, int(fig.get_figwidth() // per_column)))
    fig.legend(loc="outside lower center", ncols=ncols, fontsize="small", frameon=False)


def per_class_figure(runs: Sequence[Run], source: str = "auto"):
    """The Figure of `plot_per_class`."""
    source = choose_source(runs, source)
    classes = list(dict.fromkeys(c for run in runs for c in run.per_class(source)))
    groups = [*classes, "mIoU"]
    n = max(1, len(runs))
    width = 0.8 / n
    # wide enough for the bars and the class names, at most a screen's width
    fig = figure(min(16.0, max(7.0, (0.08 * n + 0.25) * len(groups) + 2)), 5.0)
    ax = fig.subplots()
    x = np.arange(len(groups))
    for i, (run, label) in enumerate(zip(runs, labels(runs), strict=True)):
        values = [run.per_class(source).get(c) for c in classes] + [run.scores(source).get("mIoU")]
        heights = [np.nan if v is None else 100 * v for v in values]
        ax.bar(x - 0.4 + width * (i + 0.5), heights, width, label=label)
    ax.set_xticks(x, groups, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel(f"IoU % ({source})")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Per-class IoU")
    _legend_below(fig, ax, n)
    return fig


def plot_per_class(runs: Sequence[Run], path: str | Path, source: str = "auto") -> Path:
    """Grouped bars of per-class IoU (%), one bar per run for each class, and mIoU last; the
    legend below names the runs as the table does."""
    return save(per_class_figure(runs, source), path)


def curves_figure(runs: Sequence[Run], metric: str = "mIoU"):
    """The Figure of `plot_curves`."""
    from matplotlib.ticker import MaxNLocator

    fig = figure(8.0, 5.0)
    ax = fig.subplots()
    for run, label in zip(runs, labels(runs), strict=True):
        points = [(h.get("step"), h.get(metric)) for h in run.history]
        if not points and run.scores("val"):
            points = [(run.metrics.get("step"), run.scores("val").get(metric))]
        points = [(s, 100 * v) for s, v in points if s is not None and v is not None]
        if points:
            steps, values = zip(*sorted(points), strict=True)
            ax.plot(steps, values, marker="o", markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.lines:  # from step 0: one validation is not drawn on an axis of 1.9 to 2.1
        ax.set_xlim(left=0)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"val/{metric} %")
    ax.grid(alpha=0.3)
    ax.set_title(f"val/{metric} during training")
    _legend_below(fig, ax, len(runs))
    return fig


def plot_curves(runs: Sequence[Run], path: str | Path, metric: str = "mIoU") -> Path:
    """val/<metric> (%) against the training step, one line per run (from metrics.json's
    history; a run without one is drawn as its last validation's point)."""
    return save(curves_figure(runs, metric), path)


# ----------------------------------------------------------------------------- everything
def report(
    runs: Sequence[Run], out: str | Path | None = None, source: str = "auto"
) -> dict[str, Path]:
    """Print the table; with `out`, also write runs.csv, runs.md, per_class_iou.png and
    miou_curves.png there. Returns the files written."""
    if not runs:
        raise ConfigError("no runs to compare")
    print_table(runs, source)
    if out is None:
        return {}
    out = Path(out)
    files = {
        "csv": write_csv(runs, out / "runs.csv", source),
        "markdown": write_markdown(runs, out / "runs.md", source),
        "per_class": plot_per_class(runs, out / "per_class_iou.png", source),
        "curves": plot_curves(runs, out / "miou_curves.png"),
    }
    print(f"seglight compare: wrote {', '.join(str(p) for p in files.values())}")
    return files


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="seglight compare",
        description="Compare runs from their config.yaml and metrics.json: the config keys that "
        "differ, mIoU / mAcc / acc, parameters, throughput and memory; per-class IoU and "
        "val/mIoU curves as PNG files with --out.",
    )
    parser.add_argument(
        "runs", nargs="+", help="run directories, glob patterns ('runs/*/version_*') or folders"
    )
    parser.add_argument("--out", help="folder for runs.csv, runs.md and the PNG plots")
    parser.add_argument(
        "--metrics",
        default="auto",
        choices=["auto", *SOURCES],
        help="which metrics of metrics.json (auto: test, else best_val, else val)",
    )
    args = parser.parse_args(argv)
    report(load_runs(args.runs), args.out, args.metrics)
