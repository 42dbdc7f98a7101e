"""Every registered architecture: logits at the input size for odd sizes, an initial loss near
ln(num_classes), backward to every parameter, train and eval modes, other input channel counts.
New architectures are covered by registering them; these tests need no edit."""

from __future__ import annotations

import math

import pytest
import torch

from seglight.models import MODELS, UNet, UNetNetwork

SIZES = [(1, 97, 131), (2, 64, 64)]


def build(name: str, num_classes: int = 5, in_channels: int = 3):
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("batch,h,w", SIZES)
def test_logits_at_input_size_and_backward_reaches_every_parameter(name, batch, h, w):
    if MODELS[name].instance_model:
        # its loss comes from instance targets, not logits and a mask (Mask R-CNN: its RPN and
        # box regression reach the semantic map only through non-differentiable box selection);
        # its training, and its logits at odd sizes, are tested in tests/test_maskrcnn.py, and
        # its eval-mode logits by test_other_input_channels below
        pytest.skip(f"{name} is an instance model (instance_model = True)")
    torch.manual_seed(0)
    model = build(name).train()
    # timm's ResNets start the last BatchNorm scale of each block at zero (a good init for
    # training), which gives the layers inside the block exactly zero gradient at step 0; move the
    # scales off zero so the check asks "is this parameter connected to the loss?"
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    # likewise a zero-initialised weight matrix (Deformable DETR's sampling offsets and attention
    # weights, from the query) passes no gradient to what feeds it at step 0
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                torch.nn.init.normal_(p, std=0.01)
    x = torch.randn(batch, 3, h, w)
    out = model.net(x)
    logits = out["out"] if isinstance(out, dict) else out
    # the network may have outputs beyond the classes (GANSemiSeg's "fake"): compute_loss and
    # forward() see the classes
    assert logits.shape[0] == batch and logits.shape[2:] == (h, w)
    mask = torch.randint(0, 5, (batch, h, w))
    # the initial loss is near ln(num_classes): no init that inflates the logits (a ReLU-gain He
    # init of a classifier, or fan-out on narrow layers, started at a loss of 7-30)
    initial = torch.nn.functional.cross_entropy(logits[:, :5].detach(), mask)
    if model.trains_on_logits:
        assert initial < 1.5 * math.log(5), (
            f"initial loss {initial:.2f} vs ln 5 = {math.log(5):.2f}"
        )
    loss = model.compute_loss(out, mask)
    loss.backward()
    # the segmentation network's parameters (a training method's other parts, such as CPS's
    # second network or a discriminator, are trained by its own losses)
    no_grad = [
        n
        for n, p in model.net.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (batch, 5, h, w)


# an instance model's defaults (Mask R-CNN: 800-pixel images, 1000 RoIs through a 4-conv box
# head) take tens of seconds on a CPU: slow here; tests/test_maskrcnn.py checks the same contract
# in the default run on a small configuration
CHANNEL_CASES = [
    pytest.param(n, marks=pytest.mark.slow) if MODELS[n].instance_model else n
    for n in sorted(MODELS)
]


@pytest.mark.parametrize("name", CHANNEL_CASES)
def test_other_input_channels(name):
    model = build(name, num_classes=3, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 45, 61)).shape == (1, 3, 45, 61)


def test_original_unet_matches_the_paper():
    net = UNetNetwork(num_classes=2, encoder="original", norm=False)
    # Ronneberger et al.: 64..1024 channels, 4 poolings, ~31M parameters
    assert net.encoder.channels == [64, 128, 256, 512, 1024]
    assert 30.5e6 < sum(p.numel() for p in net.parameters()) < 31.5e6
    assert isinstance(net.decoder.blocks[0].up, torch.nn.ConvTranspose2d)


@pytest.mark.parametrize("upsampling", ["transpose", "nearest", "bilinear"])
@pytest.mark.parametrize("encoder", ["original", "resnet18"])
def test_unet_variants_odd_sizes(encoder, upsampling):
    net = UNetNetwork(3, encoder=encoder, base_channels=8, upsampling=upsampling).eval()
    with torch.no_grad():
        for h, w in [(33, 47), (1 + 32, 1 + 64), (17, 9)]:
            assert net(torch.randn(1, 3, h, w)).shape == (1, 3, h, w)


def test_timm_encoder_matches_smp_parameter_count():
    # segmentation_models_pytorch's Unet(resnet34, classes=11): 24,436,369 + a 3x3 head; ours uses
    # a 1x1 head: the same network otherwise
    net = UNetNetwork(11, encoder="resnet34")
    assert sum(p.numel() for p in net.parameters()) == 24_436_411


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="unknown timm encoder 'resnet999'"):
        UNet(num_classes=3, encoder="resnet999")
    with pytest.raises(ValueError, match="decoder_channels needs at least 4"):
        UNet(num_classes=3, decoder_channels=[32, 16])
    with pytest.raises(ValueError, match="no pretrained weights"):
        UNet(num_classes=3, encoder_weights="imagenet")
    with pytest.raises(ValueError, match="2 class_names given for num_classes=3"):
        UNet(num_classes=3, class_names=["a", "b"])


def test_network_is_usable_without_lightning():
    net = UNetNetwork(4, encoder="original", base_channels=4)
    assert not hasattr(net, "trainer")
    assert net(torch.randn(1, 3, 20, 20)).shape == (1, 4, 20, 20)
