"""AdvSemiSeg, GANSemiSeg and DecoupledNet: their networks and losses, a few training steps on
tiny SemiSupervised CamVid (both optimisers step), resume, and DecoupledNet's one decoder pass
per detected class."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_fake_camvid

from seglight.data import CamVid, SemiSupervised
from seglight.methods import AdvSemiSeg, DecoupledNet, GANSemiSeg
from seglight.methods.advsemiseg import (
    FCDiscriminator,
    confident_pseudo_labels,
    masked_bce,
    one_hot_labels,
)
from seglight.methods.decoupled import DecoupledNetNetwork, sample_present_classes
from seglight.methods.gansemiseg import DCGANGenerator, frozen_norm_statistics, real_fake_losses

TINY_NET = {"class_path": "UNet", "init_args": {"encoder": "original", "base_channels": 4}}
TINY_DECOUPLED = {"width": 4, "fc_channels": 16, "bridge_channels": 16}


@pytest.fixture(scope="module")
def camvid_root(tmp_path_factory) -> Path:
    return make_fake_camvid(
        tmp_path_factory.mktemp("data") / "camvid", {"train": 6, "val": 2, "test": 2}, size=(48, 64)
    )


def semi_data(root: Path, crop: int = 32, **kwargs) -> SemiSupervised:
    camvid = CamVid(root=str(root), crop_size=(crop, crop), batch_size=2, num_workers=0)
    return SemiSupervised(camvid, labeled=2, **kwargs)


def trainer(max_steps: int, **kwargs) -> L.Trainer:
    options = dict(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return L.Trainer(**{**options, **kwargs})


def build(name: str, **kwargs):
    if name == "AdvSemiSeg":
        return AdvSemiSeg(num_classes=11, network=TINY_NET, d_channels=8, **kwargs)
    if name == "GANSemiSeg":
        return GANSemiSeg(
            num_classes=11, network=TINY_NET, image_size=(32, 32), g_channels=8, **kwargs
        )
    return DecoupledNet(num_classes=11, **TINY_DECOUPLED, classes_per_image=2, **kwargs)


# ----------------------------------------------------------------------------- pieces
def test_discriminator_follows_hung_et_al():
    d = FCDiscriminator(21)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    slopes = [m.negative_slope for m in d.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert slopes == [0.2] * 4
    for size in [(32, 32), (33, 47), (20, 24)]:  # upsampled to the input, small inputs too
        assert d(torch.rand(2, 21, *size)).shape == (2, 1, *size)


def test_adversarial_losses_and_pseudo_labels():
    mask = torch.tensor([[[0, 2], [255, 1]]])
    onehot = one_hot_labels(mask, 3, 255)
    assert onehot[0, :, 0, 0].tolist() == [1, 0, 0] and onehot[0, :, 1, 0].tolist() == [0, 0, 0]
    logits = torch.tensor([[[[10.0, -10.0]]]])  # D: sure "ground truth", sure "prediction"
    valid = torch.tensor([[[True, False]]])
    assert masked_bce(logits, 1.0, valid) < 1e-3  # the ignored pixel is left out
    assert masked_bce(logits, 1.0) > 4
    assert masked_bce(logits, 1.0, torch.zeros_like(valid)) == 0  # none valid: no term
    seg = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # argmax 0, 1
    d = torch.tensor([[[[0.0, -3.0]]]])  # sigmoid 0.5 and 0.047
    assert confident_pseudo_labels(seg, d, 0.2, 255).tolist() == [[[0, 255]]]


def test_generator_and_real_fake_losses():
    g = DCGANGenerator((45, 61), channels=8)
    images = g(g.sample_noise(3, "cpu"))
    assert images.shape == (3, 3, 45, 61)
    # tanh's range, normalised like the data (ImageNet mean / std)
    assert images.min() >= (0 - 0.485) / 0.229 - 1e-4 and images.max() <= (1 - 0.406) / 0.225 + 1e-4
    logits = torch.zeros(1, 4, 2, 2)
    logits[:, -1] = 20.0  # sure "fake"
    as_real, as_fake = real_fake_losses(logits)
    assert as_real > 15 and as_fake < 1e-6
    net = torch.nn.BatchNorm2d(3)
    with frozen_norm_statistics(net):
        net(torch.randn(4, 3, 5, 5) + 7)
    assert torch.equal(net.running_mean, torch.zeros(3)) and net.momentum == 0.1


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["AdvSemiSeg", "GANSemiSeg", "DecoupledNet"])
def test_trains_and_every_player_steps(name, camvid_root):
    torch.manual_seed(0)
    model = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    t = trainer(2)
    t.fit(model, datamodule=semi_data(camvid_root))
    assert t.global_step == 2  # one step per batch, even with two optimisers
    changed = {
        k.split(".")[0]
        for k, v in model.state_dict().items()
        if k in before and not torch.equal(v, before[k])
    }
    players = {"AdvSemiSeg": {"net", "discriminator"}, "GANSemiSeg": {"net", "generator"}}
    assert players.get(name, {"net"}) <= changed
    for config in t.lr_scheduler_configs:  # each optimiser's schedule moved with it
        assert config.scheduler.last_epoch == 2
    if name == "AdvSemiSeg":
        d_lr = t.optimizers[1].param_groups[0]["lr"]
        assert d_lr < 1e-4 and t.optimizers[1].param_groups[0]["betas"] == (0.9, 0.99)
    if name == "GANSemiSeg":  # DCGAN's Adam for the generator: constant lr 2e-4, betas 0.5/0.999
        g = t.optimizers[1].param_groups[0]
        assert g["lr"] == 2e-4 and g["betas"] == (0.5, 0.999)
        assert t.optimizers[0].param_groups[0]["lr"] != model.hparams.lr  # the network's decays
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 33, 47)).shape == (1, 11, 33, 47)


@pytest.mark.parametrize(
    "name,player", [("AdvSemiSeg", "discriminator"), ("GANSemiSeg", "generator")]
)
def test_resume_restores_both_players_and_the_switch(name, player, camvid_root, tmp_path):
    """Resuming restores the network, the second player, both optimisers and schedules, and
    the step (so AdvSemiSeg's L_semi is on exactly from semi_start)."""
    options = {"semi_start": 2} if name == "AdvSemiSeg" else {}
    torch.manual_seed(0)
    t = trainer(2)
    t.fit(build(name, **options), datamodule=semi_data(camvid_root))
    assert "train/loss_semi_step" not in t.callback_metrics  # steps 0, 1: off
    ckpt = tmp_path / "last.ckpt"
    t.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert len(saved["optimizer_states"]) == 2 and len(saved["lr_schedulers"]) == 2

    seen = {}

    class Check(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if not seen:
                seen["step"] = module.global_step
                seen["state"] = {k: v.clone() for k, v in module.state_dict().items()}
                seen["opt"] = [copy.deepcopy(o.state_dict()) for o in trainer.optimizers]
                seen["lrs"] = [c.scheduler.last_epoch for c in trainer.lr_scheduler_configs]

    t2 = trainer(3, callbacks=[Check()])
    t2.fit(build(name, **options), datamodule=semi_data(camvid_root), ckpt_path=ckpt)
    assert seen["step"] == 2 and seen["lrs"] == [2, 2]
    for prefix in ("net.", f"{player}."):
        keys = [k for k in saved["state_dict"] if k.startswith(prefix)]
        assert keys and all(torch.equal(seen["state"][k], saved["state_dict"][k]) for k in keys)
    for restored, stored in zip(seen["opt"], saved["optimizer_states"], strict=True):
        assert torch.equal(restored["state"][0]["exp_avg"], stored["state"][0]["exp_avg"])
    # step 2 >= semi_start: on after resuming
    assert ("train/loss_semi_step" in t2.callback_metrics) is (name == "AdvSemiSeg")
    assert t2.global_step == 3


def test_gansemiseg_network_has_a_fake_channel():
    model = build("GANSemiSeg")
    assert model.net(torch.randn(1, 3, 32, 32)).shape[1] == 12  # K + "fake"
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 33, 35)).shape == (2, 11, 33, 35)


