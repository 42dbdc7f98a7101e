"""The bench's tables: the summary of the timed rounds (images/s, ratios with their confidence
intervals, peak memory) and the loader's, printed with rich."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from seglight.commands.bench.measure import Measured, median_ci
from seglight.commands.bench.peers import Peer


def print_loader_report(results: dict, title: str, console: Any = None) -> None:
    """The tables of bench_loader's results."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=140)
    table = Table(title=f"per sample: {title}")
    paired = any(row["ratio"] is not None for row in results["costs"])

    def ratio(row: dict) -> list[str]:  # the paired-ratio columns, when there are two transforms
        ci = row["ratio_ci"]
        cells = [fmt(row["ratio"], ".3f"), "-" if ci is None else f"{ci[0]:.3f}-{ci[1]:.3f}"]
        return cells if paired else []

    extra = ["ratio to the first", "95% CI"] if paired else []
    for col in ("step", "samples", "ms (median)", "min-max", "n", *extra):
        table.add_column(col, justify="left" if col in ("step", "samples") else "right")
    for row in results["costs"]:
        table.add_row(
            row["step"], row["subset"], f"{row['ms']:.2f}", f"{row['min']:.2f}-{row['max']:.2f}",
            str(row["n"]), *ratio(row),
        )  # fmt: skip
    console.print(table)
    table = Table(title="training DataLoader, images/s (wall clock; median of rounds)")
    for col in ("transform", "workers", "images/s", "min-max", "rounds", *extra):
        table.add_column(col, justify="left" if col == "transform" else "right")
    for row in results["rates"]:
        table.add_row(
            row["transform"], str(row["workers"]), f"{row['images_per_s']:.1f}",
            f"{row['min']:.1f}-{row['max']:.1f}", str(row["rounds"]), *ratio(row),
        )  # fmt: skip
    console.print(table)


def summarise(
    own: Peer, peers: list[Peer], batch_size: int, steps: int, device: torch.device | None = None
) -> dict[str, list]:
    """Per kind ("train", "infer"), one row per peer: median images/s and the rounds' min-max,
    ms per batch, peak MB, and the ratios seglight / peer: speed as the median of the per-round
    ratios with its 95% confidence interval; memory (inference memory on CUDA only: see the
    module docstring)."""
    out: dict[str, list] = {}
    for kind in ("train", "infer"):
        rows = []
        for peer in [own, *peers]:
            measured: Measured = getattr(peer, kind)
            if not measured.seconds:
                continue
            rates = [batch_size * steps / s for s in measured.seconds]
            rows.append(
                {
                    "peer": peer.name,
                    "params": peer.params,
                    "gflops": peer.gflops,
                    "images_per_s": statistics.median(rates),
                    "min": min(rates),
                    "max": max(rates),
                    "rates": rates,
                    "ms_per_batch": 1000 * statistics.median(measured.seconds) / steps,
                    "peak_mb": max(measured.peak) / 2**20 if measured.peak else None,
                }
            )
        if rows and own.name == rows[0]["peer"]:
            ref = rows[0]
            memory_comparable = kind == "train" or (device is not None and device.type == "cuda")
            for row in rows:
                ratios = [a / b for a, b in zip(ref["rates"], row["rates"], strict=True)]
                row["speed_ratio"] = statistics.median(ratios)
                row["speed_ratio_ci"] = median_ci(ratios)
                row["memory_ratio"] = (
                    ref["peak_mb"] / row["peak_mb"]
                    if memory_comparable and ref["peak_mb"] and row["peak_mb"]
                    else None
                )
        out[kind] = rows
    return out


