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
from seglight.data.semi import presence
from seglight.methods import AdvSemiSeg, DecoupledNet, GANSemiSeg
from seglight.methods.advsemiseg import (
    FCDiscriminator,
    confident_pseudo_labels,
    masked_bce,
    one_hot_labels,
)
from seglight.methods.base import decision_accuracy
from seglight.methods.decoupled import DecoupledNetNetwork, sample_present_classes
from seglight.methods.gansemiseg import (
    DCGANGenerator,
    called_fake,
    frozen_norm_statistics,
    real_fake_losses,
)

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


def test_discriminator_accuracy_of_both_methods():
    real_right = torch.tensor([[[True, False], [True, True]]])
    real_valid = torch.tensor([[[True, True], [False, True]]])  # 3 valid, 2 right
    fake_right = torch.tensor([[[False, True], [True, True]]])  # all valid, 3 right
    assert decision_accuracy(real_right, real_valid, fake_right, None).item() == pytest.approx(
        5 / 7
    )
    none = torch.zeros_like(real_valid)
    assert decision_accuracy(real_right, none, fake_right, none) == 0
    logits = torch.zeros(1, 3, 1, 2)  # K = 2 and "fake"
    logits[0, 2, 0, 0] = 5.0  # p_fake > 0.5 on the first pixel only
    assert called_fake(logits).tolist() == [[[True, False]]]


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
    paper's many weak labels), the decoder only the labelled ones: in stage 1 one encoder pass
    over labelled and unlabelled images and no decoder; in stage 2 the labelled images only;
    joint training does both in one step."""
    names = sorted(p.stem for p in (camvid_root / "train").iterdir())
    labels = tmp_path / "image_labels.json"
    labels.write_text(json.dumps({n: ["Sky", "Road"] for n in names}))
    data = semi_data(camvid_root, crop=64, image_labels=str(labels))
    for options, expect_encoded, expect_decoded in [
        ({"joint": True}, [4], [4]),  # 2 labelled + 2 unlabelled; 2 labelled x 2 classes
        ({"stage1_steps": 1}, [4, 2], [4]),  # stage 1: classifier only; stage 2: decoder
    ]:
        model = build("DecoupledNet", **options)
        encoded, decoded = [], []
        model.net.encoder.stages[0].register_forward_hook(
            lambda m, i, o, seen=encoded: seen.append(o.shape[0])
        )
        model.net.figure_ground.register_forward_hook(
            lambda m, i, o, seen=decoded: seen.append(o.shape[0])
        )
        trainer(len(expect_encoded)).fit(model, datamodule=data)
        assert encoded == expect_encoded, options
        assert decoded == expect_decoded, options


def _classifier_and_decoder(model: DecoupledNet) -> tuple[dict, dict]:
    """(classifier state, bridge + decoder state) of a DecoupledNet: parameters and buffers."""
    net = model.net
    classifier = {"encoder", "fc", "score"}
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    first = {k: v for k, v in state.items() if k.split(".")[0] in classifier}
    rest = {k: v for k, v in state.items() if k.split(".")[0] not in classifier}
    return first, rest


def test_decoupled_second_stage_freezes_the_classifier_as_the_released_prototxt(camvid_root):
    """The released training prototxts (HyeonwooNoh/DecoupledNet,
    training/005_train_seg_5_anno/005_train_seg_5_anno.prototxt, and likewise 003_..._25_anno and
    004_..._10_anno) set `blobs_lr: 0` on every conv and fc layer of the classification network
    (conv1_1 ... conv5_3, fc6, fc7, cls-score-voc) and train only the bridge and decoder
    (`blobs_lr: 1 blobs_lr: 2`) with the figure-ground loss. Here stage 1 (steps 0, 1) trains
    the classifier only, and from step 2 on the classifier is frozen: no gradient, learning rate
    0, BatchNorm in eval mode (its statistics do not move), while the bridge and decoder learn.
    The loss parts are logged and validation runs in both stages."""
    torch.manual_seed(0)
    model = build("DecoupledNet", stage1_steps=2)
    seen: list[dict] = []

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            classifier = [module.net.encoder, module.net.fc, module.net.score]
            params = [p for m in classifier for p in m.parameters()]
            ids = {id(p) for p in params}
            seen.append(
                {
                    "requires_grad": {p.requires_grad for p in params},
                    "training": {m.training for c in classifier for m in c.modules()},
                    # the learning rate of this step
                    "lr": {
                        g["lr"]
                        for g in optimizer.param_groups
                        if any(id(p) in ids for p in g["params"])
                    },
                }
            )

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen[-1]["state"] = _classifier_and_decoder(module)
            seen[-1]["logged"] = set(trainer.callback_metrics)

        def on_validation_end(self, trainer, module):
            seen.append({"val": float(trainer.callback_metrics["val/mIoU"])})

    start = _classifier_and_decoder(model)
    # validation after every step: a stage-2 step after a validation keeps the classifier frozen
    t = trainer(4, callbacks=[Record()], limit_val_batches=1, val_check_interval=1)
    t.fit(model, datamodule=semi_data(camvid_root))
    steps = [s for s in seen if "state" in s]
    vals = [s["val"] for s in seen if "val" in s]
    assert len(steps) == 4 and len(vals) == 4
    assert all(0 <= v <= 1 for v in vals)
    # stage 1: the classifier learns, the bridge and decoder do not
    (cls1, seg1) = steps[1]["state"]
    assert any(not torch.equal(cls1[k], start[0][k]) for k in cls1)
    assert all(torch.equal(seg1[k], start[1][k]) for k in seg1)
    assert steps[1]["requires_grad"] == {True} and steps[1]["lr"] != {0.0}
    assert {"train/loss_cls_step", "train/loss_step"} <= steps[1]["logged"]
    # stage 2: the classifier is frozen, to the bit (weights and BatchNorm statistics)
    for step in steps[2:]:
        cls, seg = step["state"]
        assert all(torch.equal(cls[k], cls1[k]) for k in cls), "classifier moved in stage 2"
        assert step["requires_grad"] == {False}
        assert step["training"] == {False}  # BatchNorm (and dropout) in eval mode
        assert step["lr"] == {0.0}
        assert {"train/loss_seg_step", "train/loss_cls_step"} <= step["logged"]
    assert any(not torch.equal(steps[3]["state"][1][k], seg1[k]) for k in seg1)
    model.train()  # a frozen classifier stays in eval mode, whoever switches the model to train
    assert not any(m.training for c in (model.net.encoder, model.net.fc) for m in c.modules())
    assert model.net.bridge.training


@pytest.mark.parametrize("joint", [False, True])
def test_decoupled_classifies_labelled_crops_against_their_own_labels(
    joint, camvid_root, monkeypatch
):
    """The classification target of a labelled crop is the classes present in the crop's mask,
    not the whole image's `image_labels` (which name classes the crop may have cut away)."""
    targets: list[torch.Tensor] = []
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def recording(logits, target, *args, **kwargs):
        targets.append(target.detach().clone())
        return bce(logits, target, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits", recording)
    batches: list[dict] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            batches.append({k: v.clone() for k, v in batch["labeled"].items() if k != "name"})

    torch.manual_seed(0)
    model = build("DecoupledNet", joint=joint, stage1_steps=3)
    trainer(3 if joint else 4, callbacks=[Record()]).fit(
        model, datamodule=semi_data(camvid_root, 16)
    )
    # one classification loss per step (in stage 2, step 3, the frozen classifier's, logged)
    assert len(targets) == len(batches) == (3 if joint else 4)
    objects = model.net.object_classes
    differs = False
    for batch, target in zip(batches, targets, strict=True):
        crop = torch.stack([presence(m, 11) for m in batch["mask"]])[:, objects]
        assert torch.equal(target[: len(crop)], crop)
        differs |= not torch.equal(crop, batch["image_labels"][:, objects])
    assert differs  # the 16x16 crops of 48x64 images miss classes of their whole images


def test_decoupled_resumes_exactly_in_either_stage(camvid_root, tmp_path):
    """4 steps straight (stage 1: steps 0, 1) against runs resumed from step 1 (in stage 1) and
    from step 2 (the first step of stage 2): the same weights, optimiser state and schedule; the
    run resumed in stage 2 has its classifier frozen from its first step."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    frozen: list[bool] = []

    class Check(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            classifier = [module.net.encoder, module.net.fc, module.net.score]
            frozen.append(
                not any(p.requires_grad for m in classifier for p in m.parameters())
                and not any(m.training for c in classifier for m in c.modules())
            )

    def run(name: str, ckpt: Path | None = None) -> tuple[DecoupledNet, L.Trainer]:
        L.seed_everything(0)
        model = build("DecoupledNet", stage1_steps=2)
        every = ModelCheckpoint(tmp_path / name, "{step}", every_n_train_steps=1, save_top_k=-1)
        t = trainer(
            4, callbacks=[every, Check()], default_root_dir=str(tmp_path / name),
            enable_checkpointing=True,
        )  # fmt: skip
        t.fit(model, datamodule=semi_data(camvid_root), ckpt_path=str(ckpt) if ckpt else None)
        return model, t

    straight, t = run("straight")
    assert frozen == [False, False, True, True]
    for step in (1, 2):
        frozen.clear()
        resumed, t2 = run(f"from{step}", tmp_path / "straight" / f"step={step}.ckpt")
        assert frozen == [s >= 2 for s in range(step, 4)]
        differ = [
            k
            for k, v in straight.state_dict().items()
            if not torch.equal(v, resumed.state_dict()[k])
        ]
        assert not differ, (step, differ[:5])
        a, b = t.optimizers[0].state_dict(), t2.optimizers[0].state_dict()
        assert [g["lr"] for g in a["param_groups"]] == [g["lr"] for g in b["param_groups"]]
        for index, entry in a["state"].items():
            for key, value in entry.items():
                assert torch.equal(value, b["state"][index][key]), (step, index, key)


def test_decoupled_stages_that_do_not_fit_the_run_are_clear(camvid_root):
    from seglight.errors import ConfigError

    for bad in (0, -3, 1.5, 0.0, True):
        with pytest.raises(ConfigError, match="stage1_steps must be"):
            build("DecoupledNet", stage1_steps=bad)
    with pytest.raises(ConfigError, match=r"stage1_steps=5 is not shorter than the run \(4 steps"):
        trainer(4).fit(build("DecoupledNet", stage1_steps=5), datamodule=semi_data(camvid_root))
    with pytest.raises(ConfigError, match="stage1_steps=0.1 of a 4-step run"):
        trainer(4).fit(build("DecoupledNet", stage1_steps=0.1), datamodule=semi_data(camvid_root))
    with pytest.raises(ConfigError, match="segmentation_trains_encoder: true needs joint: true"):
        trainer(4).fit(
            build("DecoupledNet", segmentation_trains_encoder=True),
            datamodule=semi_data(camvid_root),
        )


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
