"""Run a grid of configurations, one training run each: `python -m seglight sweep`.

    python -m seglight sweep --config experiments/unet.yaml \\
        --grid model.init_args.encoder=[resnet18,resnet34] \\
        --grid data.init_args.crop_size=[[256,256],[360,480]] \\
        --group encoders [--dry-run] [--out results/encoders] [any fit option ...]

Each point of the grid (the product of the `--grid KEY=[V1,V2,...]` lists, values in YAML) is
one `fit` with `--KEY VALUE` added to the other arguments, run one after the other, each in its
own run directory runs/<experiment>/version_N. A run directory gets `sweep.json` ({"group",
"name", "overrides", "status"}), so `seglight compare` labels it by its readable name
("encoder=resnet18,crop_size=256x256"). For W&B, all runs of a sweep share one group (`--group`,
default `<experiment>-<date>-<time>`), are named by their overrides, and are tagged `sweep` and
by each override; these reach wandb.init through its environment variables (WANDB_RUN_GROUP,
WANDB_NAME, WANDB_TAGS, WANDB_JOB_TYPE), so they need no change to the config, and a `group:`
written in the config's logger options wins over them. At the end the runs are compared as by
`seglight compare` (`--out DIR` also writes its table and plots).

Each run is a subprocess (`python -m seglight fit ...`): a run that fails or runs out of memory
does not take the sweep down, nothing (CUDA memory, W&B's run, global seeds) leaks from one run
to the next, and Lightning's DDP launcher, which starts its workers by re-running the
command line, works. `run_sweep(..., in_process=True)` runs them in this process instead
(through `seglight.commands.train.run`, the same code the CLI runs), which saves the start-up of a Python
process per run: what the notebooks use.

`--wandb-sweep sweep.yaml` writes the equivalent W&B sweep (method: grid) instead of running:
`wandb sweep sweep.yaml`, then `wandb agent <id>` on each machine.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seglight.errors import ConfigError, SeglightError

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
CAMVID_ENV = "SEGLIGHT_CAMVID"


# ----------------------------------------------------------------------------- the grid
def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """["model.encoder=[resnet18,resnet34]", ...] -> {"model.encoder": ["resnet18", "resnet34"]}.

    Values are YAML: a list gives the values, anything else a single value."""
    axes: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key or not text.strip():
            raise ConfigError(
                f"--grid {item!r}: expected KEY=[VALUE,...], e.g. model.lr=[0.1,0.01]"
            )
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--grid {item!r}: the values are not valid YAML ({e})") from e
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ConfigError(f"--grid {item!r}: no values")
        if key in axes:
            raise ConfigError(f"--grid {key} is given twice")
        axes[key] = values
    return axes


def grid(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, the first key varying slowest: [{key: value, ...}, ...]."""
    keys = list(axes)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes.values())]


def cli_value(value: Any) -> str:
    """A value as the CLI (jsonargparse, YAML) reads it back: strings as they are, the rest in
    YAML flow style ([256, 256], {ce: 1.0, dice: 0.5}, null, true)."""
    if isinstance(value, str):
        return value
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
    return text.strip().removesuffix("...").strip()  # a scalar's dump ends the document


