"""Every experiments/*.yaml parses and runs one fast_dev_run batch on tiny data (through the same
CLI entry point as `python -m seglight`, in-process). A new experiment file is covered without
editing this test."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_fake_camvid

from seglight.cli import run

EXPERIMENTS = sorted(p for p in (REPO / "experiments").glob("*.yaml") if p.name != "defaults.yaml")


@pytest.fixture(scope="module")
def tiny_camvid(tmp_path_factory) -> Path:
    return make_fake_camvid(
        tmp_path_factory.mktemp("data") / "camvid", {"train": 2, "val": 2, "test": 2}, size=(72, 96)
    )


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_runs_one_batch(path, tiny_camvid, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(path.read_text())
    data = config["data"]["class_path"] if isinstance(config["data"], dict) else config["data"]
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
    if data.endswith("CamVid"):
        args += ["--data.root", str(tiny_camvid), "--data.crop_size", "[64, 64]"]
    if data.endswith("Synthetic"):
        args += ["--data.num_train", "4", "--data.num_val", "2"]
    cli = run(args)
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
