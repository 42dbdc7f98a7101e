"""W&B without an account (offline, announced), WANDB_MODE=disabled, and atomic checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import make_fake_camvid, run_cli
from test_cli import tiny

from seglight.loggers import WandbLogger, has_wandb_credentials
from seglight.utils import git_revision


def test_offline_without_credentials_logs_config_git_and_masks(tmp_path):
    root = make_fake_camvid(tmp_path / "camvid", {"train": 2, "val": 2, "test": 1})
    env = {
        "WANDB_MODE": "",
        "WANDB_API_KEY": "",
        "HOME": str(tmp_path / "home"),
        "NETRC": str(tmp_path / "none"),
    }
    proc = run_cli(["fit", *tiny(root, "--trainer.max_epochs", "1")], cwd=tmp_path, env=env)
    assert (
        "W&B: no credentials" in proc.stdout + proc.stderr
        and "logging offline" in proc.stdout + proc.stderr
    )
    runs = list((tmp_path / "runs" / "unet" / "version_0" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "the offline run lives in the run directory"
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (
        b"model.encoder",
        b"data.crop_size",
        b"trainer.max_epochs",
        b"val/mIoU",
        b"val/IoU/Road",
    ):
        assert key in record, key
    if git_revision():  # a git checkout (CI's clean clone is one): the revision is logged
        assert b"git.commit" in record and git_revision()["commit"].encode() in record
    masks = list(runs[0].glob("files/media/images/mask/val/predictions_*.mask.png"))
    assert len(masks) >= 4  # prediction + ground truth for each of the 2 val images
    assert b"Bicyclist" in record  # the masks' class labels


def test_disabled_mode_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = WandbLogger(save_dir=str(tmp_path))
    logger.log_hyperparams({"a": 1})
    logger.log_metrics({"m": 1.0})
    assert not list(tmp_path.iterdir())


def test_credentials_detection(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not has_wandb_credentials()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / "netrc").chmod(0o600)
    assert has_wandb_credentials()
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert has_wandb_credentials()


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)


def test_a_failed_checkpoint_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu"
    )
    trainer.strategy.connect(_Tiny())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    good = path.read_bytes()

    import lightning.fabric.utilities.cloud_io as cloud_io

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(len(good) // 2)  # half the bytes are out when the "crash" comes
        raise OSError("disk full")

    monkeypatch.setattr(cloud_io.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