def variant_rows(peers: list[Peer], batch_size: int, steps: int) -> dict[str, list[dict]]:
    """Per kind ("train", "infer"), the raw loop at each variant (precision, torch.compile)
    against the first variant: ms per batch, images/s, and the median of the per-round speed
    ratios (variant / first, > 1: faster) with its 95% confidence interval."""
    out: dict[str, list[dict]] = {}
    for kind in ("train", "infer"):
        measured = [getattr(peer, kind).seconds for peer in peers]
        if not all(measured):
            continue
        rows = []
        for peer, seconds in zip(peers, measured, strict=True):
            ratios = [a / b for a, b in zip(measured[0], seconds, strict=True)]
            rows.append(
                {"peer": peer.name, "ms_per_batch": 1000 * statistics.median(seconds) / steps,
                 "images_per_s": statistics.median(batch_size * steps / s for s in seconds),
                 "speedup": statistics.median(ratios), "speedup_ci": median_ci(ratios)}
            )  # fmt: skip
        out[kind] = rows
    return out


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_report(results: dict, console: Any = None) -> None:
    """Rich tables of a bench run's results (as `run` returns them)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(Console().width, 140))
    s = results["setup"]
    console.print(
        f"[bold]seglight bench[/] on {s['device_name']}, torch {s['torch']} ({s['threads']} threads)"
    )
    if results.get("train") or results.get("infer"):
        console.print(
            f"{s['model']} {s['model_options']}, input {s['batch_size']}x{s['in_channels']}x"
            f"{s['size'][0]}x{s['size'][1]}, {s['num_classes']} classes, precision {s['precision']}; "
            f"{s['rounds']} interleaved rounds x {s['steps']} steps after {s['warmup']} warm-up; "
            f"{s.get('clock', 'wall')} clock"
        )
    titles = {
        "train": "training: seglight in Trainer.fit, the others in a plain loop",
        "infer": "inference: forward + argmax, eval mode (seglight: predict_step)",
    }
    for kind, title in titles.items():
        if not results.get(kind):
            continue
        table = Table(
            title=title,
            caption="ratio = seglight ÷ peer, median of the per-round ratios [95% CI] "
            "(speed > 1: seglight faster)",
        )
        columns = ["peer", "params", "GFLOPs", "ms/batch", "images/s", "min-max"]
        columns += ["speed ratio", "95% CI", "peak MB", "mem ratio"]
        for col in columns:
            table.add_column(col, justify="left" if col == "peer" else "right", no_wrap=True)
        for row in results[kind]:
            table.add_row(
                row["peer"],
                f"{row['params'] / 1e6:.2f}M",
                fmt(row["gflops"], ".1f"),
                f"{row['ms_per_batch']:.1f}",
                f"{row['images_per_s']:.2f}",
                f"{row['min']:.2f}-{row['max']:.2f}",
                fmt(row.get("speed_ratio"), ".3f"),
                "-"
                if row.get("speed_ratio_ci") is None or row is results[kind][0]
                else "{:.3f}-{:.3f}".format(*row["speed_ratio_ci"]),
                fmt(row["peak_mb"], ".0f"),
                fmt(row.get("memory_ratio"), ".3f"),
            )
        console.print(table)
    if results.get("data"):
        table = Table(title=f"data: {results['data_name']} training split (batches on the device)")
        for col in ("path", "images/s", "rounds min-max", "setup s"):
            table.add_column(col, justify="left" if col == "path" else "right")
        for row in results["data"]:
            table.add_row(
                row["path"],
                f"{row['images_per_s']:.1f}",
                f"{row['min']:.1f}-{row['max']:.1f}",
                fmt(row["setup_s"], ".1f"),
            )
        console.print(table)
    for kind, rows in (results.get("variants") or {}).items():
        table = Table(
            title=f"precision and torch.compile: the raw loop's {titles[kind].split(':')[0]}",
            caption="speed-up = the first row's time ÷ the row's, median of the per-round "
            "ratios [95% CI] (> 1: faster)",
        )
        for col in ("variant", "ms/batch", "images/s", "speed-up", "95% CI"):
            table.add_column(col, justify="left" if col == "variant" else "right")
        for row in rows:
            table.add_row(
                row["peer"], f"{row['ms_per_batch']:.1f}", f"{row['images_per_s']:.2f}",
                f"{row['speedup']:.3f}", "{:.3f}-{:.3f}".format(*row["speedup_ci"]),
            )  # fmt: skip
        console.print(table)
    if results.get("profile"):
        print_profile(results["profile"], console=console)
    for note in results.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


def print_loss_report(rows: list[dict], shape: str, console: Any = None) -> None:
    """The table of bench_losses' rows; `shape` describes the logits and the rounds."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"losses: forward + backward, float32 logits {shape}")
    for col in ("loss", "S", "ms", "min-max", "ms / Mpixel"):
        table.add_column(col, justify="left" if col == "loss" else "right")
    for row in rows:
        table.add_row(
            row["loss"], str(row["size"]), f"{row['ms']:.1f}",
            f"{row['min']:.1f}-{row['max']:.1f}", f"{row['ms_per_mpixel']:.1f}",
        )  # fmt: skip
    (console or Console(width=140)).print(table)


