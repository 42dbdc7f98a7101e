"""Every experiments/*.yaml parses and runs one fast_dev_run batch on tiny data (through the same
CLI entry point as `python -m seglight`, in-process). A new experiment file is covered without
editing this test."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_fake_camvid

from seglight.cli import run

EXPERIMENTS = sorted(
    p for p in (REPO / "experiments").glob("**/*.yaml") if p.name != "defaults.yaml"
)


def data_class(path: Path) -> str:
    """The data class of an experiment: its own `data:`, else its folder's defaults.yaml's."""
    for source in (path, path.parent / "defaults.yaml"):
        config = yaml.safe_load(source.read_text()) if source.is_file() else None
        data = (config or {}).get("data")
        if data:
            return data["class_path"] if isinstance(data, dict) else data
    raise AssertionError(f"{path}: no data class")


@pytest.fixture(scope="module")
def tiny_camvid(tmp_path_factory) -> Path:
    return make_fake_camvid(
        tmp_path_factory.mktemp("data") / "camvid", {"train": 2, "val": 2, "test": 2}, size=(72, 96)
    )


@pytest.mark.parametrize(
    "path",
    EXPERIMENTS,
    ids=[p.relative_to(REPO / "experiments").with_suffix("").as_posix() for p in EXPERIMENTS],
)
def test_experiment_runs_one_batch(path, tiny_camvid, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = data_class(path)
    args = [
        "fit",
        "--config",
        str(path),
        "--trainer.fast_dev_run",
        "true",
        "--trainer.accelerator",
        "cpu",
    ]
    args += ["--data.num_workers", "0", "--data.batch_size", "2"]
    if data.endswith(("CamVid", "SemiSupervised")):  # the semi/ configs wrap CamVid
        args += ["--data.root", str(tiny_camvid), "--data.crop_size", "[64, 64]"]
    if data.endswith("Synthetic"):
        args += ["--data.num_train", "4", "--data.num_val", "2"]
    cli = run(args)
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
