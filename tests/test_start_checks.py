"""What stops a run at its start, in one line and before anything is written: data with one
class, semi-supervised settings that leave nothing unlabelled or name other images, instance
folders without instances, broken image files."""

from __future__ import annotations

from pathlib import Path

import pytest

import seglight.methods  # noqa: F401 - the methods register in MODELS
from seglight.cli import main
from seglight.errors import ConfigError
from seglight.models.base import MODELS

QUICK = ["--model", "UNet", "--model.encoder", "original", "--model.base_channels", "4",
         "--trainer.logger", "false", "--trainer.max_steps", "2", "--threads", "1",
         "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]  # fmt: skip


def cli_error(capsys, argv: list[str]) -> str:
    """The one-line error `seglight ARGV` stops with (exit status 2)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def assert_nothing_written(cwd: Path) -> None:
    runs = Path(cwd) / "runs"
    assert not runs.exists() or not any(runs.rglob("*")), sorted(runs.rglob("*"))


# ---------------------------------------------------------------------------- one-class data
def test_one_class_folder_stops_at_the_start_naming_the_fix(tmp_path, capsys):
    from test_resume_epoch_end import make_binary_folder

    root = make_binary_folder(tmp_path / "cells", n=6)
    (root / "classes.yaml").write_text("classes: [cell]\n")
    error = cli_error(capsys, ["fit", *QUICK, "--data", "Folder", "--data.root", str(root)])
    assert "classes.yaml" in error and "classes: [background, cell]" in error, error
    assert_nothing_written(Path.cwd())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_refuses_one_class(name):
    with pytest.raises(ConfigError, match=r"num_classes=1 \(\['cell'\]\).*\[background, cell\]"):
        MODELS[name](num_classes=1, class_names=["cell"])
