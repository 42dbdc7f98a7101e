"""RefineNet and GCN: the structure their papers describe, beyond the registry-wide tests of
test_models.py (output size, gradients, channels), which cover their defaults."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seglight.errors import ConfigError
from seglight.models import GCN, RefineNet, RefineNetNetwork
from seglight.models.gcn import BoundaryRefinement, GCNNetwork, GlobalConvBlock, bilinear_deconv
from seglight.models.refinenet import ChainedResidualPooling, ResidualConvUnit

ODD_SIZES = [(33, 47), (17, 9), (65, 97)]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- GCN
@pytest.mark.parametrize("k", [3, 7, 15])
def test_gcn_block_is_two_separable_branches_with_the_paper_parameter_count(k):
    block = GlobalConvBlock(64, 5, k)
    shapes = [tuple(m.kernel_size) for m in block.left] + [
        tuple(m.kernel_size) for m in block.right
    ]
    assert shapes == [(k, 1), (1, k), (1, k), (k, 1)]
    # 2 branches x (C_in x C x k + C x C x k weights) + 4 biases of C
    assert n_params(block) == 2 * k * 5 * (64 + 5) + 4 * 5
    assert not any(isinstance(m, (nn.ReLU, nn.BatchNorm2d)) for m in block.modules())


def test_gcn_block_is_affine_with_a_dense_k_by_k_receptive_field():
    torch.manual_seed(0)
    block = GlobalConvBlock(3, 2, kernel_size=7).double()
    a, b = torch.randn(2, 1, 3, 21, 21, dtype=torch.double)
    # no nonlinearity inside: f(a + b) = f(a) + f(b) - f(0)
    zero = block(torch.zeros_like(a))
    assert torch.allclose(block(a + b), block(a) + block(b) - zero, atol=1e-10)
    # the centre output depends on every input pixel of the 7x7 window, and on nothing outside
    x = torch.randn(1, 3, 21, 21, dtype=torch.double, requires_grad=True)
    block(x)[0, :, 10, 10].sum().backward()
    support = x.grad.abs().sum(1)[0] > 0
    assert support[7:14, 7:14].all()
    assert support.sum() == 49


def test_boundary_refinement_is_a_residual_block():
    br = BoundaryRefinement(4)
    for conv in (br.residual[0], br.residual[2]):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    x = torch.randn(1, 4, 9, 11)
    assert torch.equal(br(x), x)


def test_deconv_starts_as_bilinear_upsampling():
    deconv = bilinear_deconv(3)
    x = torch.rand(1, 3, 6, 8)
    with torch.no_grad():
        y = deconv(x)[..., :12, :16]
    expected = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear")
    # equal away from the border, where the transposed conv sees zero padding
    assert torch.allclose(y[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-6)


def test_gcn_follows_figure_2():
    net = GCNNetwork(11, encoder="resnet18")
    channels = net.encoder.channels[-4:]
    assert [b.left[0].in_channels for b in net.gcn] == channels == [64, 128, 256, 512]
    assert all(b.left[1].out_channels == 11 for b in net.gcn)  # score maps, one per class
    # one BR per score map, one after each of the 3 fusions, one after each of the 2 final deconvs
    assert len(net.br_score) == 4 and len(net.br_fused) == 5 and len(net.up) == 5
    encoder = n_params(net.encoder)
    gcn = sum(2 * 15 * 11 * (c + 11) + 44 for c in channels)
    br = 9 * 2 * (11 * 11 * 9 + 11)
    deconv = 5 * 11 * 11 * 16
    assert n_params(net) == encoder + gcn + br + deconv


def test_gcn_default_and_kernel_size_option():
    model = GCN(num_classes=11)
    assert model.net.encoder.name == "resnet50"
    assert model.net.gcn[3].left[0].kernel_size == (15, 1)
    small = GCN(num_classes=11, kernel_size=7)
    # only the GCN blocks depend on k: 2 C (C_in + C) weights per unit of k
    per_k = sum(2 * 11 * (c + 11) for c in model.net.encoder.channels[-4:])
    assert n_params(model) - n_params(small) == 8 * per_k


@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
def test_gcn_odd_sizes(upsampling):
    net = GCNNetwork(3, encoder="resnet18", kernel_size=5, upsampling=upsampling).eval()
    with torch.no_grad():
        for h, w in ODD_SIZES:
            assert net(torch.randn(1, 3, h, w)).shape == (1, 3, h, w)


def test_gcn_bad_options():
    with pytest.raises(ConfigError, match="kernel_size must be a positive odd number, got 14"):
        GCN(num_classes=3, kernel_size=14, encoder="resnet18")
    with pytest.raises(ConfigError, match="upsampling must be"):
        GCN(num_classes=3, upsampling="nearest", encoder="resnet18")


# ----------------------------------------------------------------------------- RefineNet
def test_rcu_is_relu_conv_relu_conv_plus_identity():
    torch.manual_seed(0)
    rcu = ResidualConvUnit(3)
    x = torch.randn(1, 3, 8, 8)
    manual = x + rcu.conv2(torch.relu(rcu.conv1(torch.relu(x))))
    assert torch.allclose(rcu(x), manual)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in rcu.modules())  # the paper drops BN


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_chained_residual_pooling_chain(blocks):
    torch.manual_seed(0)
    crp = ChainedResidualPooling(3, blocks)
    assert len(crp.convs) == blocks
    assert (crp.pool.kernel_size, crp.pool.stride) == (5, 1)
    x = torch.randn(1, 3, 9, 13)
    # each block pools the previous block's output (a chain), and every output is summed
    expected = path = torch.relu(x)
    pool = nn.MaxPool2d(5, stride=1, padding=2)
    for conv in crp.convs:
        path = conv(pool(path))
        expected = expected + path
    assert torch.allclose(crp(x), expected, atol=1e-6)


def test_refinenet_cascade_follows_figure_2():
    net = RefineNetNetwork(11, encoder="resnet18", crp_blocks=3)
    # RefineNet-4 (one path, no fusion), then RefineNet-3..1 with two paths
    assert net.refine[0].fuse is None and len(net.refine[0].adapt) == 1
    assert all(len(b.adapt) == 2 and len(b.fuse) == 2 for b in net.refine[1:])
    assert all(len(b.crp.convs) == 3 for b in net.refine)
    # 512 channels on the deepest path, 256 elsewhere
    assert [r.out_channels for r in net.reduce] == [256, 256, 256, 512]
    assert net.refine[0].out.conv1.in_channels == 512
    assert net.refine[1].fuse[1].in_channels == 512 and net.refine[1].fuse[1].out_channels == 256
    # two extra RCUs after RefineNet-1, then the classifier
    assert [type(m) for m in net.head] == [ResidualConvUnit, ResidualConvUnit, nn.Conv2d]


def test_refinenet_released_configuration_has_118m_parameters():
    # Nekrasov et al. (2018) report 118M for the authors' RefineNet-101 (4 CRP blocks)
    net = RefineNetNetwork(11, crp_blocks=4)
    assert net.encoder.name == "resnet101"
    assert 117.5e6 < n_params(net) < 118.5e6
    # the paper's figure draws 2 blocks: 2 fewer 3x3 convs per CRP (1 of 512, 3 of 256 channels)
    two = RefineNetNetwork(11, crp_blocks=2)
    assert n_params(net) - n_params(two) == 2 * 9 * (512**2 + 3 * 256**2)


def test_refinenet_odd_sizes_and_logits_at_input_size():
    net = RefineNetNetwork(4, encoder="resnet18", channels=(16, 16, 16, 32)).eval()
    with torch.no_grad():
        for h, w in ODD_SIZES:
            assert net(torch.randn(2, 3, h, w)).shape == (2, 4, h, w)


def test_refinenet_bad_options():
    with pytest.raises(ConfigError, match="channels needs 4 positive widths"):
        RefineNet(num_classes=3, encoder="resnet18", channels=(16, 16, 16))
    with pytest.raises(ConfigError, match="crp_blocks must be >= 1"):
        RefineNet(num_classes=3, encoder="resnet18", crp_blocks=0)
