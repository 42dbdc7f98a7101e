"""Inference recipes: sliding window, multi-scale and flip TTA against models whose exact
equivariances make the answer known, the model's `inference` option, and `predict` writing masks
and overlays for a folder of images through the real CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO, make_fake_camvid
from PIL import Image
from torch import nn

from seglight.errors import ConfigError
from seglight.inference import (
    InferenceConfig,
    gaussian_weights,
    infer,
    predict_probs,
    sliding_window,
    window_starts,
)
from seglight.models import UNet


def conv1x1(in_channels=3, classes=4, seed=0) -> nn.Conv2d:
    """Pointwise: exactly equivariant to translations (and so to cropping)."""
    torch.manual_seed(seed)
    return nn.Conv2d(in_channels, classes, 1).eval()


def plain(net, x):
    with torch.no_grad():
        return net(x).softmax(1)


class Recorder(nn.Module):
    """Wraps a network and records the input sizes it sees."""

    def __init__(self, net):
        super().__init__()
        self.net, self.sizes = net, []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.net(x)


def test_window_starts_cover_the_image_flush_with_the_end():
    assert window_starts(10, 10, 5) == [0]
    assert window_starts(8, 10, 5) == [0]
    assert window_starts(25, 10, 6) == [0, 6, 12, 15]
    for length, window, stride in [(97, 32, 21), (64, 32, 32), (33, 32, 1)]:
        starts = window_starts(length, window, stride)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s : s + window] = True
        assert covered.all() and starts[-1] == length - window


def test_gaussian_weights_peak_in_the_centre_and_stay_positive():
    w = gaussian_weights((9, 12))
    assert w.shape == (9, 12) and w.max() == 1.0 and w.min() > 0
    assert w[4, 5:7].min() == w.max() and w[0, 0] == w.min()


def test_sliding_window_over_an_input_that_fits_one_window_is_plain_inference():
    net = UNet(num_classes=4, encoder="original", base_channels=4).net.eval()
    x = torch.randn(2, 3, 32, 40)
    recorder = Recorder(net)
    with torch.no_grad():
        out = sliding_window(recorder, x, (32, 40), overlap=0.5, blend="gaussian")
    assert recorder.sizes == [(32, 40)]
    assert torch.allclose(out, plain(net, x), atol=1e-6)


@pytest.mark.parametrize("blend", ["gaussian", "uniform"])
@pytest.mark.parametrize("size", [(50, 70), (20, 70), (13, 9)])
def test_sliding_window_of_a_translation_equivariant_model_is_plain_inference(blend, size):
    net = conv1x1()
    x = torch.randn(2, 3, *size)
    recorder = Recorder(net)
    with torch.no_grad():
        out = sliding_window(recorder, x, (16, 24), overlap=0.33, blend=blend)
    assert out.shape == (2, 4, *size)
    assert torch.allclose(out, plain(net, x), atol=1e-5)
    # really windows of the requested size (images smaller than the window are padded)
    assert set(recorder.sizes) == {(16, 24)}
    assert len(recorder.sizes) == len(window_starts(max(size[0], 16), 16, 10)) * len(
        window_starts(max(size[1], 24), 24, 16)
    )


def test_sliding_window_blends_windows_by_their_weights():
    """A model whose output depends on the window's position: overlapping pixels are the weighted
    average of the windows covering them."""

    class WindowMean(nn.Module):  # every pixel gets the window's mean of channel 0 as logit
        def forward(self, x):
            m = x[:, :1].mean((2, 3), keepdim=True).expand(-1, 1, *x.shape[-2:])
            return torch.cat([m, torch.zeros_like(m)], 1)

    x = torch.arange(12.0).view(1, 1, 1, 12).expand(1, 1, 4, 12).contiguous()
    out = sliding_window(WindowMean(), x, (4, 8), overlap=0.5, blend="uniform")
    # windows at 0 and 4 (stride 4): means 3.5 and 7.5; columns 4..7 see both
    p = lambda v: torch.sigmoid(torch.tensor(v))  # noqa: E731 - softmax of (v, 0)
    assert torch.allclose(out[0, 0, 0, :4], p(3.5).expand(4))
    assert torch.allclose(out[0, 0, 0, 4:8], ((p(3.5) + p(7.5)) / 2).expand(4))
    assert torch.allclose(out[0, 0, 0, 8:], p(7.5).expand(4))


def test_flip_tta_of_a_flip_equivariant_model_is_plain_inference():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 5, padding=2)
    with torch.no_grad():  # mirror-symmetric kernels: f(flip x) = flip f(x)
        conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    net = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    x = torch.randn(2, 3, 17, 23)
    recorder = Recorder(net)
    with torch.no_grad():
        out = predict_probs(recorder, x, InferenceConfig(flip=True))
    assert len(recorder.sizes) == 2
    assert torch.allclose(out, plain(net, x), atol=1e-6)


def test_flip_tta_averages_the_flipped_back_prediction():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)).eval()
    x = torch.randn(1, 3, 11, 14)
    with torch.no_grad():
        out = predict_probs(net, x, InferenceConfig(flip=True))
        expected = (net(x).softmax(1) + net(x.flip(-1)).softmax(1).flip(-1)) / 2
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, plain(net, x), atol=1e-3)  # the model is not symmetric


def test_multi_scale_of_a_scale_invariant_model_is_plain_inference():
    """A pointwise model on an image of one colour per channel gives the same probabilities at
    every scale; the passes really run at the scaled sizes."""
    net = conv1x1()
    x = torch.randn(2, 3, 1, 1).expand(2, 3, 30, 40).contiguous()
    recorder = Recorder(net)
    config = InferenceConfig(scales=[0.5, 0.75, 1.0, 1.75], flip=True)
    with torch.no_grad():
        out = predict_probs(recorder, x, config)
    assert sorted(set(recorder.sizes)) == [(15, 20), (22, 30), (30, 40), (52, 70)]
    assert len(recorder.sizes) == 8
    assert torch.allclose(out, plain(net, x), atol=1e-6)


def test_multi_scale_with_slide_mode_of_a_pointwise_model():
    net = conv1x1()
    x = torch.randn(1, 3, 1, 1).expand(1, 3, 40, 50).contiguous()
    config = InferenceConfig(mode="slide", window=(16, 16), scales=[0.5, 1.5], flip=True)
    with torch.no_grad():
        assert torch.allclose(predict_probs(net, x, config), plain(net, x), atol=1e-6)


def test_inference_config_validation():
    with pytest.raises(ConfigError, match="mode slide needs inference.window"):
        InferenceConfig(mode="slide")
    with pytest.raises(ConfigError, match="overlap must be in"):
        InferenceConfig(overlap=1.0)
    with pytest.raises(ConfigError, match="scales must be positive"):
        InferenceConfig(scales=[0.0])
    with pytest.raises(ConfigError, match="unknown option"):
        InferenceConfig.from_any({"flipp": True})
    assert InferenceConfig().is_plain and not InferenceConfig(flip=True).is_plain
    with pytest.raises(ConfigError, match="needs the RGB images"):
        infer(conv1x1(), torch.randn(1, 3, 4, 4), InferenceConfig(crf="conv"))


def test_model_option_applies_to_test_and_predict_but_not_fit_validation_unless_asked():
    model = UNet(num_classes=4, encoder="original", base_channels=4, inference={"flip": True})
    model.eval()
    batch = {"image": torch.randn(1, 3, 16, 20), "mask": torch.zeros(1, 16, 20, dtype=torch.long)}
    with torch.no_grad():
        scores = model.predict_scores(batch, "test")
        expected = (
            model(batch["image"]).softmax(1) + model(batch["image"].flip(-1)).softmax(1).flip(-1)
        ) / 2
        assert torch.allclose(scores.exp(), expected, atol=1e-5)

        class FitState:  # what the model reads of a trainer during fit's validation
            class state:
                fn = "fit"

        model._trainer = FitState()
        assert torch.equal(model.predict_scores(batch, "val"), model(batch["image"]))
        model.inference.during_fit = True
        assert torch.allclose(model.predict_scores(batch, "val").exp(), expected, atol=1e-5)
        model._trainer = None
    # not a hyperparameter: a checkpoint does not override the recipe asked for at test time
    assert "inference" not in model.hparams


# ------------------------------------------------------------------------------- the CLI
def _cli(subcommand: str, *args: str):
    """`python -m seglight SUBCOMMAND` in-process on experiments/unet.yaml, a tiny original U-Net."""
    from seglight.cli import run

    return run(
        [
            subcommand,
            "--config", str(REPO / "experiments" / "unet.yaml"),
            "--model.encoder", "original",
            "--model.base_channels", "4",
            "--model.warmup_steps", "0",
            "--data.num_workers", "0",
            "--data.batch_size", "2",
            "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
            *args,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    root = make_fake_camvid(work / "camvid", {"train": 4, "val": 2, "test": 2}, size=(24, 32))
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    mp.setenv("WANDB_MODE", "disabled")
    try:
        _cli(
            "fit", "--data.root", str(root), "--data.crop_size", "[16, 16]",
            "--trainer.max_epochs", "1",
        )  # fmt: skip
    finally:
        mp.undo()
    ckpt = work / "runs" / "unet" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return work, root, ckpt


def test_test_command_with_flip_and_sliding_window(trained_run, tmp_path, monkeypatch):
    work, root, ckpt = trained_run
    monkeypatch.chdir(work)
    out = tmp_path / "eval"
    cli = _cli(
        "test", "--data.root", str(root), "--ckpt_path", str(ckpt),
        "--trainer.default_root_dir", str(out),
        "--model.inference.flip", "true", "--model.inference.mode", "slide",
        "--model.inference.window", "[16, 16]", "--model.inference.scales", "[0.75, 1.0]",
    )  # fmt: skip
    cfg = cli.model.inference
    assert cfg.flip and cfg.mode == "slide" and cfg.window == (16, 16) and cfg.scales == [0.75, 1.0]
    evaluations = json.loads((out / "metrics.json").read_text())["evaluations"]
    reported = [e for e in evaluations if e["stage"] == "test"][-1]["metrics"]
    # independent count with the same recipe, run by hand
    from seglight.data import CamVid

    model = UNet.load_from_checkpoint(ckpt, map_location="cpu").eval()
    dm = CamVid(root=str(root), num_workers=0)
    dm.setup("test")
    correct = total = 0
    with torch.no_grad():
        for i in range(len(dm.datasets["test"])):
            sample = dm.datasets["test"][i]
            probs = predict_probs(model, sample["image"][None], cfg)[0]
            keep = sample["mask"] != 255
            correct += int((probs.argmax(0) == sample["mask"])[keep].sum())
            total += int(keep.sum())
    assert reported["acc"] == pytest.approx(correct / total, abs=1e-6)


def test_predict_a_folder_of_images_writes_masks_and_overlays(trained_run, tmp_path, monkeypatch):
    work, _, ckpt = trained_run
    monkeypatch.chdir(work)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a": (20, 28), "b": (25, 17), "c": (24, 32), "d": (24, 32)}  # c, d: one batch
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            photos / f"{name}.jpg"
        )
    (photos / "notes.txt").write_text("not an image")
    out = tmp_path / "pred"
    _cli(
        "predict", "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(out),
        "--data", "Images", "--data.root", str(photos), "--data.like", "CamVid",
        "--model.inference.flip", "true",
    )  # fmt: skip
    written = sorted(p.stem for p in (out / "predictions_1").glob("*.png"))
    assert written == ["a", "b", "c", "d"]
    model = UNet.load_from_checkpoint(ckpt, map_location="cpu").eval()
    from seglight.data.base import read_image
    from seglight.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize

    for name, (h, w) in sizes.items():
        with Image.open(out / "predictions_1" / f"{name}.png") as im:
            assert im.mode == "P" and im.size == (w, h)
            assert im.getpalette()[3 * 3 : 3 * 4] == [128, 64, 128]  # CamVid's Road colour
            mask = np.array(im)
        assert set(np.unique(mask)) <= set(range(11))
        image = normalize(read_image(photos / f"{name}.jpg"), IMAGENET_MEAN, IMAGENET_STD)
        with torch.no_grad():
            expected = predict_probs(model, image[None], InferenceConfig(flip=True))[0].argmax(0)
        assert (torch.from_numpy(mask).long() == expected).float().mean() > 0.99
        with Image.open(out / "predictions_1" / "overlays" / f"{name}.jpg") as ov:
            # the image beside its prediction, a legend of the classes shown below them
            assert ov.width == 2 * w and ov.height > h
            left = np.asarray(ov)[:h, :w].astype(int)
        original = np.asarray(Image.open(photos / f"{name}.jpg")).astype(int)
        assert np.abs(left - original).mean() < 12  # the left half is the image (JPEG twice)


def test_images_datamodule_errors(tmp_path):
    from seglight.inference import Images

    with pytest.raises(ConfigError, match="needs the classes"):
        Images(root=str(tmp_path))
    with pytest.raises(ConfigError, match="like='CamVidd' is not a dataset"):
        Images(root=str(tmp_path), like="CamVidd")
    dm = Images(root=str(tmp_path), class_names=["a", "b"])
    from seglight.errors import DataError

    with pytest.raises(DataError, match="no images"):
        dm.setup("predict")
    with pytest.raises(DataError, match="serves predict only"):
        dm.setup("fit")


def test_overlay_is_image_beside_blend():
    from seglight.inference import overlay

    image = torch.full((3, 2, 3), 100, dtype=torch.uint8)
    colours = torch.full((3, 2, 3), 200, dtype=torch.uint8)
    out = overlay(image, colours, alpha=0.5)
    assert out.shape == (3, 2, 6)
    assert out[:, :, :3].eq(100).all() and out[:, :, 3:].eq(150).all()


def test_predict_on_a_dataset_split_writes_overlays_beside_masks(
    trained_run, tmp_path, monkeypatch
):
    work, root, ckpt = trained_run
    monkeypatch.chdir(work)
    out = tmp_path / "pred"
    _cli(
        "predict", "--data.root", str(root), "--ckpt_path", str(ckpt),
        "--trainer.default_root_dir", str(out),
    )  # fmt: skip
    masks = sorted(p.stem for p in (out / "predictions_1").glob("*.png"))
    overlays = sorted(p.stem for p in (out / "predictions_1" / "overlays").glob("*.jpg"))
    assert masks == overlays == sorted(p.stem for p in (root / "test").iterdir())
    with Image.open(out / "predictions_1" / "overlays" / f"{overlays[0]}.jpg") as ov:
        assert ov.width == 64 and ov.height > 24  # image | prediction, legend below


def test_same_size_batch_sampler_groups_by_size_in_order():
    from seglight.inference import SameSizeBatchSampler

    sizes = ["a", "b", "a", "a", "b", "c", "a"]
    sampler = SameSizeBatchSampler(range(7), 2, False, sizes)
    batches = list(sampler)
    assert batches == [[0, 2], [1, 4], [3, 6], [5]]
    assert len(sampler) == 4
    assert sorted(i for b in batches for i in b) == list(range(7))
    dropping = SameSizeBatchSampler(range(7), 3, True, sizes)
    assert list(dropping) == [[0, 2, 3]] and len(dropping) == 1
