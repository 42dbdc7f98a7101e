"""The semi-supervised methods (seglight.methods): every registered method trains a few steps on
tiny data and resumes exactly; the views and schedules; the network option; DDP on 2 processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_fake_camvid, run_cli
from lightning.pytorch.callbacks import ModelCheckpoint
from test_perf import count_host_syncs

import seglight
from seglight.cli import run
from seglight.data import CamVid, SemiSupervised
from seglight.errors import CheckpointError, ConfigError
from seglight.methods import CPS, FixMatch, MeanTeacher, SemiSupervisedModel, build_network
from seglight.methods.base import (
    classmix_masks,
    cutmix_boxes,
    decision_accuracy,
    fraction,
    mix,
    photometric_jitter,
    pseudo_label_quality,
    sigmoid_rampup,
)
from seglight.models import MODELS, LinkNet, UNet, UNetNetwork

TINY = {
    "class_path": "seglight.models.UNet",
    "init_args": {"encoder": "original", "base_channels": 4},
}
METHODS = sorted(n for n, c in MODELS.items() if issubclass(c, SemiSupervisedModel))


def test_the_methods_are_registered_and_the_base_is_not():
    assert {"MeanTeacher", "FixMatch", "CPS"} <= set(METHODS)
    assert "SemiSupervisedModel" not in MODELS


@pytest.fixture(scope="module")
def camvid(tmp_path_factory) -> Path:
    root = make_fake_camvid(
        tmp_path_factory.mktemp("data") / "camvid", {"train": 6, "val": 2, "test": 2}, (32, 32)
    )
    # image-level labels of every training image, for methods with weak supervision
    labels = {f"0001TP_train_{i:04d}": ["Sky", "Road", "Car"] for i in range(6)}
    (root / "image_labels.json").write_text(json.dumps(labels))
    return root


def data(root: Path, cls: type[SemiSupervised] = SemiSupervised, **kwargs) -> SemiSupervised:
    return cls(
        CamVid(root=str(root), crop_size=(32, 32), batch_size=2, num_workers=0),
        labeled=2,
        image_labels="image_labels.json",
        **kwargs,
    )


def trainer(tmp_path: Path, steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0,
        default_root_dir=str(tmp_path), **kwargs,
    )  # fmt: skip


def method(name: str, **kwargs) -> SemiSupervisedModel:
    return MODELS[name](num_classes=11, network=TINY, **kwargs)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_and_resumes_exactly(name, camvid, tmp_path):
    torch.manual_seed(0)
    model = method(name)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    first = trainer(tmp_path / "a", 2)
    first.fit(model, data(camvid))
    assert first.global_step == 2
    logged = first.callback_metrics
    assert torch.isfinite(logged["train/loss"])
    changed = [
        k for k, v in model.state_dict().items() if k not in start or not torch.equal(v, start[k])
    ]
    # every network (and a teacher or discriminator) moved, not only the first one
    for net in model.networks():
        for key, param in net.named_parameters():
            full = next(k for k, p in model.named_parameters() if p is param)
            assert full in changed or not param.requires_grad, f"{name}: {key} did not train"
    ckpt = tmp_path / "a" / "step2.ckpt"
    first.save_checkpoint(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)

    class Check(L.Callback):
        def on_train_start(self, trainer, module):
            assert trainer.global_step == 2
            for key, value in module.state_dict().items():
                assert torch.equal(value, saved["state_dict"][key]), key
            for mine, theirs in zip(trainer.optimizers, saved["optimizer_states"], strict=True):
                state = mine.state_dict()["state"]
                assert state and len(state) == len(theirs["state"])
                for index, entry in state.items():
                    for k, v in entry.items():
                        assert torch.equal(v, theirs["state"][index][k]), (index, k)
            self.checked = True

    check = Check()
    resumed = method(name)
    second = trainer(tmp_path / "b", 3, callbacks=[check])
    second.fit(resumed, data(camvid), ckpt_path=str(ckpt))
    assert check.checked and second.global_step == 3


def test_a_resumed_semi_run_equals_the_straight_one(camvid, tmp_path):
    """6 steps straight, checkpointed at step 3, vs resumed from that checkpoint: the same
    weights. Each step takes one batch of the 2 labelled images (1 a batch: a pass every 2
    steps, cycled) and of the 4 unlabelled ones (an epoch every 4 steps), so the checkpoint is
    mid-pass of the labelled loader, and the run crosses an epoch; FixMatch draws its strong
    views and CutMix boxes too."""

    def run(name: str, ckpt: Path | None = None) -> FixMatch:
        L.seed_everything(0)
        model = FixMatch(num_classes=11, network=TINY, threshold=0.0)
        semi = SemiSupervised(
            CamVid(root=str(camvid), crop_size=(32, 32), batch_size=1, num_workers=0), labeled=2
        )
        every3 = ModelCheckpoint(tmp_path / name, "{step}", every_n_train_steps=3, save_top_k=-1)
        fit = trainer(tmp_path / name, 6, callbacks=[every3])
        fit.fit(model, semi, ckpt_path=str(ckpt) if ckpt else None)
        return model

    straight = run("straight").state_dict()
    resumed = run("resumed", tmp_path / "straight" / "step=3.ckpt").state_dict()
    differ = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not differ, differ[:5]


def test_methods_need_unlabelled_images(camvid, tmp_path):
    model = method("FixMatch")
    plain = CamVid(root=str(camvid), crop_size=(32, 32), batch_size=2, num_workers=0)
    with pytest.raises(ConfigError, match="FixMatch trains on labelled and unlabelled images"):
        trainer(tmp_path, 1).fit(model, plain)


def test_fixmatch_trains_on_confident_pseudo_labels_only(camvid, tmp_path):
    torch.manual_seed(0)
    loose = FixMatch(num_classes=11, network=TINY, threshold=0.0)
    trainer(tmp_path / "a", 1).fit(loose, data(camvid))
    strict = FixMatch(num_classes=11, network=TINY, threshold=1.01)
    t = trainer(tmp_path / "b", 1)
    t.fit(strict, data(camvid))
    assert (
        t.callback_metrics["train/confident"] == 0 and t.callback_metrics["train/loss_unsup"] == 0
    )
    assert trainer_metric(loose, "train/loss_unsup") > 0


def trainer_metric(model: SemiSupervisedModel, key: str) -> float:
    return float(model.trainer.callback_metrics[key])


def test_mean_teacher_evaluates_the_teacher(camvid, tmp_path):
    model = MeanTeacher(num_classes=11, network=TINY, ema_decay=0.9, rampup_steps=0)
    trainer(tmp_path, 2).fit(model, data(camvid))
    assert model.ema.num_updates == 2
    student, teacher = model.net.state_dict(), model.ema.module.state_dict()
    assert any(not torch.equal(student[k], teacher[k]) for k in student)
    x = torch.randn(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model.ema.module(x))
    with pytest.raises(ConfigError, match="ema_decay is the teacher's decay"):
        MeanTeacher(num_classes=3, network=TINY, ema_decay=None)


def test_mean_teacher_ema_decay_switches_after_the_rampup(camvid, tmp_path):
    # CuriousAI/mean-teacher tensorflow/mean_teacher/model.py: ema_decay_during_rampup 0.99,
    # ema_decay_after_rampup 0.999, switched by step_rampup(global_step, rampup_length)
    model = MeanTeacher(num_classes=11, network=TINY, rampup_steps=2)
    trainer(tmp_path / "b", 3).fit(model, data(camvid))  # step 2: after the ramp-up
    assert model.ema.decay == pytest.approx(0.999)
    assert trainer_metric(model, "train/ema_decay") == pytest.approx(0.999)
    model = MeanTeacher(num_classes=11, network=TINY, rampup_steps=2)
    trainer(tmp_path / "a", 2).fit(model, data(camvid))  # steps 0 and 1: the ramp-up
    assert trainer_metric(model, "train/ema_decay") == pytest.approx(0.99)
    assert [model.teacher_decay(step) for step in (0, 1, 2, 100)] == [0.99, 0.99, 0.999, 0.999]
    fixed = MeanTeacher(num_classes=11, network=TINY, rampup_steps=2, ema_decay_after_rampup=None)
    assert fixed.teacher_decay(100) == 0.99
    with pytest.raises(ConfigError, match="ema_decay_after_rampup must be in"):
        MeanTeacher(num_classes=3, network=TINY, ema_decay_after_rampup=1.0)


def test_cps_ramps_its_weight_up_when_asked(camvid, tmp_path):
    torch.manual_seed(0)
    for rampup, expected in ((0, 1.5), (10, 1.5 * sigmoid_rampup(1, 10))):
        model = CPS(num_classes=11, network=TINY, rampup_steps=rampup)
        trainer(tmp_path / str(rampup), 2).fit(model, data(camvid))  # the weight of step 1
        assert trainer_metric(model, "train/cps_weight") == pytest.approx(expected)


def test_cps_weight_defaults_are_the_authors_voc_configs():
    # charlesCXK/TorchSemiSeg exp.voc/voc8.res50v3+.CPS/config.py: C.cps_weight = 1.5;
    # exp.voc/voc8.res50v3+.CPS+CutMix/config.py: C.cps_weight = 1
    assert CPS(num_classes=3, network=TINY).cps_weight == 1.5
    assert CPS(num_classes=3, network=TINY, cutmix=True).cps_weight == 1.0
    assert CPS(num_classes=3, network=TINY, cutmix=True, cps_weight=5.0).cps_weight == 5.0


def test_cps_networks_differ_and_both_encoders_take_the_lr_multiplier():
    model = CPS(num_classes=3, network="LinkNet", encoder_lr_mult=0.1, lr=1.0)
    first = dict(model.net.named_parameters())
    assert any(not torch.equal(p, first[k]) for k, p in model.net2.named_parameters())
    groups = model.parameter_groups()
    slow = {id(p) for g in groups if g["lr"] == pytest.approx(0.1) for p in g["params"]}
    for net in (model.net, model.net2):
        assert {id(p) for p in net.encoder.parameters()} <= slow
        assert not {id(p) for p in net.decoder.parameters()} & slow


# ----------------------------------------------------------------------------- what methods record
class GarbageHeldOut(SemiSupervised):
    """Held-out masks replaced by random classes (from a generator of their own, so that no other
    draw changes)."""

    def collate_fn(self):
        collate, draws = super().collate_fn(), torch.Generator().manual_seed(1)

        def garbage(samples):
            batch = collate(samples)
            if "heldout_mask" in batch:
                shape = batch["heldout_mask"].shape
                batch["heldout_mask"] = torch.randint(0, 11, shape, generator=draws)
            return batch

        return garbage


# every unlabelled term on from the first step (every pixel over the thresholds)
ALL_ON = {
    "FixMatch": {"threshold": 0.0},
    "MeanTeacher": {"rampup_steps": 0},
    "AdvSemiSeg": {"semi_start": 0, "semi_threshold": 0.0},
}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_records_the_same_names_and_never_trains_on_held_out_masks(
    name, camvid, tmp_path
):
    """The shared names (loss_sup + loss_unsup = loss, confident, d_acc for the adversarial
    methods, the monitor's pseudo_acc / pseudo_mIoU with held-out masks only); a run whose
    held-out masks are garbage trains exactly as one without them."""
    runs = {}
    for monitor in (False, True):
        L.seed_everything(0)
        model = method(name, **ALL_ON.get(name, {}))
        fit = trainer(tmp_path / str(monitor), 1)
        semi = (
            data(camvid, GarbageHeldOut, monitor_unlabeled_masks=True) if monitor else data(camvid)
        )
        fit.fit(model, semi)
        runs[monitor] = model.state_dict(), dict(fit.callback_metrics)
    (off, off_logged), (on, logged) = runs[False], runs[True]
    assert not [k for k in off if not torch.equal(off[k], on[k])]
    value = {  # the last step's
        k.removeprefix("train/").removesuffix("_step"): float(v)
        for k, v in logged.items()
        if k.endswith("_step")
    }
    assert value["loss_sup"] + value["loss_unsup"] == pytest.approx(value["loss"], rel=1e-5)
    assert value["confident"] == 1.0  # no threshold, or one that every pixel passes
    assert 0 <= value["pseudo_acc"] <= 1
    assert 0 <= value["pseudo_mIoU"] <= 1
    assert ("d_acc" in value) is (name in ("AdvSemiSeg", "GANSemiSeg"))
    assert "train/pseudo_acc_step" not in off_logged and "train/pseudo_mIoU" not in off_logged
    assert "train/loss_unsup_epoch" in off_logged  # epoch means too
    assert "train/threshold" not in logged  # FixMatch: no schedule by default


def test_pseudo_label_quality_on_a_crafted_batch():
    pseudo = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
    heldout = torch.tensor([[[0, 1, 2], [2, 255, 1]]])
    valid = torch.tensor([[[True, True, True], [True, True, False]]])
    # counted: 4 pixels, 3 right; IoU 0: 1/1, 1: 1/2, 2: 1/2 (class 3 absent: left out)
    with count_host_syncs() as counter, counter.scope():  # cheap: no host sync
        got = pseudo_label_quality(pseudo, heldout, valid, num_classes=4)
        fraction(valid, valid), decision_accuracy(valid, valid, ~valid, None)
    assert not counter.calls, dict(counter.calls)
    assert got["pseudo_acc"].item() == pytest.approx(0.75)
    assert got["pseudo_mIoU"].item() == pytest.approx(2 / 3)
    no_label = pseudo_label_quality(pseudo.masked_fill(pseudo == 1, 255), heldout, None, 4)
    assert no_label["pseudo_acc"].item() == pytest.approx(2 / 3)  # pixels without one: left out
    nothing = pseudo_label_quality(pseudo, torch.full_like(heldout, 255), valid, 4)
    assert nothing["pseudo_acc"].isnan() and nothing["pseudo_mIoU"].isnan()


class Classes(torch.nn.Module):
    """A network whose logits pick the class written in the image's first channel."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.k, self.scale = num_classes, torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        labels = image[:, 0].round().long().clamp(0, self.k - 1)
        return torch.nn.functional.one_hot(labels, self.k).permute(0, 3, 1, 2) * self.scale


def test_fixmatch_monitors_its_weak_view_pseudo_labels_exactly():
    model = FixMatch(num_classes=4, network=TINY, threshold=0.0)
    model.net = Classes(4)
    pseudo = torch.tensor([[[0, 1, 1], [2, 2, 0]], [[3, 3, 3], [3, 3, 3]]])
    heldout = torch.tensor([[[0, 1, 2], [2, 255, 1]], [[3, 0, 3], [255, 255, 255]]])
    valid = torch.ones(2, 2, 3, dtype=torch.bool)
    unlabeled = {
        "image": pseudo[:, None].float().expand(-1, 3, -1, -1),
        "mask": torch.full_like(pseudo, 255),
        "valid": valid,
        "heldout_mask": heldout,
    }
    labeled = {"image": torch.zeros(1, 3, 2, 3), "mask": torch.zeros(1, 2, 3, dtype=torch.long)}
    logged = {}
    model.log_losses = lambda losses, n: logged.update(losses)
    torch.manual_seed(0)
    loss = model.training_step({"labeled": labeled, "unlabeled": unlabeled}, 0)
    expected = pseudo_label_quality(pseudo, heldout, valid, 4)
    for key in ("pseudo_acc", "pseudo_mIoU"):
        assert logged[key].item() == pytest.approx(expected[key].item())
    assert logged["pseudo_acc"].item() == pytest.approx(5 / 8)  # 8 labelled pixels, 5 right
    garbage = {**unlabeled, "heldout_mask": torch.randint(0, 4, heldout.shape)}
    torch.manual_seed(0)  # garbage held-out masks: the same loss
    assert torch.equal(model.training_step({"labeled": labeled, "unlabeled": garbage}, 0), loss)
    del unlabeled["heldout_mask"]  # without them, no monitor
    logged.clear()
    model.training_step({"labeled": labeled, "unlabeled": unlabeled}, 0)
    assert "pseudo_acc" not in logged and "confident" in logged


def test_fixmatch_threshold_schedule(camvid, tmp_path):
    assert FixMatch(num_classes=11, network=TINY).current_threshold() == 0.95  # the paper's
    model = FixMatch(num_classes=11, network=TINY, threshold_schedule={"start": 0.5, "steps": 4})
    assert model.current_threshold() == 0.5
    trainer(tmp_path, 3).fit(model, data(camvid))
    assert trainer_metric(model, "train/threshold") == pytest.approx(0.5 + 0.45 * 2 / 4)  # step 2
    ramp = FixMatch(num_classes=11, threshold_schedule={"start": 0.9, "end": 0.6, "steps": 2.0})
    assert ramp.schedule == (0.9, 0.6, 2)
    for bad in ({"start": 0.5}, {"start": 2, "steps": 3}, {"start": 0.5, "steps": 0},
                {"start": 0.5, "steps": 2.5}, {"start": "low", "steps": 3}, 0.5):  # fmt: skip
        with pytest.raises(ConfigError, match="FixMatch: threshold_schedule"):
            FixMatch(num_classes=3, network=TINY, threshold_schedule=bad)
    with pytest.raises(ConfigError, match="unknown key"):
        FixMatch(num_classes=3, network=TINY, threshold_schedule={"start": 0.5, "steps": 2, "x": 1})


# ----------------------------------------------------------------------------- warm start
def tiny_unet(num_classes: int = 11, **kwargs) -> UNet:
    return UNet(num_classes=num_classes, encoder="original", base_channels=4, **kwargs)


@pytest.fixture(scope="module")
def supervised(camvid, tmp_path_factory) -> Path:
    """A supervised run's checkpoint (the tiny U-Net on the labelled images, 1 step)."""
    torch.manual_seed(0)
    fit = trainer(tmp_path_factory.mktemp("supervised"), 1, enable_checkpointing=False)
    fit.fit(tiny_unet(), data(camvid))
    path = Path(fit.default_root_dir) / "supervised.ckpt"
    fit.save_checkpoint(path)
    return path


def net_weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}