def _short_value(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        return "x".join(str(v) for v in value)
    return cli_value(value)


def variant_name(overrides: dict[str, Any]) -> str:
    """{"model.init_args.encoder": "resnet18", "data.crop_size": [256, 256]} ->
    "encoder=resnet18,crop_size=256x256"."""
    from seglight.commands.compare import short_names

    short = short_names([k.replace(".init_args.", ".") for k in overrides])
    names = [short[k.replace(".init_args.", ".")] for k in overrides]
    return ",".join(
        f"{n}={_short_value(v)}" for n, v in zip(names, overrides.values(), strict=True)
    )


def variant_args(overrides: dict[str, Any]) -> list[str]:
    """{"model.lr": 0.1} -> ["--model.lr", "0.1"]."""
    return [a for key, value in overrides.items() for a in (f"--{key}", cli_value(value))]


# ----------------------------------------------------------------------------- running
@dataclass
class SweepRun:
    """One run of a sweep: its overrides, readable name, run directory and outcome."""

    overrides: dict[str, Any]
    name: str
    run_dir: Path | None = None
    status: str = "pending"  # pending | running | done | failed
    seconds: float = 0.0
    error: str = ""
    args: list[str] = field(default_factory=list)


def default_group(args: Sequence[str], experiment: str | None = None) -> str:
    return f"{_experiment(args, experiment)}-{time.strftime('%Y%m%d-%H%M%S')}"


def plan(args: Sequence[str], variants: Sequence[dict[str, Any]]) -> list[SweepRun]:
    """The runs of a sweep, not started: one per variant (a dict of overrides)."""
    if not variants:
        raise ConfigError("the sweep has no runs")
    names = [variant_name(v) or f"run{i}" for i, v in enumerate(variants)]
    if len(set(names)) < len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return [
        SweepRun(dict(v), name, args=["fit", *args, *variant_args(v)])
        for v, name in zip(variants, names, strict=True)
    ]


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _wandb_env(run: SweepRun, group: str, job_type: str | None) -> dict[str, str]:
    tags = [
        "sweep",
        *(f"{k.rsplit('.', 1)[-1]}={_short_value(v)}" for k, v in run.overrides.items()),
    ]
    env = {
        "WANDB_RUN_GROUP": group,
        "WANDB_NAME": run.name,
        "WANDB_TAGS": ",".join(t[:64].replace(",", ";") for t in tags),  # W&B's limit: 64
    }
    if job_type:
        env["WANDB_JOB_TYPE"] = job_type
    return env


def _reset_wandb() -> None:
    """End the W&B run of an in-process run (Lightning's logger leaves it open, and the next
    logger would attach to it) and W&B's session, which holds the environment variables it
    read when it started (the next run's group and name are new ones)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        if getattr(wandb, "run", None) is not None:
            wandb.finish()
        wandb.teardown()


def _experiment(args: Sequence[str], experiment: str | None) -> str:
    from seglight.config import experiment_name

    return experiment or experiment_name(list(args)) or "sweep"


def _run_one(
    run: SweepRun, group: str, job_type: str | None, in_process: bool, experiment: str
) -> None:
    from seglight.commands.train import new_run_dir
    from seglight.errors import SeglightError, find_cause

    base = Path("runs") / experiment
    run.run_dir = new_run_dir(base)
    args = [*run.args, "--trainer.default_root_dir", str(run.run_dir)]
    record = {"group": group, "name": run.name, "overrides": run.overrides}
    _write_record(run, record, "running")
    start = time.perf_counter()
    env = _wandb_env(run, group, job_type)
    print(f"seglight sweep: {run.name} -> {run.run_dir}", file=sys.stderr, flush=True)
    if in_process:
        from seglight.commands.train import run as cli_run

        _reset_wandb()
        try:
            with _environ(env):
                cli_run(args)
            run.status = "done"
        except (Exception, SystemExit) as e:  # noqa: BLE001 - recorded, the sweep goes on
            run.status = "failed"
            # bad input (ours, or an option the parser rejects): its message; else a traceback
            # a bad option: the parser's error (jsonargparse exits after it) or ours
            error = find_cause(e, (SeglightError, argparse.ArgumentError))
            run.error = str(error) if error else f"{type(e).__name__}: {e}"
            if error is None:
                traceback.print_exc()
            print(f"seglight sweep: {run.name} failed: {run.error}", file=sys.stderr)
        finally:
            _reset_wandb()
    else:
        proc = subprocess.run([sys.executable, "-m", "seglight", *args], env={**os.environ, **env})
        run.status = "done" if proc.returncode == 0 else "failed"
        run.error = "" if proc.returncode == 0 else f"exit status {proc.returncode}"
    run.seconds = time.perf_counter() - start
    _write_record(run, record, run.status)


def _write_record(run: SweepRun, record: dict[str, Any], status: str) -> None:
    from seglight.commands.compare import SWEEP_FILE
    from seglight.utils import atomic_write_json

    extra = {"error": run.error} if run.error else {}
    atomic_write_json(run.run_dir / SWEEP_FILE, {**record, "status": status, **extra})


def run_sweep(
    args: Sequence[str],
    variants: Sequence[dict[str, Any]],
    group: str | None = None,
    job_type: str | None = None,
    in_process: bool = False,
    keep_going: bool = True,
    experiment: str | None = None,
) -> list[SweepRun]:
    """Fit once per variant: `fit *args --KEY VALUE ...` (see the module docstring).

    Args:
        args: the fit arguments every run shares (`--config experiments/x.yaml`, options).
        variants: one dict of overrides per run, e.g. grid(parse_grid([...])) or a hand-made list.
        group: W&B group of the runs (default: <experiment>-<date>-<time>).
        job_type: W&B job type of the runs.
        in_process: run in this process (see the module docstring) instead of subprocesses.
        keep_going: go on after a failed run (else raise at the first failure).
        experiment: the runs go to runs/<experiment>/version_N (default: the last --config's
            name, as for fit).

    Returns the runs with their run directories and outcomes.
    """
    from seglight.utils import silence_known_noise

    silence_known_noise()  # before the in-process runs import timm (and tqdm.auto)
    args = list(args)
    group = group or default_group(args, experiment)
    runs = plan(args, variants)
    for run in runs:
        _run_one(run, group, job_type, in_process, _experiment(args, experiment))
        if run.status == "failed" and not keep_going:
            raise SeglightError(f"sweep run {run.name} ({run.run_dir}) failed: {run.error}")
    return runs


# ----------------------------------------------------------------------------- W&B sweeps
def wandb_sweep_config(
    args: Sequence[str], axes: dict[str, list[Any]], name: str | None = None
) -> dict[str, Any]:
    """The W&B sweep (method: grid) running the same runs through `wandb agent`: the agent
    calls `python -m seglight fit ARGS --KEY=VALUE ...` (W&B's ${args} macro, which writes
    lists and mappings in Python syntax, which the CLI reads as YAML; booleans as True/False)."""
    parameters = {
        key: {"values": ["null" if v is None else v for v in values]}  # W&B would write None
        for key, values in axes.items()
    }
    config: dict[str, Any] = {
        "program": "seglight",  # informational: the command below runs the module
        "method": "grid",
        "metric": {"name": "val/mIoU", "goal": "maximize"},
        "parameters": parameters,
        "command": ["${env}", "${interpreter}", "-m", "seglight", "fit", *args, "${args}"],
    }
    if name:
        config["name"] = name
    return config


# ----------------------------------------------------------------------------- notebooks
def experiment(name: str) -> str:
    """The path of experiments/<name>.yaml in this checkout."""
    path = EXPERIMENTS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if p.stem != "defaults")
        raise ConfigError(f"no experiment {name!r} in {EXPERIMENTS}; known: {', '.join(known)}")
    return str(path)


def smoke_args(image_size: int = 32, steps: int = 2) -> list[str]:
    """Options that make any experiment a seconds-long CPU check: the Synthetic shapes at
    `image_size` pixels (8 training, 4 validation images, batches of 4), `steps` training steps,
    one validation batch, no progress bar or model summary."""
    return [
        "--data", "Synthetic",
        "--data.num_train", "8", "--data.num_val", "4", "--data.num_test", "4",
        "--data.image_size", f"[{image_size}, {image_size}]",
        "--data.crop_size", "null", "--data.batch_size", "4", "--data.num_workers", "0",
        "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "1",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]  # fmt: skip


def camvid_root() -> str:
    """CamVid's folder: $SEGLIGHT_CAMVID, else ../shared/data/camvid beside this checkout."""
    root = Path(os.environ.get(CAMVID_ENV) or EXPERIMENTS.parents[1] / "shared" / "data" / "camvid")
    if not (root / "train").is_dir():
        raise ConfigError(
            f"CamVid not found at {root} (no train/ folder): set ${CAMVID_ENV} to its folder"
        )
    return str(root)


# ----------------------------------------------------------------------------- the command
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="seglight sweep",
        allow_abbrev=False,  # the other arguments go to fit whole
        description="Fit every combination of the --grid values, one run directory each; other "
        "arguments (--config, --trainer.max_epochs 10, ...) go to every fit.",
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=[V1,V2,...]",
        help="an option and its values in YAML, e.g. model.init_args.encoder=[resnet18,resnet34]",
    )
    parser.add_argument("--group", help="W&B group of the runs (default: <experiment>-<time>)")
    parser.add_argument(
        "--experiment",
        help="run directories runs/EXPERIMENT/version_N (default: the config's name)",
    )
    parser.add_argument("--job-type", help="W&B job type of the runs")
    parser.add_argument("--dry-run", action="store_true", help="print the runs, run nothing")
    parser.add_argument(
        "--wandb-sweep", metavar="FILE", help="write the equivalent W&B sweep config, run nothing"
    )
    parser.add_argument("--stop-on-error", action="store_true", help="stop at the first failure")
    parser.add_argument("--out", help="write the comparison's table and plots there at the end")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run in this process instead of one subprocess per run (faster start; no DDP)",
    )
    options, args = parser.parse_known_args(argv)
    if not options.grid:
        raise ConfigError("sweep: give at least one --grid KEY=[VALUE,...]")
    from seglight.config import check_class_names, config_paths

    if not config_paths(args):
        raise ConfigError("sweep: give the experiment with --config experiments/X.yaml")
    check_class_names(args)
    axes = parse_grid(options.grid)
    variants = grid(axes)
    group = options.group or default_group(args, options.experiment)
    if options.wandb_sweep:
        config = wandb_sweep_config(args, axes, options.group)
        Path(options.wandb_sweep).write_text(yaml.safe_dump(config, sort_keys=False))
        print(
            f"seglight sweep: wrote {options.wandb_sweep} ({len(variants)} runs); start it with "
            f"`wandb sweep {options.wandb_sweep}`, then `wandb agent <sweep id>`"
        )
        return
    if options.dry_run:
        _print_plan(plan(args, variants), group, _experiment(args, options.experiment))
        return
    runs = run_sweep(
        args,
        variants,
        group,
        options.job_type,
        options.in_process,
        keep_going=not options.stop_on_error,
        experiment=options.experiment,
    )
    _print_summary(runs, group, options.out)
    if any(r.status == "failed" for r in runs):
        sys.exit(1)


def _print_plan(runs: list[SweepRun], group: str, experiment: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep {group}: {len(runs)} runs (dry run)")
    table.add_column("#", justify="right")
    table.add_column("name")
    table.add_column("command")
    for i, run in enumerate(runs):
        where = f"runs/{experiment}/version_N"
        command = " ".join(["python -m seglight", *map(shlex.quote, run.args)])
        table.add_row(str(i), run.name, f"{command}  [dim]({where})[/dim]")
    Console(width=max(120, Console().width)).print(table)


def _print_summary(runs: list[SweepRun], group: str, out: str | None) -> None:
    from seglight.commands.compare import load_runs, report

    for run in runs:
        detail = f" ({run.error})" if run.error else ""
        print(f"  {run.status:6s} {run.seconds:7.1f}s  {run.run_dir}  {run.name}{detail}")
    done = [str(r.run_dir) for r in runs if r.run_dir is not None]
    if done:
        report(load_runs(done), out)
    print(f"seglight sweep: group {group}; compare again with `python -m seglight compare "
          f"{' '.join(done)}`")  # fmt: skip
