"""DDP on 2 CPU processes from the CLI; its validation must count every sample exactly once, so
its val metrics equal a single-process validation of the same weights."""

from __future__ import annotations

import json

import pytest
from conftest import make_fake_camvid, run_cli
from test_cli import tiny


def test_ddp_fit_and_validation_match_single_process(tmp_path):
    # 5 val images on 2 ranks: Lightning's default sampler would pad to 6, counting one twice
    root = make_fake_camvid(tmp_path / "camvid", {"train": 4, "val": 5, "test": 1})
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    run_cli(
        ["fit", *tiny(root,
            "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--trainer.max_epochs", "1", "--data.val_batch_size", "1",
            "--trainer.default_root_dir", str(ddp_dir))],
        cwd=tmp_path,
    )  # fmt: skip
    ddp = json.loads((ddp_dir / "metrics.json").read_text())["val"]
    ckpt = str(ddp_dir / "checkpoints" / "last.ckpt")
    for devices, out in (("1", single_dir), ("2", ddp_dir)):
        run_cli(
            ["validate", *tiny(root,
                "--ckpt_path", ckpt, "--trainer.devices", devices, "--data.val_batch_size", "1",
                "--trainer.strategy", "ddp" if devices == "2" else "auto",
                "--trainer.default_root_dir", str(out))],
            cwd=tmp_path,
        )  # fmt: skip
    (single,) = json.loads((single_dir / "metrics.json").read_text())["evaluations"]
    (ddp_validate,) = json.loads((ddp_dir / "metrics.json").read_text())["evaluations"]
    # the same weights on 2 ranks: every metric, val/loss included (the mean over every sample
    # of both ranks, not rank 0's share), equals one process's
    assert_same_metrics(ddp_validate["metrics"], single["metrics"], loss=True)
    # fit's validation counted each sample once too (its loss is not compared: each rank
    # validates with its own BatchNorm running statistics, which DDP does not synchronise)
    assert_same_metrics(ddp, single["metrics"], loss=False)


def assert_same_metrics(ddp: dict, single: dict, loss: bool) -> None:
    """mIoU, accuracies, per-class IoU (and val/loss) equal one process's."""
    keys = ["mIoU", "acc", "mAcc", *(k for k in single if k.startswith("IoU/"))]
    for key in keys + ["loss"] * loss:
        if single[key] is None:
            assert ddp[key] is None, key
        else:
            assert ddp[key] == pytest.approx(single[key], abs=1e-6), key


def test_sync_batchnorm_on_cpu_is_a_clear_error(tmp_path):
    root = make_fake_camvid(tmp_path / "camvid", {"train": 2, "val": 1, "test": 1})
    proc = run_cli(
        [
            "fit",
            *tiny(
                root,
                "--trainer.strategy",
                "ddp",
                "--trainer.devices",
                "2",
                "--trainer.sync_batchnorm",
                "true",
            ),
        ],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "trainer.sync_batchnorm: true needs CUDA GPUs" in proc.stderr