def same(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    state = module.state_dict()
    return state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in state)


@pytest.mark.parametrize("name", METHODS)
def test_init_from_a_supervised_checkpoint_warm_starts_every_method(name, supervised):
    weights = net_weights(supervised)
    torch.manual_seed(1)
    model = method(name, init_from=str(supervised))
    model._ensure_ema()  # as configure_model does (Mean Teacher's teacher)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.initialise_from(str(supervised))
    state = model.state_dict()
    if name == "GANSemiSeg":  # K class channels from the checkpoint, "fake" kept
        grown = [k for k, v in weights.items() if state[f"net.{k}"].shape != v.shape]
        assert grown  # the classifier's weight and bias
        for key, value in weights.items():
            mine, n = state[f"net.{key}"], value.shape[0] if value.dim() else 0
            assert torch.equal(mine[:n], value) if n else torch.equal(mine, value)
            assert torch.equal(mine[n:], before[f"net.{key}"][n:]) if n else True
    else:
        assert same(model.net, weights)
    if model.ema is not None:
        assert same(model.ema.module, weights)  # Mean Teacher's teacher too
    if name == "CPS":  # net2: the checkpoint's encoder, its own decoder
        encoder = {k.removeprefix("encoder."): v for k, v in weights.items() if "encoder." in k}
        assert encoder and same(model.net2.encoder, encoder)
        assert not same(model.net2, weights)
        both = CPS(num_classes=11, network=TINY, init_net2="all")
        both.initialise_from(str(supervised))
        assert same(both.net2, weights)
    for key in (k for k in before if k.split(".")[0] in ("discriminator", "generator")):
        assert torch.equal(state[key], before[key])  # the second player starts fresh