# ----------------------------------------------------------------------------- DecoupledNet
def _detecting(net: DecoupledNetNetwork, detected: list[int]) -> None:
    """Make the classifier detect exactly `detected` (classifier output indices)."""
    with torch.no_grad():
        net.score.weight.zero_()
        net.score.bias.fill_(-10.0)
        net.score.bias[detected] = 10.0


@pytest.mark.parametrize("background", [None, 0])
def test_decoupled_runs_the_decoder_once_per_detected_class(background):
    torch.manual_seed(0)
    net = DecoupledNetNetwork(6, background_index=background, **TINY_DECOUPLED).eval()
    _detecting(net, [1, 3])
    calls: list[int] = []
    net.figure_ground.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    with torch.inference_mode():  # as Lightning validates and tests
        out = net(torch.randn(2, 3, 33, 47))
    assert calls == [4]  # one decoder call: 2 images x 2 detected classes
    assert out.shape == (2, 6, 33, 47)
    probs = out.exp()
    assert torch.allclose(probs.sum(1), torch.ones(2, 33, 47), atol=1e-4)
    classes = net.object_classes[[1, 3]].tolist()
    winners = set(out.argmax(1).unique().tolist())
    assert winners <= set(classes) | ({background} if background is not None else set())
    # undetected classes get (almost) no probability
    others = [c for c in range(6) if c not in classes and c != background]
    assert probs[:, others].max() < 1e-6