def print_profile(profiles: dict[str, dict], top: int = 15, console: Any = None) -> None:
    """The tables of `bench --profile` (profiling.StepProfile.summary per peer, seglight's first),
    in ms per step: the step split into operators and what is outside them, the operators that
    differ most between seglight and the first peer, the top operators by self time, and each
    peer's phases (Lightning's hooks and actions; a plain loop's zero_grad ... scheduler.step)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(Console().width, 140))
    names = list(profiles)
    ops = {name: {r["name"]: r for r in p["ops"]} for name, p in profiles.items()}
    first, second = names[0], names[1] if len(names) > 1 else None

    def ms(name: str, op: str) -> float:
        row = ops[name].get(op)
        return row["self_ms"] if row else 0.0

    def cell(name: str, op: str) -> str:
        row = ops[name].get(op)
        return "-" if row is None else f"{row['self_ms']:.2f} ({row['calls']:g})"

    diff_head = [f"{first.split()[0]} - {second.split(' (')[0]}"] if second else []
    table = Table(title="profile: where each peer's training step goes, ms per step (self time; "
                  "(calls per step)); one profiled pass after the timed rounds")  # fmt: skip
    for col in ("", *names, *diff_head):
        table.add_column(col, justify="left" if not col else "right")
    summary_rows = [
        ("step (wall clock, profiler on)", "step_ms", ".2f"),
        ("  in operators", None, ".2f"),
        ("  outside operators (Python: loop, hooks, profiler)", "outside_ms", ".2f"),
        ("step, CPU time of the process", "cpu_ms", ".2f"),
        ("page faults per step", "faults", ".0f"),
    ]
    for label, key, spec in summary_rows:
        values = [p[key] if key else p["step_ms"] - p["outside_ms"] for p in profiles.values()]
        extra = [format(values[0] - values[1], "+" + spec)] if second else []
        table.add_row(label, *(format(v, spec) for v in values), *extra)
    if second:
        table.add_section()
        every = set(ops[first]) | set(ops[second])
        apart = sorted(every, key=lambda op: -abs(ms(first, op) - ms(second, op)))[:top]
        for op in apart:
            table.add_row(
                op[:70], *(cell(n, op) for n in names), f"{ms(first, op) - ms(second, op):+.2f}"
            )
        table.caption = f"below the line: the {top} operators whose time differs most"
    console.print(table)

    table = Table(title=f"profile: the top {top} operators by self time, ms per step (calls)")
    for col in ("operator", *names):
        table.add_column(col, justify="left" if col == "operator" else "right")
    heaviest: list[str] = []
    for name in names:
        heaviest += [r["name"] for r in profiles[name]["ops"][:top] if r["name"] not in heaviest]
    for op in sorted(heaviest, key=lambda op: -max(ms(n, op) for n in names))[:top]:
        table.add_row(op[:70], *(cell(n, op) for n in names))
    console.print(table)

    for name, p in profiles.items():
        table = Table(title=f"profile: {name}'s phases and hooks, ms per step")
        for col in ("phase", "total", "self (outside operators)", "calls"):
            table.add_column(col, justify="left" if col == "phase" else "right")
        for row in p["phases"][:top]:
            table.add_row(
                row["name"][:80], f"{row['ms']:.2f}", f"{row['self_ms']:.2f}", f"{row['calls']:g}"
            )
        console.print(table)
