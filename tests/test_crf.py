"""CRF post-processing: ConvCRF against a brute-force mean-field loop, both CRFs as the identity
when their pairwise terms are off, and both cleaning up noisy predictions along colour edges."""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest
import torch

from seglight.crf import CONV_CRF_DEFAULTS, DENSE_CRF_DEFAULTS, apply_crf, conv_crf, dense_crf
from seglight.errors import ConfigError


def noisy_two_regions(seed=0, h=24, w=32, batch=1, flip=0.2):
    """Left half black / class 0, right half white / class 1; probabilities 0.7 for the true
    class, with a fraction `flip` of the pixels wrongly favouring the other class."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(batch, h, w, dtype=torch.long)
    truth[..., w // 2 :] = 1
    image = (truth * 255).to(torch.uint8)[:, None].expand(batch, 3, h, w).contiguous()
    wrong = torch.rand(batch, h, w, generator=g) < flip
    favoured = torch.where(wrong, 1 - truth, truth)
    probs = torch.full((batch, 2, h, w), 0.3)
    probs.scatter_(1, favoured[:, None], 0.7)
    return probs, image, truth


def brute_force_conv_crf(probs, image, iterations, window, pos_w, pos_xy_std, bi_w, bi_xy_std,
                         bi_rgb_std, weight):  # fmt: skip
    """Mean-field loop over pixels and their window neighbours, straight from the definitions."""
    p = probs[0].double().numpy()
    rgb = image[0].double().numpy()
    k, h, w = p.shape
    unary = np.log(np.clip(p, 1e-8, None))
    q = p.copy()
    r = window // 2
    for _ in range(iterations):
        message = np.zeros_like(q)
        for y, x in itertools.product(range(h), range(w)):
            for dy, dx in itertools.product(range(-r, r + 1), repeat=2):
                j, i = y + dy, x + dx
                if (dy, dx) == (0, 0) or not (0 <= j < h and 0 <= i < w):
                    continue
                d2 = dy * dy + dx * dx
                c2 = ((rgb[:, y, x] - rgb[:, j, i]) ** 2).sum()
                kernel = pos_w * math.exp(-d2 / (2 * pos_xy_std**2)) + bi_w * math.exp(
                    -d2 / (2 * bi_xy_std**2) - c2 / (2 * bi_rgb_std**2)
                )
                message[:, y, x] += kernel * q[:, j, i]
        logits = (1 - weight) * unary + weight * message
        q = np.exp(logits - logits.max(0))
        q /= q.sum(0)
    return torch.from_numpy(q)[None]


def test_conv_crf_matches_brute_force_mean_field():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(1, 3, 6, 7, generator=g).softmax(1)
    image = torch.randint(0, 256, (1, 3, 6, 7), generator=g, dtype=torch.uint8)
    params = dict(iterations=3, window=5, pos_w=3.0, pos_xy_std=1.5, bi_w=5.0, bi_xy_std=4.0,
                  bi_rgb_std=60.0, weight=0.3)  # fmt: skip
    ours = conv_crf(probs, image, downsample=1, **params)
    reference = brute_force_conv_crf(probs, image, **params)
    assert torch.allclose(ours.double(), reference, atol=1e-5)


def test_conv_crf_without_pairwise_terms_is_the_identity():
    probs, image, _ = noisy_two_regions()
    out = conv_crf(probs, image, weight=0.0)
    assert torch.allclose(out, probs, atol=1e-6)


@pytest.mark.parametrize("downsample", [1, 2, 4])
def test_conv_crf_cleans_noise_along_colour_edges(downsample):
    probs, image, truth = noisy_two_regions(batch=2)
    before = (probs.argmax(1) == truth).float().mean()
    out = conv_crf(probs, image, downsample=downsample, weight=0.5)
    after = (out.argmax(1) == truth).float().mean()
    assert out.shape == probs.shape and torch.allclose(out.sum(1), torch.ones(2, 24, 32))
    assert before < 0.85 and after > 0.99


def test_conv_crf_is_batched_per_image_and_handles_odd_sizes():
    g = torch.Generator().manual_seed(2)
    probs = torch.rand(3, 4, 19, 23, generator=g).softmax(1)
    image = torch.randint(0, 256, (3, 3, 19, 23), generator=g, dtype=torch.uint8)
    batched = conv_crf(probs, image, downsample=4)
    for i in range(3):
        alone = conv_crf(probs[i : i + 1], image[i : i + 1], downsample=4)
        assert torch.allclose(batched[i : i + 1], alone, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_conv_crf_runs_on_the_gpu_like_on_the_cpu():
    probs, image, _ = noisy_two_regions(batch=2, h=96, w=128)
    cpu = conv_crf(probs, image)
    gpu = conv_crf(probs.cuda(), image.cuda())
    assert gpu.is_cuda and torch.allclose(gpu.cpu(), cpu, atol=1e-4)


def test_crf_options_are_checked():
    probs, image, _ = noisy_two_regions()
    with pytest.raises(ConfigError, match="unknown option"):
        apply_crf("conv", probs, image, {"iters": 3})
    with pytest.raises(ConfigError, match="unknown CRF 'crf'"):
        apply_crf("crf", probs, image)
    with pytest.raises(ConfigError, match="window must be odd"):
        conv_crf(probs, image, window=4)
    assert set(CONV_CRF_DEFAULTS) >= {"iterations", "window", "downsample"}


def test_dense_crf_without_pydensecrf_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    probs, image, _ = noisy_two_regions()
    with pytest.raises(ConfigError, match=r"pip install pydensecrf2"):
        dense_crf(probs, image)


def test_dense_crf_defaults_are_deeplabs():
    assert DENSE_CRF_DEFAULTS == {
        "iterations": 10, "bi_w": 4.0, "bi_xy_std": 49.0, "bi_rgb_std": 5.0,
        "pos_w": 3.0, "pos_xy_std": 3.0,
    }  # fmt: skip


def test_dense_crf_without_pairwise_terms_is_the_identity():
    pytest.importorskip("pydensecrf.densecrf")
    probs, image, _ = noisy_two_regions()
    out = dense_crf(probs, image, bi_w=0.0, pos_w=0.0)
    assert torch.allclose(out, probs, atol=1e-5)


def test_dense_crf_cleans_noise_along_colour_edges():
    pytest.importorskip("pydensecrf.densecrf")
    probs, image, truth = noisy_two_regions(batch=2)
    out = apply_crf("dense", probs, image)
    assert out.shape == probs.shape and torch.allclose(out.sum(1), torch.ones(2, 24, 32), atol=1e-4)
    assert (probs.argmax(1) == truth).float().mean() < 0.85
    assert (out.argmax(1) == truth).float().mean() > 0.99


@pytest.mark.parametrize("crf", ["conv", "dense"])
def test_model_inference_option_runs_the_crf_on_the_denormalised_image(crf):
    if crf == "dense":
        pytest.importorskip("pydensecrf.densecrf")
    from seglight.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
    from seglight.models import UNet

    model = UNet(num_classes=2, encoder="original", base_channels=4, inference={"crf": crf}).eval()
    probs, image, _ = noisy_two_regions()

    class Noisy(torch.nn.Module):  # a stand-in network: the noisy probabilities' logits
        def forward(self, x):
            return probs.log()

    model.net = Noisy()
    batch = {"image": normalize(image, IMAGENET_MEAN, IMAGENET_STD), "mask": torch.zeros(1, 24, 32)}
    with torch.no_grad():
        scores = model.predict_scores(batch, "test")
    assert torch.allclose(scores.exp(), apply_crf(crf, probs, image), atol=1e-4)
