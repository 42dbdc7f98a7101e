"""Render README's study tables and the study plots from results/*.csv (scripts/study.py writes
them): no result number in those README sections is typed by hand.

    python scripts/render_results.py            # rewrite README's marked sections and the PNGs
    python scripts/render_results.py --check    # exit 1 if README is not what the CSVs give

README holds each table between `<!-- results:NAME -->` and `<!-- /results:NAME -->`; the plots
are written to results/<study>_curves.png (val mIoU, or mask mAP50, against steps: the mean over
seeds with a band from the lowest to the highest seed) and results/semi_monitors.png (what each
method does while it trains: loss parts, confident fraction, pseudo-label accuracy, ...).
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
README = REPO / "README.md"

#: the two-sided 95% quantile of Student's t for n - 1 degrees of freedom (n seeds)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
METHOD_NAMES = {
    "supervised": "Supervised (labelled only)",
    "mean_teacher": "Mean Teacher",
    "fixmatch": "FixMatch",
    "cps": "CPS",
    "advsemiseg": "AdvSemiSeg",
    "gansemiseg": "GANSemiSeg",
    "decoupled": "DecoupledNet",
    "mask2former": "Mask2Former (small)",
    "maskrcnn": "Mask R-CNN",
    "threads1": "1 thread",
    "threads2": "2 threads",
}


def read(name: str) -> list[dict[str, str]]:
    path = RESULTS / f"{name}.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def number(value: str) -> float | None:
    return float(value) if value not in ("", None) else None


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def paired_gain(gains: list[float]) -> str:
    """Mean paired difference with its 95% confidence interval (Student's t over the seeds)."""
    if len(gains) < 2:
        return "-" if not gains else f"{gains[0]:+.1f}"
    m, sd = statistics.mean(gains), statistics.stdev(gains)
    half = T95.get(len(gains) - 1, 1.96) * sd / math.sqrt(len(gains))
    return f"{m:+.1f} [{m - half:+.1f}, {m + half:+.1f}]"


def fraction_label(value: str) -> str:
    f = float(value)
    return "full" if f >= 1 else f"1/{round(1 / f)}"


# ----------------------------------------------------------------------------- tables
def semi_table(rows: list[dict[str, str]]) -> str:
    by = defaultdict(dict)  # (method, labeled) -> seed -> row
    for r in rows:
        by[(r["method"], r["labeled"])][r["seed"]] = r
    out = [
        "| labelled | method | seeds | val mIoU | test mIoU | test gain over supervised [95% CI] "
        "| converged | steps |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    order = list(METHOD_NAMES)
    keys = sorted(by, key=lambda k: (-float(k[1]), order.index(k[0]) if k[0] in order else 99))
    for method, labeled in keys:
        runs = by[(method, labeled)]
        val = [number(r["val_mIoU"]) for r in runs.values() if number(r["val_mIoU"]) is not None]
        test = [number(r["test_mIoU"]) for r in runs.values() if number(r["test_mIoU"]) is not None]
        reference = by.get(("supervised", labeled), {})
        gains = [
            number(r["test_mIoU"]) - number(reference[s]["test_mIoU"])
            for s, r in runs.items()
            if s in reference and number(r["test_mIoU"]) is not None
            and number(reference[s]["test_mIoU"]) is not None
        ]  # fmt: skip
        gain = "(reference)" if method == "supervised" else paired_gain(gains)
        converged = sum(r["converged"] == "True" for r in runs.values())
        steps = ",".join(sorted({r["steps"] for r in runs.values()}))
        out.append(
            f"| {fraction_label(labeled)} | {METHOD_NAMES.get(method, method)} | {len(runs)} | "
            f"{mean_sd(val)} | {mean_sd(test)} | {gain} | {converged}/{len(runs)} | {steps} |"
        )
    return "\n".join(out)


def mask2former_table(rows: list[dict[str, str]]) -> str:
    """The small Mask2Former beside the protocol's per-pixel network at full labels (the semi
    study's supervised rows: the same protocol, budget and seeds)."""
    baseline = [r for r in read("semi") if r["method"] == "supervised" and r["labeled"] == "1"]
    by = defaultdict(list)
    for r in [*baseline, *rows]:
        by[(r["method"], r["network"])].append(r)
    out = [
        "| model | seeds | val mIoU | test mIoU | converged | steps | wall per run (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (method, network), runs in sorted(by.items(), key=lambda kv: kv[0][0] != "supervised"):
        val = [number(r["val_mIoU"]) for r in runs if number(r["val_mIoU"]) is not None]
        test = [number(r["test_mIoU"]) for r in runs if number(r["test_mIoU"]) is not None]
        wall = statistics.median(number(r["wall_s"]) for r in runs)
        converged = sum(r["converged"] == "True" for r in runs)
        label = f"{network} (per-pixel)" if method == "supervised" else METHOD_NAMES[method]
        steps = ",".join(sorted({r["steps"] for r in runs}))
        out.append(
            f"| {label} | {len(runs)} | {mean_sd(val)} | {mean_sd(test)} | "
            f"{converged}/{len(runs)} | {steps} | {wall:.0f} |"
        )
    return "\n".join(out)


def maskrcnn_table(rows: list[dict[str, str]]) -> str:
    out = [
        "| seed | steps | mask mAP | mask mAP50 | converged (mAP50) | wall (s) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(rows, key=lambda r: int(r["seed"])):
        out.append(
            f"| {r['seed']} | {r['steps']} | {r['mask_mAP']} | {r['mask_mAP50']} | "
            f"{r['converged']} | {r['wall_s']} |"
        )
    return "\n".join(out)


def quickstart_table(rows: list[dict[str, str]]) -> str:
    """Per seed, the quickstart's best and final val mIoU at 1 and 2 threads and their gap."""
    by = {(r["seed"], r["method"]): r for r in rows}
    out = [
        "| seed | best val mIoU, 1 thread | best val mIoU, 2 threads | gap (points) | "
        "final val mIoU, 1 / 2 threads | test mIoU, 1 / 2 threads | wall (s), 1 / 2 threads |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for seed in sorted({r["seed"] for r in rows}, key=int):
        one, two = by.get((seed, "threads1")), by.get((seed, "threads2"))

        def cell(run: dict | None, key: str) -> str:
            return run[key] if run and run[key] else "-"

        gap = "-"
        if one and two:
            gap = f"{abs(float(one['val_mIoU_best']) - float(two['val_mIoU_best'])):.2f}"
        out.append(
            f"| {seed} | {cell(one, 'val_mIoU_best')} | {cell(two, 'val_mIoU_best')} | {gap} | "
            f"{cell(one, 'val_mIoU')} / {cell(two, 'val_mIoU')} | "
            f"{cell(one, 'test_mIoU')} / {cell(two, 'test_mIoU')} | "
            f"{cell(one, 'wall_s')} / {cell(two, 'wall_s')} |"
        )
    return "\n".join(out)


TABLES = {
    "semi": semi_table,
    "mask2former": mask2former_table,
    "maskrcnn": maskrcnn_table,
    "quickstart": quickstart_table,
}


# ----------------------------------------------------------------------------- plots
def curves(name: str) -> dict[tuple[str, str, str], dict[int, dict[str, float]]]:
    """(method, labeled, metric) -> seed -> {step: value}."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for r in read(f"{name}_curves"):
        out[(r["method"], r["labeled"], r["metric"])][int(r["seed"])][int(r["step"])] = float(
            r["value"]
        )
    return out


def band(per_seed: dict[int, dict[int, float]]) -> tuple[list[int], list[float], list, list]:
    steps = sorted(set.intersection(*(set(s) for s in per_seed.values())))
    values = [[per_seed[s][t] for s in per_seed] for t in steps]
    return (
        steps,
        [statistics.mean(v) for v in values],
        [min(v) for v in values],
        [max(v) for v in values],
    )


def plot_curves(name: str, metric: str, ylabel: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {k: v for k, v in curves(name).items() if k[2] == metric}
    if not data:
        return False
    groups = sorted({k[1] for k in data}, key=lambda x: -float(x) if x else 0)
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    for ax, labeled in zip(axes[0], groups, strict=True):
        for (method, lab, _), per_seed in sorted(data.items()):
            if lab != labeled:
                continue
            steps, mean, lo, hi = band(per_seed)
            scale = 100.0
            label = f"{METHOD_NAMES.get(method, method)} ({len(per_seed)} seeds)"
            (line,) = ax.plot(steps, [scale * v for v in mean], label=label)
            ax.fill_between(
                steps, [scale * v for v in lo], [scale * v for v in hi], alpha=0.2,
                color=line.get_color(),
            )  # fmt: skip
        title = name if not labeled else f"{name}, {fraction_label(labeled)} labelled"
        ax.set(xlabel="training step", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


MONITORS = {
    "train/loss_sup": "supervised loss",
    "train/loss_unsup": "unsupervised loss",
    "train/confident": "confident unlabelled pixels (fraction)",
    "train/pseudo_acc": "pseudo-label accuracy vs held-back masks",
    "train/pseudo_mIoU": "pseudo-label mIoU vs held-back masks",
    "train/d_acc": "discriminator accuracy",
}


def plot_monitors(path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves("semi")
    present = [m for m in MONITORS if any(k[2] == m for k in data)]
    if not present:
        return False
    cols = min(3, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, present, strict=False):
        for (method, labeled, m), per_seed in sorted(data.items()):
            if m != metric or float(labeled) >= 1:
                continue
            steps, mean, lo, hi = band(per_seed)
            label = f"{METHOD_NAMES.get(method, method)}, {fraction_label(labeled)}"
            (line,) = ax.plot(steps, mean, label=label)
            ax.fill_between(steps, lo, hi, alpha=0.2, color=line.get_color())
        ax.set(xlabel="training step", title=MONITORS[metric])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- README
def render_readme(text: str) -> str:
    for name, table in TABLES.items():
        rows = read(name)
        pattern = re.compile(
            rf"(<!-- results:{name} -->\n)(.*?)(<!-- /results:{name} -->)", re.DOTALL
        )
        if not pattern.search(text):
            continue
        body = table(rows) + "\n" if rows else "(no runs recorded yet)\n"
        body += f"\n<sub>Rendered by scripts/render_results.py from results/{name}.csv.</sub>\n"
        text = pattern.sub(lambda m, b=body: m.group(1) + b + m.group(3), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare README with the CSVs")
    opts = parser.parse_args(argv)
    text = README.read_text()
    rendered = render_readme(text)
    if opts.check:
        if rendered != text:
            print("README's result tables differ from results/*.csv: run scripts/render_results.py")
            return 1
        return 0
    README.write_text(rendered)
    written = []
    for name, metric, label in (
        ("semi", "mIoU", "val mIoU (%)"),
        ("mask2former", "mIoU", "val mIoU (%)"),
        ("maskrcnn", "mask_mAP50", "val mask mAP50 (%)"),
        ("quickstart", "mIoU", "val mIoU (%)"),
    ):
        if plot_curves(name, metric, label, RESULTS / f"{name}_curves.png"):
            written.append(f"results/{name}_curves.png")
    if plot_monitors(RESULTS / "semi_monitors.png"):
        written.append("results/semi_monitors.png")
    print("README.md rendered; plots: " + (", ".join(written) or "none (no curves yet)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