def test_decoupled_background_takes_unclaimed_pixels():
    net = DecoupledNetNetwork(3, background_index=0, **TINY_DECOUPLED).eval()
    _detecting(net, [0])  # class 1
    # a decoder whose figure score is negative everywhere: every pixel is background
    with torch.no_grad():
        net.figure_ground.weight.zero_()
        net.figure_ground.bias.copy_(torch.tensor([3.0, -3.0]))
        assert (net(torch.randn(1, 3, 32, 32)).argmax(1) == 0).all()
        net.figure_ground.bias.copy_(torch.tensor([-3.0, 3.0]))
        assert (net(torch.randn(1, 3, 32, 32)).argmax(1) == 1).all()


def test_decoupled_without_detection_takes_the_best_class():
    net = DecoupledNetNetwork(4, **TINY_DECOUPLED).eval()
    with torch.no_grad():
        net.score.weight.zero_()
        net.score.bias.copy_(torch.tensor([-9.0, -3.0, -8.0, -7.0]))  # all below 0.5
        assert (net(torch.randn(1, 3, 32, 32)).argmax(1) == 1).all()


def test_sample_present_classes():
    present = torch.tensor([[True, False, True, True], [False] * 4])
    image_idx, cls_idx = sample_present_classes(present, 2)
    assert image_idx.tolist() == [0, 0] and set(cls_idx.tolist()) <= {0, 2, 3}
    assert len(set(cls_idx.tolist())) == 2


def test_decoupled_learns_from_image_labels_of_unlabelled_images(camvid_root, tmp_path):
    """With image_labels for the unlabelled images, the classifier sees every image (the
    paper's many weak labels), the decoder only the labelled ones."""
    names = sorted(p.stem for p in (camvid_root / "train").iterdir())
    labels = tmp_path / "image_labels.json"
    labels.write_text(json.dumps({n: ["Sky", "Road"] for n in names}))
    model = build("DecoupledNet")
    encoded, decoded = [], []
    model.net.encoder.stages[0].register_forward_hook(lambda m, i, o: encoded.append(o.shape[0]))
    model.net.figure_ground.register_forward_hook(lambda m, i, o: decoded.append(o.shape[0]))
    data = semi_data(camvid_root, crop=64, image_labels=str(labels))
    trainer(1).fit(model, datamodule=data)
    assert encoded == [4]  # 2 labelled + 2 unlabelled images in one pass
    assert decoded == [4]  # 2 labelled images x 2 classes present in each crop


def test_bad_options_are_clear():
    from seglight.errors import ConfigError

    with pytest.raises(ConfigError, match="background_index must be in"):
        DecoupledNet(num_classes=3, background_index=3, **TINY_DECOUPLED)
    with pytest.raises(ConfigError, match="encoder_weights need width 64"):
        DecoupledNet(num_classes=3, encoder_weights="imagenet", **TINY_DECOUPLED)
    with pytest.raises(ConfigError, match="classes_per_image must be >= 1"):
        DecoupledNet(num_classes=3, classes_per_image=0, **TINY_DECOUPLED)
    with pytest.raises(ConfigError, match="trains on labelled and unlabelled"):
        model = build("AdvSemiSeg")
        model.split_batch({"image": torch.zeros(1, 3, 8, 8), "mask": torch.zeros(1, 8, 8)})
