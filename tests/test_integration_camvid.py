"""A few real train/val batches on the CamVid copy beside the repository (skipped when absent):
the README's main command, as a user runs it."""

from __future__ import annotations

import json

import pytest
from conftest import CAMVID, REPO, run_cli

pytestmark = pytest.mark.skipif(
    not (CAMVID / "trainannot").is_dir(), reason=f"no CamVid at {CAMVID}"
)


def test_unet_yaml_on_real_camvid(tmp_path):
    proc = run_cli(
        ["fit", "--config", str(REPO / "experiments" / "unet.yaml"), "--data.root", str(CAMVID),
         "--data.batch_size", "2", "--data.num_workers", "2", "--trainer.max_epochs", "1",
         "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
         "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path,
    )  # fmt: skip
    run = tmp_path / "runs" / "unet" / "version_0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["params"] > 24e6  # resnet34 U-Net
    assert 0.0 <= metrics["val"]["mIoU"] <= 1.0 and "IoU/Bicyclist" in metrics["val"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert "error" not in proc.stderr.lower()
