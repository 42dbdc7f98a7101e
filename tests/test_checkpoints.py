"""Checkpoints are loaded with weights_only=True everywhere (--ckpt_path best, export --ckpt,
Lightning's own loading in fit/validate/test/predict): a crafted pickle is refused without
running, and a truncated, corrupt or mismatched file is a one-line error naming it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli

from seglight.checkpoints import check_state_dict, load_checkpoint
from seglight.cli import run as cli_run
from seglight.commands.export import load_checkpoint as export_load
from seglight.commands.train import find_checkpoint
from seglight.errors import CheckpointError, ConfigError
from seglight.models import UNet


class _Payload:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tiny_unet() -> UNet:
    return UNet(num_classes=3, encoder="resnet18", base_channels=8)


def _seglight_checkpoint(path: Path, model: UNet, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": {**model.hparams, "_class_path": "seglight.models.UNet"},
            **extra,
        },
        path,
    )
    return path


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    """(a checkpoint whose pickle would run code, the file that code would create)."""
    marker = tmp_path / "code_ran"
    path = _seglight_checkpoint(
        tmp_path / "runs" / "unet" / "version_0" / "checkpoints" / "last.ckpt",
        _tiny_unet(),
        callbacks={"ModelCheckpoint{}": {"best_model_path": _Payload(marker)}},
    )
    return path, marker


def test_crafted_checkpoint_is_refused_and_never_runs(crafted):
    path, marker = crafted
    with pytest.raises(CheckpointError, match=r"holds Python objects .* posix\.system") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="holds Python objects"):
        find_checkpoint(path.parents[2], "best")  # `--ckpt_path best` reads the newest last.ckpt
    with pytest.raises(ConfigError, match="holds Python objects"):
        export_load(path)
    assert not marker.exists()


def test_cli_refuses_a_crafted_checkpoint_in_one_line(crafted, tmp_path, monkeypatch):
    path, marker = crafted
    args = ["validate", "--config", str(REPO / "experiments" / "unet.yaml")]
    proc = run_cli([*args, "--ckpt_path", str(path)], cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds Python objects" in proc.stderr and "Traceback" not in proc.stderr
    monkeypatch.chdir(tmp_path)  # in-process from here: runs/unet/ is the crafted run
    with pytest.raises(CheckpointError, match="holds Python objects"):
        cli_run([*args, "--ckpt_path", "best"])
    with pytest.raises(ConfigError, match="--weights_only false"):
        cli_run([*args, "--ckpt_path", str(path), "--weights_only", "false"])
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_a_dict"])
def test_unreadable_checkpoint_is_one_line_naming_the_file(tmp_path, damage):
    good = _seglight_checkpoint(tmp_path / "good.ckpt", _tiny_unet())
    path = tmp_path / f"{damage}.ckpt"
    if damage == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    else:
        torch.save([1, 2, 3], path)
    for load in (load_checkpoint, export_load):
        with pytest.raises(ConfigError) as e:
            load(path)
        message = str(e.value)
        assert str(path) in message and "\n" not in message
        assert "PytorchStreamReader" not in message


def test_export_of_a_mismatched_checkpoint_says_what_differs(tmp_path):
    trained = UNet(num_classes=3, encoder="resnet18", base_channels=8, norm=False)
    path = _seglight_checkpoint(tmp_path / "a.ckpt", trained)
    torch.save(
        {**torch.load(path), "hyper_parameters": {**_tiny_unet().hparams}}, path
    )  # norm: true
    with pytest.raises(CheckpointError, match=r"does not fit UNet .* missing") as e:
        export_load(path, model="UNet")
    assert "Error(s) in loading state_dict" not in str(e.value)
    model = _tiny_unet()
    state = {k: v[:1] if k.endswith("bias") else v for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="of another shape"):
        check_state_dict(model, state, "x.ckpt")
    check_state_dict(model, model.state_dict(), "x.ckpt")  # a matching one passes


def test_a_real_checkpoint_loads_and_exports(tmp_path):
    torch.manual_seed(0)
    model = _tiny_unet()
    path = _seglight_checkpoint(tmp_path / "ok.ckpt", model, epoch=3, loops={"a": [1, 2.0]})
    assert load_checkpoint(path)["epoch"] == 3
    loaded = export_load(path)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_lightning_loading_of_a_mismatched_checkpoint_is_one_line():
    """What fit/validate/test --ckpt_path run (SegmentationModel.on_load_checkpoint), before
    Lightning's strict load_state_dict would fail with a list of keys."""
    trained = UNet(num_classes=3, encoder="resnet18", base_channels=8, norm=False)
    checkpoint = {"state_dict": trained.state_dict(), "hyper_parameters": {"num_classes": 3}}
    with pytest.raises(CheckpointError, match=r"does not fit UNet .* missing \(net\.") as e:
        _tiny_unet().on_load_checkpoint(checkpoint)
    assert "\n" not in str(e.value)
    trained.on_load_checkpoint(checkpoint)  # its own checkpoint fits


def test_trainer_outside_the_cli_reads_checkpoints_safely(crafted, tmp_path):
    """`Trainer.validate(model, ckpt_path=...)` from a notebook goes through the checkpoint IO
    that every SegmentationModel installs: weights_only=True and a one-line error, whatever the
    caller's torch default."""
    import lightning as L

    from seglight.data import Synthetic

    path, marker = crafted
    model = UNet(num_classes=5, encoder="resnet18", base_channels=8)
    data = Synthetic(num_train=2, num_val=2, image_size=(32, 32), batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    with pytest.raises(CheckpointError, match="holds Python objects"):
        trainer.validate(model, data, ckpt_path=path, weights_only=False)
    assert not marker.exists()
