"""Context-module architectures: PSPNet, DeepLabv3, DeepLabv3+ and KSAC, and their shared blocks
(seglight.nn.context). Generic checks (shapes, backward, channels) are in test_models.py; here:
what makes each architecture the paper's. Small encoders (resnet18) and inputs keep it fast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seglight.errors import ConfigError
from seglight.models import KSAC, DeepLabV3, DeepLabV3Plus, PSPNet
from seglight.models.deeplabv3 import DeepLabV3Network, DeepLabV3PlusNetwork
from seglight.models.pspnet import PSPNetNetwork
from seglight.nn.context import (
    ASPP,
    CONTEXTS,
    KernelSharingASPP,
    PoolingBranch,
    PyramidPooling,
    SeparableConv2d,
)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bn(channels: int) -> int:
    return 2 * channels  # weight and bias


# ------------------------------------------------------------------------------------ KSAC vs ASPP
def test_ksac_kernel_does_not_grow_with_rates_but_aspp_kernels_do():
    c_in, c = 64, 32
    ksac3, ksac4 = (KernelSharingASPP(c_in, c, r) for r in [(6, 12, 18), (6, 12, 18, 24)])
    aspp3, aspp4 = (ASPP(c_in, c, r) for r in [(6, 12, 18), (6, 12, 18, 24)])
    # one 3x3 kernel whatever the number of rates
    assert ksac3.atrous.weight.shape == ksac4.atrous.weight.shape == (c, c_in, 3, 3)
    assert count(ksac3.atrous) - bn(c) * 3 == count(ksac4.atrous) - bn(c) * 4 == c * c_in * 9
    # a rate adds its BN and its slice of the 1x1 projection, independent of the input width...
    assert count(ksac4) - count(ksac3) == bn(c) + c * c
    # ...where ASPP adds a whole 3x3 kernel
    assert count(aspp4) - count(aspp3) == c * c_in * 9 + bn(c) + c * c


def test_ksac_kernel_is_applied_at_every_rate():
    torch.manual_seed(0)
    ksac = KernelSharingASPP(4, 3, (1, 2)).eval()
    x = torch.randn(1, 4, 9, 9)
    outs = ksac.atrous(x)
    for rate, out, norm in zip((1, 2), outs, ksac.atrous.norms, strict=True):
        expected = F.conv2d(x, ksac.atrous.weight, padding=rate, dilation=rate)
        expected = (expected - norm.running_mean[:, None, None]) / torch.sqrt(
            norm.running_var[:, None, None] + norm.eps
        )
        torch.testing.assert_close(out, expected.relu())
    assert not torch.allclose(outs[0], outs[1])  # different receptive fields, same kernel


def test_ksac_saves_the_papers_parameters_against_deeplabv3plus():
    # the paper: "about 10M parameters saved" with Xception-65 (2048-channel features)
    plus = DeepLabV3PlusNetwork(11, encoder="resnet50")
    ksac = KSAC(num_classes=11).net
    assert count(plus) - count(ksac) == 2 * 2048 * 256 * 9  # 9.44M
    assert type(ksac) is DeepLabV3PlusNetwork and isinstance(ksac.context, KernelSharingASPP)


# ------------------------------------------------------------------------------------ DeepLab
@pytest.mark.parametrize(
    "output_stride,rates", [(16, (6, 12, 18)), (8, (12, 24, 36)), (32, (3, 6, 9))]
)
@pytest.mark.parametrize("context", ["aspp", "ksac"])
def test_atrous_rates_follow_the_output_stride(output_stride, rates, context):
    net = DeepLabV3Network(3, encoder="resnet18", output_stride=output_stride, context=context)
    assert net.context.rates == rates
    if context == "aspp":  # the dilation of each 3x3 branch's conv
        assert tuple(branch[0].dilation[0] for branch in net.context.atrous) == rates
    with torch.no_grad():
        features = net.encoder(torch.randn(1, 3, 64, 96))[-1]
    assert features.shape[-2:] == (64 // output_stride, 96 // output_stride)


def test_deeplab_heads_have_the_papers_structure():
    # DeepLabv3 Sec. 3.3: 1x1 + three 3x3 (rates 6/12/18) + image pooling, 256 channels with BN,
    # concat -> 1x1 conv 256; DeepLabv3+ Sec. 4.1: [1x1, 48] on Conv2, two [3x3, 256]
    net = DeepLabV3PlusNetwork(11, encoder="resnet50")
    c_in, c = 2048, 256
    aspp = c_in * c + 3 * c_in * c * 9 + c_in * c + 5 * c * c + 6 * bn(c)
    assert count(net.context) == aspp
    decoder = 256 * 48 + bn(48) + (c + 48) * c * 9 + bn(c) + c * c * 9 + bn(c)
    assert count(net.decoder) == decoder
    assert net.encoder.reductions[net.low_level_index] == 4
    assert net.encoder.channels[net.low_level_index] == 256  # res2 ("Conv2") of ResNet
    assert count(net.classifier) == c * 11 + 11
    assert count(net) == count(net.encoder) + aspp + decoder + c * 11 + 11


@pytest.mark.parametrize("network", [DeepLabV3Network, DeepLabV3PlusNetwork])
def test_context_swap_keeps_shapes_and_the_rest_of_the_network(network):
    x = torch.randn(2, 3, 33, 47)
    rest = set()
    for context in CONTEXTS:
        net = network(4, encoder="resnet18", context=context).eval()
        with torch.no_grad():
            features = net.encoder(x)[-1]
            assert net.context(features).shape == (2, 256, *features.shape[-2:])
            assert net(x).shape == (2, 4, 33, 47)
        rest.add(count(net) - count(net.context))
    assert len(rest) == 1  # encoder, decoder and classifier are identical across contexts


def test_separable_convolutions_in_aspp_and_decoder():
    plain = DeepLabV3PlusNetwork(3, encoder="resnet18")
    net = DeepLabV3PlusNetwork(3, encoder="resnet18", separable=True)
    branch = net.context.atrous[0]
    assert isinstance(branch, SeparableConv2d)
    depthwise = branch[0][0]
    assert depthwise.groups == depthwise.in_channels == 512 and depthwise.dilation == (6, 6)
    assert all(isinstance(m, SeparableConv2d) for m in net.decoder.fuse)
    assert count(SeparableConv2d(16, 8)) == 16 * 9 + bn(16) + 16 * 8 + bn(8)
    assert count(net) < count(plain)
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 45, 61)).shape == (1, 3, 45, 61)


def test_bad_options_are_clear():
    with pytest.raises(
        ConfigError, match="context must be one of aspp, ksac, ppm, none; got 'asp'"
    ):
        DeepLabV3(num_classes=3, encoder="resnet18", context="asp")
    with pytest.raises(ConfigError, match="rates must be a non-empty list of integers >= 1"):
        DeepLabV3Plus(num_classes=3, encoder="resnet18", rates=[6, 0])
    with pytest.raises(ConfigError, match="output_stride must be 8, 16 or 32, got 4"):
        KSAC(num_classes=3, encoder="resnet18", output_stride=4)
    with pytest.raises(ConfigError, match="bins must be integers >= 1"):
        PSPNet(num_classes=3, encoder="resnet18", bins=[])


# ------------------------------------------------------------------------------------ PSPNet
def test_pyramid_pooling_bins_and_channels():
    ppm = PyramidPooling(64, 32).eval()
    assert ppm.bins == (1, 2, 3, 6)
    pooled = []
    for stage in ppm.stages:
        assert stage.conv.out_channels == 64 // 4  # 1/N of the channels for N levels
        stage.pool.register_forward_hook(lambda m, i, o: pooled.append(tuple(o.shape[-2:])))
    assert ppm.bottleneck[0].in_channels == 64 + 4 * 16  # features + pooled maps
    for h, w in [(13, 7), (5, 4)]:  # feature maps smaller than the 6x6 bins work too
        pooled.clear()
        with torch.no_grad():
            assert ppm(torch.randn(2, 64, h, w)).shape == (2, 32, h, w)
        assert pooled == [(1, 1), (2, 2), (3, 3), (6, 6)]


def test_pspnet_structure_follows_the_paper():
    net = PSPNetNetwork(11, encoder="resnet50")
    assert net.encoder.reductions[-1] == 8  # dilated ResNet, output stride 8
    c_in, reduced = 2048, 512
    ppm = 4 * (c_in * reduced + bn(reduced)) + 2 * c_in * 512 * 9 + bn(512)
    assert count(net.ppm) == ppm
    assert count(net.aux_head) == 1024 * 256 * 9 + bn(256) + 256 * 11 + 11  # on res4


def test_pspnet_aux_head_in_training_only_and_its_loss_weighted():
    torch.manual_seed(0)
    model = PSPNet(num_classes=4, encoder="resnet18", aux_weight=0.25).train()
    x = torch.randn(2, 3, 37, 51)
    mask = torch.randint(0, 4, (2, 37, 51))
    mask[:, :5] = 255  # ignored
    output = model.net(x)
    assert set(output) == {"out", "aux"}
    assert output["out"].shape == (2, 4, 37, 51)
    assert output["aux"].shape == (2, 4, 5, 7)  # stage-3 resolution (stride 8)
    main = F.cross_entropy(output["out"], mask, ignore_index=255)
    aux_up = F.interpolate(output["aux"], size=(37, 51), mode="bilinear", align_corners=False)
    aux = F.cross_entropy(aux_up, mask, ignore_index=255)
    torch.testing.assert_close(model.compute_loss(output, mask), main + 0.25 * aux)
    assert aux > 0
    model.eval()
    with torch.no_grad():
        assert isinstance(model.net(x), torch.Tensor)  # no aux output in eval
        torch.testing.assert_close(model(x), model.net(x))

    no_aux = PSPNet(num_classes=4, encoder="resnet18", aux=False).train()
    assert no_aux.net.aux_head is None
    assert isinstance(no_aux.net(x), torch.Tensor)


# ------------------------------------------------------------------------------------ all four
@pytest.mark.parametrize(
    "model_cls,output_stride", [(PSPNet, 8), (DeepLabV3, 16), (DeepLabV3Plus, 8), (KSAC, 32)]
)
def test_odd_input_sizes(model_cls, output_stride):
    model = model_cls(num_classes=3, encoder="resnet18", output_stride=output_stride).eval()
    with torch.no_grad():
        for h, w in [(17, 9), (33, 47), (1 + 32, 1 + 64)]:
            assert model(torch.randn(1, 3, h, w)).shape == (1, 3, h, w)


def test_image_pooling_with_batch_one_in_training():
    torch.manual_seed(0)
    branch = PoolingBranch(8, 4, bins=1)
    branch.norm.running_mean.fill_(0.5)
    before = branch.norm.running_mean.clone()
    x = torch.randn(1, 8, 5, 7)
    y = branch.train()(x)  # PyTorch's BatchNorm would raise here
    torch.testing.assert_close(branch.norm.running_mean, before)  # running stats untouched
    torch.testing.assert_close(y, branch.eval()(x))  # normalised as in eval
    assert y.shape == (1, 4, 5, 7)
    branch.train()(torch.randn(2, 8, 5, 7))  # a real batch updates the statistics
    assert not torch.allclose(branch.norm.running_mean, before)
