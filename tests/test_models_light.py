"""FC-DenseNet, ENet and LinkNet against their papers: parameter counts, layer counts, where
Table 1/2 put each kind of layer, what the skip connections carry, and odd input sizes.
(Logits at the input size, gradients and other channel counts are in test_models.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seglight.errors import ConfigError
from seglight.models import (
    MODELS,
    ENetNetwork,
    FCDenseNet56,
    FCDenseNet67,
    FCDenseNet103,
    FCDenseNetNetwork,
    LinkNetNetwork,
)
from seglight.models.enet import Bottleneck, DownsamplingBottleneck


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# the papers' figures in millions and how far from them we accept (the papers round to 2 digits)
PAPER_PARAMS = {
    # Jégou et al., Table 3 (CamVid, 11 classes); 56 is 8% lower, see fcdensenet.py
    "FCDenseNet56": (1.5, 0.10),
    "FCDenseNet67": (3.5, 0.02),
    "FCDenseNet103": (9.4, 0.02),
    "ENet": (0.37, 0.03),  # Paszke et al., Table 3
    "LinkNet": (11.5, 0.01),  # Chaurasia and Culurciello, Table 2 (ResNet-18)
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_count_matches_the_paper(name):
    paper, tolerance = PAPER_PARAMS[name]
    model = MODELS[name](num_classes=11)
    assert model.paper_params == paper
    assert abs(count_params(model) / 1e6 - paper) <= tolerance * paper


# ------------------------------------------------------------------------------ FC-DenseNet
@pytest.mark.parametrize("cls,paper", [(FCDenseNet67, 3.5e6), (FCDenseNet103, 9.4e6)])
def test_fcdensenet_count_as_the_authors_code_matches_table_3(cls, paper):
    # their Lasagne summary also counts BatchNorm's running mean and inverse std
    net = cls(num_classes=11).net
    norms = sum(m.num_features for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert abs(count_params(net) + 2 * norms - paper) < 0.005 * paper


def convs(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


@pytest.mark.parametrize(
    "cls,depth", [(FCDenseNet56, 56), (FCDenseNet67, 67), (FCDenseNet103, 103)]
)
def test_fcdensenet_depth_counts_every_convolution(cls, depth):
    net = cls(num_classes=11).net
    assert type(net) is FCDenseNetNetwork  # one network class for the three variants
    assert "FCDenseNet" not in MODELS  # the shared mixin is not an architecture of its own
    # the paper's count: first conv + dense layers + 5 transitions down + 5 up + the 1x1 classifier
    assert len(convs(net)) == depth
    assert len(net.transitions_down) == len(net.transitions_up) == 5
    dense_layers = sum(len(b.layers) for b in [*net.down_blocks, net.bottleneck, *net.up_blocks])
    assert dense_layers == depth - 1 - 5 - 5 - 1


def test_fcdensenet103_channels_follow_table_2():
    net = FCDenseNet103(num_classes=11).net
    assert net.first_conv.out_channels == 48
    # m after each dense block of the down path (the skips; Table 2: 112 ... 656 after each TD)
    assert [b.out_channels for b in net.down_blocks] == [112, 192, 304, 464, 656]
    assert [len(b.layers) for b in net.up_blocks] == [12, 10, 7, 5, 4]
    assert net.head.in_channels == 256  # Table 2's last m
    dropouts = [m.p for m in net.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 91 + 5 and set(dropouts) == {0.2}


def test_fcdensenet_upsamples_only_the_new_feature_maps():
    net = FCDenseNet103(num_classes=11).net.eval()
    seen = {}
    for i, up in enumerate(net.transitions_up):
        up.conv.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, inp[0].shape))
    with torch.no_grad():
        net(torch.randn(1, 3, 19, 23))
    # k = 16 times the layers of the block before each transition up: 15, 12, 10, 7, 5
    assert [seen[i][1] for i in range(5)] == [240, 192, 160, 112, 80]
    # and each up block gets those (upsampled) plus its skip, not the previous block's whole stack
    skips = [656, 464, 304, 192, 112]
    assert [b.in_channels for b in net.up_blocks] == [
        n + s for n, s in zip([240, 192, 160, 112, 80], skips, strict=True)
    ]


def test_fcdensenet_bad_layers_per_block():
    with pytest.raises(ConfigError, match="2 \\* P \\+ 1"):
        FCDenseNetNetwork(3, layers_per_block=[4, 4, 4, 4])


# ------------------------------------------------------------------------------ ENet
def main_conv(block: Bottleneck) -> str:
    """What Table 1 would call the bottleneck's middle conv."""
    conv = block.extension[2]
    if isinstance(conv, nn.Sequential):
        return "asymmetric " + "+".join(f"{c.kernel_size[0]}x{c.kernel_size[1]}" for c in conv)
    assert conv.kernel_size == (3, 3)
    return "regular" if conv.dilation == (1, 1) else f"dilated {conv.dilation[0]}"


