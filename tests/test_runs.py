"""A run's records and checkpoints can be trusted: evaluations never rewrite the training
record or config, last.ckpt always holds the latest state and is found where the run was
written, checkpoints survive a kill during the write, a NaN loss stops training without a
checkpoint of the diverged model, and the training order and augmentation do not depend on the
loader's workers or the global random state (exact resume)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_fake_camvid, run_cli
from test_resume import KILLERS, callbacks_config, enet, killer

from seglight.callbacks import AtomicCheckpointIO, ModelCheckpoint
from seglight.commands.compare import Run, table_rows
from seglight.data import CamVid
from seglight.data.base import ResumableSampler, SeededSamples
from seglight.errors import DivergenceError
from seglight.models import ENet

TRAINING_RECORD = ("val", "best_val", "history", "epoch", "step")


def tiny_camvid(root: Path, **options) -> CamVid:
    options = {"batch_size": 2, "num_workers": 0, "crop_size": (16, 16), **options}
    return CamVid(root=str(make_fake_camvid(root, {"train": 4, "val": 2, "test": 1})), **options)


def trainer(tmp_path: Path, **options) -> L.Trainer:
    options = {
        "accelerator": "cpu", "max_epochs": 3, "logger": False, "enable_progress_bar": False,
        "enable_model_summary": False, "default_root_dir": str(tmp_path), **options,
    }  # fmt: skip
    return L.Trainer(**options)


# ----------------------------------------------------------------------------- evaluations
def test_evaluations_are_recorded_beside_the_training_record_and_compare_reads_them(tmp_path):
    root = make_fake_camvid(tmp_path / "camvid", {"train": 4, "val": 2, "test": 2})
    run = tmp_path / "elsewhere" / "my_run"  # not runs/<experiment>/version_N
    run_cli(["fit", *enet(root, run, "--trainer.max_epochs", "1")], cwd=tmp_path)
    config = (run / "config.yaml").read_bytes()
    record = {k: json.loads((run / "metrics.json").read_text())[k] for k in TRAINING_RECORD}

    # `--ckpt_path last` looks in --trainer.default_root_dir (there is no runs/ here at all)
    proc = run_cli(
        ["validate", *enet(root, run, "--ckpt_path", "last", "--model.inference.flip", "true")],
        cwd=tmp_path,
    )
    assert f"resolved to {run}/checkpoints/last.ckpt" in proc.stderr
    best = next(p for p in (run / "checkpoints").iterdir() if p.name.startswith("epoch"))
    run_cli(["test", *enet(root, run, "--ckpt_path", str(best))], cwd=tmp_path)
    run_cli(["predict", *enet(root, run, "--ckpt_path", str(best))], cwd=tmp_path)

    assert (run / "config.yaml").read_bytes() == config  # fit's config, untouched
    metrics = json.loads((run / "metrics.json").read_text())
    assert {k: metrics[k] for k in TRAINING_RECORD} == record  # fit's record, untouched
    assert "test" not in metrics
    validate, test, predict = metrics["evaluations"]
    assert [e["stage"] for e in metrics["evaluations"]] == ["validate", "test", "predict"]
    assert validate["checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    assert validate["inference"]["flip"] is True and test["inference"]["flip"] is False
    assert test["checkpoint"] == str(best) and test["checkpoint_epoch"] == 0
    assert 0 <= test["metrics"]["mIoU"] <= 1 and "IoU/Road" in test["metrics"]
    assert "metrics" not in predict and predict["config"] == "config_predict_1.yaml"
    assert validate["config"] == "config_validate_1.yaml" and test["config"] == "config_test_1.yaml"
    assert "flip: true" in (run / "config_validate_1.yaml").read_text()

    # compare: settings from fit's config, best_val from fit, test from the newest test
    compared = Run.load(run)
    assert compared.config["trainer.max_epochs"] == 1
    assert compared.scores("best_val") == record["best_val"]
    assert compared.scores("test") == test["metrics"]
    columns, rows = table_rows([compared], source="test")
    assert rows[0][columns.index("test checkpoint")] == best.name


# ----------------------------------------------------------------------------- last.ckpt
def test_last_checkpoint_is_rewritten_even_when_the_monitored_metric_does_not_improve(tmp_path):
    # "step" never decreases: with mode "min" only the first save is an improvement, after which
    # Lightning 2.6's save_last (which follows top-k saves) would leave last.ckpt at epoch 0
    dm = tiny_camvid(tmp_path / "camvid")
    model = ENet(num_classes=dm.num_classes, class_names=list(dm.class_names))
    checkpoint = ModelCheckpoint(monitor="step", mode="min", save_last=True)
    fit = trainer(tmp_path, callbacks=[checkpoint])
    fit.fit(model, dm)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == fit.global_step == 6
    assert checkpoint.best_model_path.endswith("epoch=0-step=2.ckpt")
    # last.ckpt was a link to it after epoch 0: rewriting last.ckpt left the best one whole
    best = torch.load(checkpoint.best_model_path, weights_only=True)
    assert best["epoch"] == 0 and best["global_step"] == 2
    assert not os.path.samefile(checkpoint.best_model_path, tmp_path / "checkpoints" / "last.ckpt")


def test_last_checkpoint_is_no_second_copy_of_the_best_one(tmp_path):
    # "step" always improves with mode "max": each validation's top-k checkpoint is the last state
    dm = tiny_camvid(tmp_path / "camvid")
    model = ENet(num_classes=dm.num_classes, class_names=list(dm.class_names))
    checkpoint = ModelCheckpoint(monitor="step", mode="max", save_last=True)
    trainer(tmp_path, max_epochs=2, callbacks=[checkpoint]).fit(model, dm)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=1-step=4.ckpt", "last.ckpt"]
    assert os.path.samefile(folder / "last.ckpt", checkpoint.best_model_path)  # one file
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4 and last["optimizer_states"]  # a full, resumable state
    resumed = ENet(num_classes=dm.num_classes, class_names=list(dm.class_names))
    again = trainer(tmp_path / "b", max_epochs=3, callbacks=[ModelCheckpoint(save_last=True)])
    again.fit(resumed, dm, ckpt_path=str(folder / "last.ckpt"))
    assert again.global_step == 6


# ----------------------------------------------------------------------------- the best checkpoint
def test_auto_monitor_is_the_models_own_metric_and_names_the_files(tmp_path):
    from seglight.data import Synthetic
    from seglight.models import UNet

    dm = Synthetic(num_train=4, num_val=2, num_test=1, image_size=(32, 32), batch_size=2)
    model = UNet(num_classes=dm.num_classes, encoder="original", base_channels=4)
    checkpoint = ModelCheckpoint(monitor="auto", save_last=True)
    assert checkpoint.mode == "max"
    trainer(tmp_path, max_epochs=1, callbacks=[checkpoint]).fit(model, dm)
    assert (checkpoint.monitor, checkpoint.mode) == ("val/mIoU", "max")
    assert Path(checkpoint.best_model_path).name.startswith("epoch000-miou")
    best = json.loads((tmp_path / "metrics.json").read_text())["best_val"]
    assert best["monitor"] == "val/mIoU" and best["epoch"] == 0 and best["step"] == 2
    # an explicit metric keeps Lightning's defaults (mode "min", epoch=N-step=M files)
    explicit = ModelCheckpoint(monitor="val/loss")
    assert (explicit.monitor, explicit.mode, explicit.filename) == ("val/loss", "min", None)


def test_best_val_follows_the_choosing_metric_and_its_mode():
    from seglight.callbacks.records import _better

    best = {"mask_mAP": 0.5, "mIoU": 0.9, "monitor": "val/mask_mAP"}
    assert _better({"mask_mAP": 0.6, "mIoU": 0.1}, best, "val/mask_mAP", "max")
    assert not _better({"mask_mAP": 0.5, "mIoU": 0.95}, best, "val/mask_mAP", "max")  # a tie
    assert not _better({"mask_mAP": None}, best, "val/mask_mAP", "max")
    assert _better({"loss": 0.2}, {"loss": 0.3, "monitor": "val/loss"}, "val/loss", "min")
    # a best_val of another metric (or written before best_val named one: val/mIoU) is replaced
    assert _better({"mask_mAP": 0.1}, {"mIoU": 0.9}, "val/mask_mAP", "max")
    assert not _better({"mIoU": 0.8}, {"mIoU": 0.9}, "val/mIoU", "max")


# ----------------------------------------------------------------------------- NaN / Inf
def test_a_non_finite_loss_stops_training_before_any_checkpoint(tmp_path):
    dm = tiny_camvid(tmp_path / "camvid")
    model = ENet(
        num_classes=dm.num_classes, class_names=list(dm.class_names), optimizer="sgd", lr=1e8
    )
    fit = trainer(tmp_path, callbacks=[ModelCheckpoint(monitor="val/mIoU", save_last=True)])
    with pytest.raises(
        DivergenceError, match=r"NaN or infinite at training step \d+ .* no checkpoint"
    ):
        fit.fit(model, dm)
    assert not list((tmp_path / "checkpoints").glob("*.ckpt"))


# ----------------------------------------------------------------------------- atomic writes
def test_a_kill_while_last_ckpt_is_written_leaves_the_previous_one_whole(tmp_path):
    """The process is killed by the kernel (SIGXFSZ) 64 kB into the writing of last.ckpt at the
    end of epoch 1: last.ckpt is still epoch 0's, whole; $TMPDIR holds nothing."""
    (tmp_path / "killers.py").write_text(KILLERS)
    root = make_fake_camvid(tmp_path / "camvid", {"train": 4, "val": 1, "test": 1})
    run, tmpdir = tmp_path / "run", tmp_path / "tmpdir"
    tmpdir.mkdir()
    # monitor "step", mode "min": epoch 1 is no improvement, so the only write at its end is
    # last.ckpt's (seglight's ModelCheckpoint rewrites it anyway)
    kill = killer("KillDuringSave", step=3, max_bytes=65536)
    config = callbacks_config(tmp_path / "kill.yaml", extra=kill, monitor="step", mode="min")
    proc = run_cli(
        ["fit", *enet(root, run, "--trainer.max_epochs", "2"), "--config", str(config)],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{os.environ.get('PYTHONPATH', '')}{os.pathsep}{tmp_path}",
             "TMPDIR": str(tmpdir)},
        check=False,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr[-3000:]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and last["global_step"] == 2
    assert not [p for p in tmpdir.rglob("*") if p.is_file()]  # (W&B leaves empty folders)
    (stale,) = (run / "checkpoints").glob(".last.ckpt.*.tmp")  # the killed write's own file
    # the next write of last.ckpt (rank zero's) replaces it and removes the leftover
    AtomicCheckpointIO().save_checkpoint({"x": torch.ones(2)}, run / "checkpoints" / "last.ckpt")
    assert not stale.exists()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["x"].sum() == 2


