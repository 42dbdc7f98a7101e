"""Optimisation: the poly schedule with warm-up as the Trainer runs it, the encoder's learning-rate
multiplier, the exponential moving average of weights (its arithmetic, validation and test with
the averaged weights, checkpoints), SyncBN's clear error on the CPU, median-frequency weights."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from seglight.data import Synthetic
from seglight.ema import EMA
from seglight.errors import ConfigError
from seglight.models import UNet


def tiny_unet(**kwargs) -> UNet:
    torch.manual_seed(0)
    return UNet(num_classes=5, encoder="original", base_channels=2, **kwargs)


def tiny_data(**kwargs) -> Synthetic:
    options = dict(num_train=8, num_val=4, num_test=4, image_size=(16, 16), batch_size=2,
                   num_workers=0, color_jitter=0.0)  # fmt: skip
    return Synthetic(**{**options, **kwargs})


def trainer(tmp_path, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir=tmp_path)  # fmt: skip
    return L.Trainer(**{**options, **kwargs})


class RecordLR(L.Callback):
    def __init__(self):
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


# ------------------------------------------------------------------------------- schedule
def test_poly_lr_with_warmup_at_start_after_warmup_and_end(tmp_path):
    record = RecordLR()
    lr, warmup, total, power = 0.01, 4, 12, 0.9
    model = tiny_unet(lr=lr, warmup_steps=warmup, poly_power=power, scheduler="poly")
    trainer(tmp_path, max_epochs=3, callbacks=[record], limit_val_batches=0).fit(model, tiny_data())
    seen = [lrs[0] for lrs in record.lrs]
    assert len(seen) == total  # 4 steps per epoch
    assert seen[0] == pytest.approx(lr / warmup)  # step 0: first warm-up step
    assert seen[warmup - 1] == pytest.approx(lr)  # warm-up reached the peak
    assert seen[warmup] == pytest.approx(lr)  # poly starts from the peak
    for step in range(warmup, total):  # lr * (1 - t)^0.9 after warm-up
        t = (step - warmup) / (total - warmup)
        assert seen[step] == pytest.approx(lr * (1 - t) ** power, rel=1e-6)
    assert seen[-1] == pytest.approx(lr * (1 / 8) ** power)
    assert model.lr_schedulers().get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the end
    assert all(a <= b for a, b in zip(seen[:warmup], seen[1:warmup], strict=False))
    assert all(a >= b for a, b in zip(seen[warmup:], seen[warmup + 1 :], strict=False))


def test_encoder_lr_mult_scales_the_encoder_groups_throughout(tmp_path):
    record = RecordLR()
    model = tiny_unet(lr=0.01, encoder_lr_mult=0.1, warmup_steps=2)
    groups = model.parameter_groups()
    encoder = {id(p) for p in model.net.encoder.parameters()}
    for group in groups:
        in_encoder = {id(p) in encoder for p in group["params"]}
        assert len(in_encoder) == 1  # a group is all encoder or all the rest
        assert group["lr"] == pytest.approx(0.001 if in_encoder.pop() else 0.01)
        assert group["weight_decay"] == (0.0 if group["params"][0].ndim <= 1 else 1e-4)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    trainer(tmp_path, max_epochs=1, callbacks=[record], limit_val_batches=0).fit(model, tiny_data())
    for lrs in record.lrs:  # the schedule scales every group alike
        ratios = {round(lr / max(lrs), 6) for lr in lrs}
        assert ratios == {0.1, 1.0}


def test_encoder_lr_mult_needs_an_encoder():
    model = tiny_unet(encoder_lr_mult=0.5)
    del model.net.encoder
    with pytest.raises(ConfigError, match="has no `encoder` module"):
        model.parameter_groups()


# ------------------------------------------------------------------------------- EMA
def test_ema_arithmetic_on_a_toy_model():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(net, decay=0.9, warmup=False)
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net.train()(torch.randn(4, 2))  # BatchNorm statistics move, num_batches_tracked = 1
    ema.update(net)
    for old, new, avg in zip(before, net.parameters(), ema.module.parameters(), strict=True):
        assert torch.allclose(avg, 0.9 * old + 0.1 * new)
    bn_net, bn_ema = net[1], ema.module[1]
    assert torch.allclose(bn_ema.running_mean, 0.1 * bn_net.running_mean)  # from 0
    assert bn_ema.num_batches_tracked == 1  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_warmup_decay_follows_the_tensorflow_rule():
    net = nn.Linear(1, 1, bias=False)
    ema = EMA(net, decay=0.999)
    expected = []
    with torch.no_grad():
        net.weight.fill_(0.0)
        ema.module.weight.fill_(1.0)
    value = 1.0
    for n in range(1, 6):
        d = min(0.999, (1 + n) / (10 + n))
        assert float(ema.current_decay()) == pytest.approx(d)
        ema.update(net)
        value = d * value
        expected.append(value)
        assert float(ema.module.weight) == pytest.approx(value, rel=1e-6)
    assert int(ema.num_updates) == 5
    with pytest.raises(ValueError, match="ema_decay must be in"):
        EMA(net, decay=1.0)


def _set_head_bias(net: nn.Module, cls: int) -> None:
    """Make a network predict `cls` everywhere."""
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
        net.head.bias[cls] = 100.0


def test_validation_and_test_use_the_averaged_weights_and_checkpoints_hold_them(tmp_path):
    model = tiny_unet(ema_decay=0.99)
    dm = tiny_data()
    fit = trainer(tmp_path, max_epochs=1, enable_checkpointing=True, limit_val_batches=0)
    fit.fit(model, dm)
    assert model.ema is not None and int(model.ema.num_updates) == 4  # one per optimiser step
    # the raw network says class 1 everywhere, the average class 0 (background)
    _set_head_bias(model.net, 1)
    _set_head_bias(model.ema.module, 0)
    dm.setup("validate")
    masks = torch.stack([dm.datasets["val"][i]["mask"] for i in range(4)])
    background = (masks == 0).float().mean().item()
    assert 0.3 < background < 0.99
    val = trainer(tmp_path).validate(model, dm, verbose=False)[0]
    assert val["val/acc"] == pytest.approx(background, abs=1e-6)
    # predict_step and forward in eval mode also use the average; training uses the raw network
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert (model(x).argmax(1) == 0).all()
    model.train()
    assert (model(x).argmax(1) == 1).all()

    ckpt = tmp_path / "ema.ckpt"
    fit.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert state["ema.module.head.bias"][0] == 100.0 and state["net.head.bias"][1] == 100.0
    # test from the checkpoint: the averaged weights, also for a model configured without EMA
    for ema_decay in (0.99, None):
        fresh = tiny_unet(ema_decay=ema_decay)
        result = trainer(tmp_path).test(fresh, dm, ckpt_path=ckpt, verbose=False)[0]
        masks_test = torch.stack([dm.datasets["test"][i]["mask"] for i in range(4)])
        assert result["test/acc"] == pytest.approx(
            (masks_test == 0).float().mean().item(), abs=1e-6
        )
    loaded = UNet.load_from_checkpoint(ckpt, map_location="cpu", ema_decay=None).eval()
    assert loaded.ema is None and loaded.net.head.bias[0] == 100.0


def test_ema_starts_from_a_checkpoint_without_one(tmp_path):
    plain = tiny_unet()
    _set_head_bias(plain.net, 3)
    ckpt = tmp_path / "plain.ckpt"
    checkpoint = {"state_dict": plain.state_dict(), "hyper_parameters": dict(plain.hparams)}
    torch.save({**checkpoint, "pytorch-lightning_version": L.__version__}, ckpt)
    with_ema = UNet.load_from_checkpoint(ckpt, map_location="cpu", ema_decay=0.9)
    assert with_ema.ema is not None and with_ema.ema.module.head.bias[3] == 100.0
    assert int(with_ema.ema.num_updates) == 0


# ------------------------------------------------------------------------------- SyncBN
def test_sync_batchnorm_on_the_cpu_is_a_clear_error(tmp_path, monkeypatch):
    from conftest import REPO

    from seglight.cli import run

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(REPO / "experiments" / "quickstart.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.sync_batchnorm", "true"]  # fmt: skip
    with pytest.raises(ConfigError, match="sync_batchnorm: true needs CUDA GPUs"):
        run(args)


# ------------------------------------------------------------------------------- class weights
def test_median_frequency_class_weights_from_the_training_split(tmp_path, capsys):
    dm = tiny_data()
    model = tiny_unet(class_weights="median_frequency", loss={"ce": 1.0, "focal": 1.0})
    trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, dm)
    # by hand (Eigen and Fergus): freq(c) = pixels of c / pixels of the images holding c
    masks = [m.numpy() for m in (dm.build_dataset("train", False)[i]["mask"] for i in range(8))]
    pixels = np.array([sum((m == c).sum() for m in masks) for c in range(5)], float)
    holding = np.array([sum(m.size for m in masks if (m == c).any()) for c in range(5)], float)
    freq = pixels / holding
    expected = torch.tensor(np.median(freq) / freq, dtype=torch.float32)
    for name in ("ce", "focal"):
        assert torch.allclose(model.criterion.losses[name].weight, expected, atol=1e-5)
    assert "median-frequency class weights: 0 0." in capsys.readouterr().err