def test_enet_layers_where_table_1_puts_them():
    net = ENetNetwork(11)
    stage_2_3 = [
        "regular",
        "dilated 2",
        "asymmetric 5x1+1x5",
        "dilated 4",
        "regular",
        "dilated 8",
        "asymmetric 5x1+1x5",
        "dilated 16",
    ]
    assert [main_conv(b) for b in net.stage2] == stage_2_3
    assert [main_conv(b) for b in net.stage3] == stage_2_3
    assert [main_conv(b) for b in [*net.stage1, *net.stage4, net.stage5]] == ["regular"] * 7
    # channels: 16 -> 64 (stage 1) -> 128 (stages 2-3) -> 64 -> 16
    assert net.initial.conv.out_channels == 13
    assert [b.act.num_parameters for b in [net.down1, net.down2, net.up4, net.up5]] == [
        64,
        128,
        64,
        16,
    ]
    # spatial dropout 0.01 in stage 1 (bottleneck1.0 included), 0.1 afterwards
    dropouts = [m.p for m in net.modules() if isinstance(m, nn.Dropout2d)]
    assert dropouts == [0.01] * (1 + 4) + [0.1] * (1 + 8 + 8 + (1 + 2) + (1 + 1))
    assert not any(isinstance(m, nn.ReLU) for m in net.modules())  # PReLU throughout
    assert sum(isinstance(m, nn.MaxUnpool2d) for m in net.modules()) == 2
    assert isinstance(net.fullconv, nn.ConvTranspose2d)


def test_enet_downsampling_zero_pads_the_pooled_main_branch():
    block = DownsamplingBottleneck(16, 64, dropout=0.0).eval()
    last_bn = block.extension[5]
    nn.init.zeros_(last_bn.weight)  # silence the extension: only the main branch is left
    nn.init.zeros_(last_bn.bias)
    x = torch.randn(2, 16, 9, 7)
    with torch.no_grad():
        y, indices = block(x)
    pooled = nn.functional.max_pool2d(x, 2, ceil_mode=True)  # odd sides round up
    assert y.shape == (2, 64, 5, 4) and indices.shape == (2, 16, 5, 4)
    zeros = torch.zeros(2, 48, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(y, block.act(torch.cat([pooled, zeros], 1)))


def test_enet_rejects_too_many_input_channels():
    with pytest.raises(ConfigError, match="in_channels must be 1..15"):
        ENetNetwork(3, in_channels=16)


# ------------------------------------------------------------------------------ LinkNet
def test_linknet_adds_the_encoder_laterals():
    net = LinkNetNetwork(11).eval()
    # decoder block outputs have their lateral's channels (Table 1: 256, 128, 64, 64) and each
    # block's input is as wide as that (an addition), not twice (a concatenation)
    assert [b.expand[0].out_channels for b in net.decoder] == [256, 128, 64, 64]
    assert [b.reduce[0].in_channels for b in net.decoder] == [512, 256, 128, 64]
    assert [b.reduce[0].out_channels for b in net.decoder] == [128, 64, 32, 16]
    assert [b.up.stride for b in net.decoder] == [(2, 2), (2, 2), (2, 2), (1, 1)]

    outputs, inputs = {}, {}
    for i, block in enumerate(net.decoder):
        block.register_forward_hook(lambda m, inp, out, i=i: outputs.__setitem__(i, out))
        block.register_forward_hook(lambda m, inp, out, i=i: inputs.__setitem__(i, inp[0]))
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        e1, e2, e3, e4 = net.encoder(x)[-4:]
        net(x)
    torch.testing.assert_close(inputs[1], outputs[0] + e3)
    torch.testing.assert_close(inputs[2], outputs[1] + e2)
    torch.testing.assert_close(inputs[3], outputs[2] + e1)


def test_linknet_other_encoders_and_bad_ones():
    net = LinkNetNetwork(4, encoder="resnet34").eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 45, 61)).shape == (1, 4, 45, 61)
    with pytest.raises(ConfigError, match="doubling strides"):
        LinkNetNetwork(4, encoder="vit_tiny_patch16_224")


# ------------------------------------------------------------------------------ all three
@pytest.mark.parametrize(
    "build",
    [
        lambda: FCDenseNetNetwork(3, growth_rate=4, layers_per_block=2),
        lambda: ENetNetwork(3),
        lambda: LinkNetNetwork(3),
    ],
    ids=["fcdensenet", "enet", "linknet"],
)
def test_odd_and_tiny_sizes(build):
    net = build().eval()
    with torch.no_grad():
        for h, w in [(1, 1), (3, 2), (17, 9), (33, 65)]:
            assert net(torch.randn(1, 3, h, w)).shape == (1, 3, h, w)