# ----------------------------------------------------------------------------- exact resume
def test_training_order_and_augmentation_depend_only_on_seed_epoch_and_position(tmp_path):
    dm = tiny_camvid(tmp_path / "camvid", scale_range=(0.5, 2.0))
    dm.setup("fit")
    dataset = SeededSamples(dm.datasets["train"])

    def epoch(sampler: ResumableSampler) -> list[tuple[str, torch.Tensor]]:
        return [(s["name"], s["image"]) for s in map(dataset.__getitem__, sampler)]

    first = epoch(ResumableSampler(dm.datasets["train"], seed=7, epoch=1))
    torch.manual_seed(123)  # the global random state plays no part
    again = epoch(ResumableSampler(dm.datasets["train"], seed=7, epoch=1))
    assert [n for n, _ in first] == [n for n, _ in again]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, again, strict=True))
    # resuming after 2 samples gives exactly the rest
    resumed = ResumableSampler(dm.datasets["train"], seed=7, epoch=1)
    resumed.skip = 2
    rest = epoch(resumed)
    assert [n for n, _ in rest] == [n for n, _ in first[2:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first[2:], rest, strict=True))
    # another epoch: another order or other augmentations
    other = epoch(ResumableSampler(dm.datasets["train"], seed=7, epoch=2))
    assert any(not torch.equal(a, b) for (_, a), (_, b) in zip(first, other, strict=True))
    # two ranks: disjoint shares of the same permutation, each sample keeps its seed
    shares = [ResumableSampler(dm.datasets["train"], 7, 2, r, epoch=1) for r in (0, 1)]
    single = list(ResumableSampler(dm.datasets["train"], seed=7, epoch=1))
    assert sorted(i for s in shares for i in s) == sorted(single)


def test_mid_epoch_resume_in_process_is_exact(tmp_path):
    """Lightning's mid-epoch resume (from a checkpoint saved after step 5 of 3 epochs of 2 steps)
    ends with the weights of the uninterrupted run, dropout and augmentation included."""
    dm = tiny_camvid(tmp_path / "camvid", num_workers=0)

    def run(name: str, max_steps: int = -1, ckpt: Path | None = None) -> dict:
        L.seed_everything(0)
        model = ENet(
            num_classes=dm.num_classes, class_names=list(dm.class_names), scheduler="constant"
        )
        every = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=1, save_last=True)
        fit = trainer(
            tmp_path / name, callbacks=[every], max_steps=max_steps, num_sanity_val_steps=0
        )
        fit.fit(model, dm, ckpt_path=ckpt)
        return {k: v.clone() for k, v in model.state_dict().items()}

    straight = run("straight")
    run("stopped", max_steps=3)  # stops in the middle of epoch 1 (2 steps per epoch)
    assert torch.load(tmp_path / "stopped" / "last.ckpt", weights_only=True)["global_step"] == 3
    resumed = run("resumed", ckpt=tmp_path / "stopped" / "last.ckpt")
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