def test_init_from_happens_when_fit_starts_and_never_over_a_resumed_run(
    camvid, supervised, tmp_path
):
    start = tmp_path / "start.ckpt"
    start.write_bytes(supervised.read_bytes())
    seen = {}

    class Record(L.Callback):
        def on_train_start(self, trainer, module):
            seen[trainer.global_step] = {k: v.clone() for k, v in module.state_dict().items()}

    first = trainer(tmp_path / "a", 2, callbacks=[Record()])
    first.fit(method("FixMatch", init_from=str(start)), data(camvid))
    assert same_prefix(seen[0], "net.", net_weights(supervised))
    ckpt = tmp_path / "step2.ckpt"
    first.save_checkpoint(ckpt)
    start.unlink()  # resuming must not read it (nor load it over the run's weights)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    second = trainer(tmp_path / "b", 3, callbacks=[Record()])
    second.fit(method("FixMatch", init_from=str(start)), data(camvid), ckpt_path=str(ckpt))
    assert all(torch.equal(seen[2][k], v) for k, v in saved.items())


def same_prefix(state: dict, prefix: str, weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(state[prefix + k], v) for k, v in weights.items())


def test_init_from_plain_networks_and_clear_mismatches(supervised, tmp_path):
    plain = tiny_unet(ema_decay=0.9)
    plain._ensure_ema()
    plain.initialise_from(str(supervised))
    assert same(plain.net, net_weights(supervised)) and same(
        plain.ema.module, plain.net.state_dict()
    )
    other = tmp_path / "five.ckpt"
    five = tiny_unet(num_classes=5)
    torch.save({"state_dict": five.state_dict(), "hyper_parameters": dict(five.hparams)}, other)
    linknet = tmp_path / "linknet.ckpt"
    net = LinkNet(num_classes=11, encoder="resnet18")
    torch.save({"state_dict": net.state_dict(), "hyper_parameters": {"num_classes": 11}}, linknet)
    empty, text = tmp_path / "empty.ckpt", tmp_path / "notes.txt"
    torch.save({"state_dict": {}}, empty)
    text.write_text("not a checkpoint")
    cases = {
        other: f"init_from '{other}' was trained for 5 classes but this model has 11",
        linknet: rf"init_from '{linknet}' does not fit UNetNetwork .*tensors .* missing",
        empty: f"init_from '{empty}' holds no network weights",
        text: f"init_from '{text}' (holds Python objects|cannot be read)",
        tmp_path / "gone.ckpt": "init_from .*gone.ckpt': no such file",
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as error:
            method("FixMatch").initialise_from(str(path))
        assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- the network option
def test_network_forms_and_errors():
    assert isinstance(build_network("UNet", 3), torch.nn.Module)
    short = {"class_path": "UNet", "init_args": {"encoder": "original", "base_channels": 4}}
    for spec in (short, TINY):
        net = build_network(spec, 5, in_channels=1)
        assert isinstance(net, UNetNetwork)
        assert net(torch.randn(1, 1, 17, 23)).shape == (1, 5, 17, 23)
    with pytest.raises(ConfigError, match="unknown architecture 'NoNet'"):
        build_network("NoNet", 3)
    with pytest.raises(
        ConfigError, match=r"unknown architecture 'LinkNt'\. Did you mean LinkNet\b"
    ):
        build_network({"class_path": "LinkNt"}, 3)
    with pytest.raises(ConfigError, match="FixMatch is a training method, not an architecture"):
        build_network("FixMatch", 3)
    with pytest.raises(ConfigError, match="num_classes is taken from the data"):
        build_network({"class_path": "UNet", "init_args": {"num_classes": 3}}, 3)


def size(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_cli_takes_a_method_by_short_name_and_a_short_dataset(camvid, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "m.yaml"
    config.write_text(
        "model:\n  class_path: MeanTeacher\n  init_args:\n    network:\n"
        "      class_path: UNet\n"
        "      init_args: {encoder: original, base_channels: 4}\n"
        "data:\n  class_path: SemiSupervised\n  init_args:\n    dataset: CamVid\n    labeled: 2\n"
    )
    args = ["fit", "--config", str(config), "--data.root", str(camvid), "--data.num_workers", "0"]
    args += ["--data.crop_size", "[32, 32]", "--data.batch_size", "2"]
    args += ["--trainer.fast_dev_run", "true", "--trainer.accelerator", "cpu"]
    # the short form of `network:` (as `model:` takes), the dotted path, and an import path
    for name in ("UNet", "seglight.models.UNet", "seglight.models.unet.UNet"):
        config.write_text(re.sub(r"class_path: \S*UNet", f"class_path: {name}", config.read_text()))
        cli = run(args)
        assert isinstance(cli.model, MeanTeacher) and cli.model.num_classes == 11
        assert size(cli.model.net) == size(build_network(TINY, 11))  # its init_args were used
        assert cli.trainer.global_step == 1
    config.write_text(config.read_text().replace("seglight.models.unet.UNet", "UNett"))
    with pytest.raises(
        ConfigError, match=r"unknown architecture 'UNett' \(in .*m.yaml\)\. Did you mean UNet\b"
    ):
        run(args)


def test_cli_network_options_on_the_command_line(camvid, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--model", "CPS", "--data", "SemiSupervised", "--data.dataset", "CamVid"]
    args += ["--data.labeled", "2", "--data.root", str(camvid), "--data.num_workers", "0"]
    args += ["--data.crop_size", "[32, 32]", "--data.batch_size", "2"]
    args += ["--trainer.fast_dev_run", "true", "--trainer.accelerator", "cpu"]
    for network in (
        ["--model.network", "UNet", "--model.network.init_args.encoder", "original",
         "--model.network.init_args.base_channels=4"],
        ["--model.network", "{class_path: UNet, init_args: {encoder: original, base_channels: 4}}"],
    ):  # fmt: skip
        cli = run(args + network)
        assert isinstance(cli.model, CPS) and cli.trainer.global_step == 1
        for net in cli.model.networks():
            assert size(net) == size(build_network(TINY, 11))
    with pytest.raises(ConfigError, match="unknown architecture 'Unet' .*Did you mean UNet"):
        run(args + ["--model.network", "{class_path: Unet}"])
    with pytest.raises(ConfigError, match="give the architecture first"):
        run(args + ["--model.network.init_args.encoder", "original"])


# ----------------------------------------------------------------------------- views
def test_photometric_jitter_is_per_image_and_off_when_asked():
    torch.manual_seed(0)
    image = torch.randn(4, 3, 16, 16).clamp(-1.5, 1.5)
    off = photometric_jitter(image, p=0.0, hue=0.0, grayscale_p=0.0, blur_p=0.0)
    assert torch.allclose(off, image, atol=1e-4)
    on = photometric_jitter(image, p=1.0)
    assert on.shape == image.shape and not torch.allclose(on, image, atol=1e-2)
    gray = photometric_jitter(image, p=0.0, hue=0.0, grayscale_p=1.0, blur_p=0.0)
    pixels = gray * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = pixels + torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-4)  # R = G = B
    one_channel = torch.randn(2, 1, 8, 8)
    assert photometric_jitter(one_channel) is one_channel


def test_photometric_jitter_hue_range_is_torchvisions():
    # UniMatch dataset/semi.py: ColorJitter(0.5, 0.5, 0.5, 0.25); torchvision's hue factor 0.25
    # is a quarter of the hue circle: shifts up to +-90 degrees
    torch.manual_seed(0)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    rgb = torch.tensor([130.0, 120.0, 118.0]) / 255  # low chroma: no clamping after rotation
    image = ((rgb - mean) / std).view(1, 3, 1, 1).expand(4000, 3, 1, 1)
    out = photometric_jitter(
        image, p=1.0, brightness=0, contrast=0, saturation=0, hue=0.25, grayscale_p=0, blur_p=0
    )

    def hue_angle(x: torch.Tensor) -> torch.Tensor:  # YIQ chroma angle, degrees
        r, g, b = (x * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)).unbind(1)
        i, q = 0.596 * r - 0.274 * g - 0.322 * b, 0.211 * r - 0.523 * g + 0.312 * b
        return torch.rad2deg(torch.atan2(q, i)).flatten()

    shift = (hue_angle(out) - hue_angle(image) + 180) % 360 - 180
    assert 85 < shift.abs().max() <= 90.5 and shift.min() < -85 and shift.max() > 85


def test_cutmix_boxes_classmix_and_mixing():
    torch.manual_seed(0)
    boxes = cutmix_boxes(64, (40, 50), p=1.0)
    area = boxes.float().mean((1, 2))
    assert (area > 0.005).all() and (area < 0.45).all()
    for box in boxes:  # one axis-aligned rectangle
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        assert box.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert not cutmix_boxes(8, (10, 10), p=0.0).any()
    labels = torch.tensor([[[0, 1], [2, 255]]])
    masks = classmix_masks(labels)
    assert masks.sum() == 2 and not masks[0, 1, 1]  # 2 of the 3 classes, never the ignore
    a, b = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    where = torch.tensor([[[True, False], [False, False]]])
    assert mix(where, b, a)[0, :, 0, 0].eq(1).all() and mix(where, b, a).sum() == 3


def test_schedules():
    assert sigmoid_rampup(0, 100) == pytest.approx(torch.exp(torch.tensor(-5.0)).item())
    assert sigmoid_rampup(100, 100) == sigmoid_rampup(500, 100) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
    model = method("FixMatch")
    assert model.after(0) and not model.after(1)


# ----------------------------------------------------------------------------- DDP
@pytest.mark.slow  # two processes: 30 s on an idle 2-core machine, minutes on a busy one
def test_ddp_on_two_processes(camvid, tmp_path):
    config = tmp_path / "cps.yaml"
    config.write_text(
        "model:\n  class_path: CPS\n  init_args:\n    network: {class_path: seglight.models.UNet, "
        "init_args: {encoder: original, base_channels: 4}}\n"
        "data:\n  class_path: SemiSupervised\n  init_args:\n"
        "    dataset: {class_path: CamVid, init_args: {crop_size: [32, 32]}}\n    labeled: 2\n"
    )
    run_dir = tmp_path / "run"
    run_cli(
        ["fit", "--config", str(config), "--data.root", str(camvid), "--data.num_workers", "0",
         "--data.batch_size", "1", "--trainer.strategy", "ddp", "--trainer.devices", "2",
         "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run_dir)],
        cwd=tmp_path, env={"WANDB_MODE": "disabled"},
    )  # fmt: skip
    # 4 unlabelled images, 1 per batch on 2 ranks: 2 steps; one record of the labelled choice
    (path,) = run_dir.rglob("*.ckpt")  # no defaults.yaml here: Lightning's own checkpoint
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert len((run_dir / "labeled.txt").read_text().splitlines()) == 3
    assert json.loads((run_dir / "metrics.json").read_text())["val"]["mIoU"] is not None


DDP_SCRIPT = """
import sys
from pathlib import Path

import lightning as L
import torch

from seglight.data import CamVid, SemiSupervised
import seglight.methods  # noqa: F401  (registers the methods)
from seglight.models import MODELS

name, root, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
net = {"class_path": "UNet", "init_args": {"encoder": "original", "base_channels": 4}}
options = {
    "AdvSemiSeg": {"d_channels": 8, "semi_start": 1, "semi_threshold": 0.0},
    "GANSemiSeg": {"image_size": (32, 32), "g_channels": 8},
    "MeanTeacher": {"ema_decay": 0.9, "rampup_steps": 0},
}[name]
L.seed_everything(0)
model = MODELS[name](num_classes=11, network=net, **options)
camvid = CamVid(root=root, crop_size=(32, 32), batch_size=1, num_workers=0)
trainer = L.Trainer(
    max_steps=2, accelerator="cpu", devices=2, strategy="ddp", logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(out),
)
start = {k: v.detach().clone() for k, v in model.named_parameters()}
trainer.fit(model, SemiSupervised(camvid, labeled=2))
params = {k: v.detach() for k, v in model.named_parameters()}  # the teacher's too (ema.)
torch.save({"step": trainer.global_step, "params": params, "start": start},
           out / f"rank{trainer.global_rank}.pt")
"""


@pytest.mark.slow  # 30-70 s each (two processes) on a 2-core machine
@pytest.mark.parametrize("name", ["AdvSemiSeg", "GANSemiSeg", "MeanTeacher"])
def test_ddp_keeps_every_player_identical_across_ranks(name, camvid, tmp_path):
    """Manual optimisation with two optimisers (AdvSemiSeg's discriminator, GANSemiSeg's
    generator) and a teacher under DDP on 2 CPU processes: each rank trains on its own batches,
    yet every parameter (network, second player, EMA teacher) ends identical on both ranks, and
    every player moved."""
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(seglight.__file__).parents[1]), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [sys.executable, str(script), name, str(camvid), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["step"] for r in ranks] == [2, 2]
    first, second = (r["params"] for r in ranks)
    assert first.keys() == second.keys()
    differ = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differ, f"{name}: parameters differ across ranks: {differ[:5]}"
    players = {"AdvSemiSeg": "discriminator.", "GANSemiSeg": "generator.", "MeanTeacher": "ema."}
    for prefix in ("net.", players[name]):
        keys = [k for k in first if k.startswith(prefix)]
        start = ranks[0]["start"]
        # the teacher is made at fit start, a copy of the network's initial weights
        initial = [start.get(k, start.get(k.replace("ema.module.", "net."))) for k in keys]
        assert keys and any(
            not torch.equal(first[k], v) for k, v in zip(keys, initial, strict=True)
        ), f"{prefix} did not train"
