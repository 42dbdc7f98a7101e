"""The command line, `seglight COMMAND ...` (also `python -m seglight COMMAND ...`).

This module only dispatches: each command lives in seglight.commands and is imported when it is
run, so `seglight --help` and the light commands (`compare`, `models`) do not pay for what they do
not use (Lightning, the architectures, the datasets). Errors caused by the input are printed as
one short line, not a traceback (SEGLIGHT_DEBUG=1 shows it).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from seglight.errors import ConfigError, user_error

PROG = "seglight"

#: Lightning's subcommands (seglight.commands.train), with a line each for the help
TRAINING = {
    "fit": "train a model; each run gets runs/<experiment>/version_N (config, checkpoints, metrics)",
    "validate": "score a checkpoint on the validation split (per-class table)",
    "test": "score a checkpoint on the test split (per-class table)",
    "predict": "write predicted masks (and overlays) for a split or a folder of images",
}
#: seglight's own subcommands: name -> (module in seglight.commands, function, one line of help)
COMMANDS = {
    "models": ("listings", "cmd_models", "list the architectures: parameters, GFLOPs, papers"),
    "datasets": ("listings", "cmd_datasets", "list the datasets: classes, root, file layout"),
    "stats": ("stats", "main", "class frequencies, median-frequency weights, loader speed"),
    "compare": ("compare", "main", "compare run directories: table, per-class bars, curves"),
    "sweep": ("sweep", "main", "run a grid of option values, then compare the runs"),
    "export": ("export", "main", "export a model or checkpoint to ONNX or torch.export"),
    "bench": ("bench", "main", "time training and inference against the raw loop and peers"),
}


def help_text() -> str:
    """The top-level help: every command with one line."""
    from seglight import __version__

    width = max(map(len, [*TRAINING, *COMMANDS]))
    lines = [
        f"usage: {PROG} COMMAND [options]   (or: python -m seglight COMMAND [options])",
        "",
        f"seglight {__version__}: semantic segmentation research with PyTorch Lightning.",
        "",
        "training and evaluation (options: seglight COMMAND --help):",
        *(f"  {name:<{width}}  {line}" for name, line in TRAINING.items()),
        "",
        "tools (options: seglight COMMAND --help):",
        *(f"  {name:<{width}}  {line}" for name, (_, _, line) in COMMANDS.items()),
        "",
        f"example: {PROG} fit --config experiments/unet.yaml --data.root /path/to/camvid",
    ]
    return "\n".join(lines) + "\n"


def run(argv: list[str] | None = None) -> Any:
    """Run one command on `argv` (default: sys.argv[1:]); raises SeglightError on bad input.
    Returns the LightningCLI object for fit/validate/test/predict, else None."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(), end="")
        return None
    if argv[0] == "--version":
        from seglight import __version__

        print(f"{PROG} {__version__}")
        return None
    if argv[0] in COMMANDS:
        module, function, _ = COMMANDS[argv[0]]
        getattr(importlib.import_module(f"seglight.commands.{module}"), function)(argv[1:])
        return None
    if argv[0] not in TRAINING and not argv[0].startswith("-"):
        import difflib

        known = [*TRAINING, *COMMANDS]
        close = difflib.get_close_matches(argv[0], known, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(
            f"unknown command {argv[0]!r}.{hint} Commands: {', '.join(known)} ({PROG} --help)"
        )
    from seglight.commands.train import run as run_lightning

    return run_lightning(argv)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: errors caused by the input are printed without a traceback."""
    try:
        run(argv)
    except Exception as e:
        error = user_error(e)
        if error is None or os.environ.get("SEGLIGHT_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
