"""The VGG-based architectures (FCN, SegNet, DeepLab v1/v2, G-FRNet) against their papers:
parameter counts, FCN's bilinear-initialised upsampling and skip fusion, SegNet's unpooling with
the encoder's indices, DeepLab's output stride and heads, G-FRNet's deep supervision, and the
loading of timm VGG16 weights (from a file the test writes; nothing is downloaded)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO

from seglight.errors import ConfigError
from seglight.models import MODELS, FCN8s, FCNNetwork, GFRNetNetwork, SegNetBasicNetwork
from seglight.models.deeplab_vgg import DeepLabVGGNetwork
from seglight.models.segnet import SegNetNetwork
from seglight.nn import BilinearUpsample, EncoderWeightsError


def count(name: str, num_classes: int) -> int:
    with torch.device("meta"):  # no memory, no init cost: 134M parameters in milliseconds
        model = MODELS[name](num_classes=num_classes)
    return sum(p.numel() for p in model.net.parameters())


@pytest.mark.parametrize(
    "name,num_classes,paper,tolerance",
    [
        ("FCN32s", 21, 134e6, 0.01),  # Long et al. Table 1 (PASCAL, 21 classes)
        ("FCN16s", 21, 134e6, 0.01),
        ("FCN8s", 21, 134e6, 0.01),
        ("FCN8s", 11, 134e6, 0.01),
        ("SegNet", 11, 29.46e6, 0.005),  # CamVid, 11 classes
        ("SegNetBasic", 11, 1.425e6, 0.01),  # SegNet paper Table 1
        ("DeepLabLargeFOV", 21, 20.5e6, 0.005),  # DeepLab v1 Table 2
    ],
)
def test_parameter_counts_match_the_papers(name, num_classes, paper, tolerance):
    assert MODELS[name].paper_params == pytest.approx(paper / 1e6, rel=0.01)
    assert count(name, num_classes) == pytest.approx(paper, rel=tolerance)


def test_aspp_and_gfrnet_counts_follow_from_their_parts():
    # ASPP-L: LargeFOV plus three more fc6 (3x3, 512 -> 1024) / fc7 (1024 -> 1024) / score heads
    head = (512 * 9 + 1) * 1024 + (1024 + 1) * 1024 + (1024 + 1) * 11
    assert count("DeepLabASPP", 11) == count("DeepLabLargeFOV", 11) + 3 * head
    # G-FRNet: the released train_camvid_gate.prototxt (mrochan/gfrnet) has 29,194,090 (its
    # convolutions' weights and biases and its BN layers' scales and shifts, counted layer by
    # layer): VGG16-BN, conv6/conv7 (3x3, 1024, BN), gates and refinements to 11 channels
    assert count("GFRNet", 11) == 29_194_090
    vgg16_bn = sum(p.numel() for p in GFRNetNetwork(11).encoder.parameters())
    conv67 = (512 * 9 + 1) * 1024 + (1024 * 9 + 1) * 1024 + 2 * 2 * 1024
    assert count("GFRNet", 11) - vgg16_bn - conv67 == (
        (1024 * 9 + 1) * 11  # the coarse map from conv7
        + (512 * 9 + 1) * 11  # pool5's branch of the first gate (no BN)
        + sum((c * 9 + 1) * 11 + 2 * 11 for c in (512, 512, 256, 128, 64))  # gates' conv + BN
        + 5 * 2 * 11  # BN after each gate's product
        + 5 * ((22 * 9 + 1) * 11)  # refinement convs
    )


def ramp(h: int, w: int, channels: int = 3) -> torch.Tensor:
    """A smooth (linear) image: bilinear interpolation reproduces it exactly."""
    y, x = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    return torch.stack([0.3 * y + 0.7 * x + c for c in range(channels)])[None]


@pytest.mark.parametrize("factor", [2, 3, 8, 32])
def test_bilinear_upsample_equals_interpolation_inside(factor):
    up = BilinearUpsample(3, factor)
    x = ramp(5, 7) + torch.randn(1, 3, 5, 7)  # a ramp plus noise: not trivially linear
    y = up(x)
    ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    assert y.shape == ref.shape == (1, 3, 5 * factor, 7 * factor)
    m = factor  # the border differs (zeros outside vs replicated edge)
    torch.testing.assert_close(y[..., m:-m, m:-m], ref[..., m:-m, m:-m], atol=1e-5, rtol=1e-5)
    assert up(x, (5 * factor - 3, 7 * factor + 1)).shape[-2:] == (5 * factor - 3, 7 * factor + 1)


@pytest.fixture(scope="module")
def fcn_pair():
    torch.manual_seed(0)
    return FCNNetwork(3, stride=32).eval(), FCNNetwork(3, stride=8).eval()


def test_fcn_transposed_convolutions_start_as_bilinear_interpolation(fcn_pair):
    _, fcn8 = fcn_pair
    x = ramp(9, 11)
    # learned 2x upsamplings (full channel x channel filters, diagonal bilinear) and the fixed x8
    for up, factor, trainable in [
        (fcn8.skip_upsamples[0], 2, True),
        (fcn8.skip_upsamples[1], 2, True),
        (fcn8.upsample, 8, False),
    ]:
        assert up.weight.requires_grad is trainable
        ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
        m = factor
        torch.testing.assert_close(up(x)[..., m:-m, m:-m], ref[..., m:-m, m:-m], atol=1e-4, rtol=0)
    assert fcn8.skip_upsamples[0].weight.shape == (3, 3, 4, 4)


def test_fcn8s_fuses_pool4_and_pool3(fcn_pair):
    fcn32, fcn8 = fcn_pair
    shared = {k: v for k, v in fcn32.state_dict().items() if k != "upsample.weight"}
    missing, unexpected = fcn8.load_state_dict(shared, strict=False)
    assert not unexpected
    assert sorted(missing) == sorted(
        ["upsample.weight"]
        + [f"skip_scores.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")]
        + [f"skip_upsamples.{i}.weight" for i in (0, 1)]
    )
    seen = {}
    fcn8.encoder.register_forward_hook(lambda m, i, o: seen.update(pools=o))
    for i, conv in enumerate(fcn8.skip_scores):
        conv.register_forward_hook(lambda m, inp, o, i=i: seen.update({i: inp[0]}))
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        out32 = fcn32(x)
        fcn8(x)
        # skip 0 reads pool4 (stride 16), skip 1 pool3 (stride 8)
        assert seen[0] is seen["pools"][3] and seen[0].shape[-2:] == (3, 4)
        assert seen[1] is seen["pools"][2] and seen[1].shape[-2:] == (6, 8)
        for conv in fcn8.skip_scores:
            torch.nn.init.normal_(conv.weight, std=0.1)
        out8 = fcn8(x)
        assert out8.shape == out32.shape == (1, 3, 45, 61)
        assert not torch.allclose(out8, out32, atol=1e-3)
        for conv in fcn8.skip_scores:  # each skip changes the output
            saved = conv.weight.clone()
            conv.weight.zero_()
            assert not torch.allclose(fcn8(x), out8, atol=1e-4)
            conv.weight.copy_(saved)
    assert len(MODELS["FCN16s"](num_classes=3).net.skip_scores) == 1


def test_segnet_unpools_with_the_encoders_indices():
    torch.manual_seed(0)
    net = SegNetBasicNetwork(3, channels=8).eval()
    pooled, unpooled = [], []
    for pool in net.pools:
        pool.register_forward_hook(lambda m, i, o: pooled.append(o[1]))
    for up in net.upsamples:
        up.up.register_forward_hook(lambda m, i, o: unpooled.append((i[0], i[1], o)))
    with torch.no_grad():
        assert net(torch.randn(1, 3, 37, 45)).shape == (1, 3, 37, 45)
    # decoder stage i uses the indices of encoder pool depth - 1 - i: the same tensors
    assert all(u[1] is p for u, p in zip(unpooled, pooled[::-1], strict=True))
    for x, idx, out in unpooled:
        flat = out.flatten(2)
        # the values go back to their argmax positions, everything else is zero
        assert torch.equal(flat.gather(2, idx.flatten(2)), x.flatten(2))
        placed = torch.zeros_like(flat, dtype=torch.bool).scatter_(2, idx.flatten(2), True)
        assert not flat[~placed].any()
    # pre-pooling sizes are restored exactly (odd sizes: 37 -> 19 -> 10 -> 5 -> 3 and back)
    assert [o.shape[-2] for _, _, o in unpooled] == [5, 10, 19, 37]


@pytest.mark.parametrize("mode", ["unpool", "bilinear", "transpose"])
def test_segnet_decoder_variants(mode):
    basic = SegNetBasicNetwork(4, channels=8, decoder_upsampling=mode).eval()
    with torch.no_grad():
        for h, w in [(1, 1), (17, 9), (33, 47)]:
            assert basic(torch.randn(1, 3, h, w)).shape == (1, 4, h, w)
    assert all(
        isinstance(p, torch.nn.MaxPool2d) and p.return_indices == (mode == "unpool")
        for p in basic.pools
    )
    with torch.device("meta"):
        params = sum(p.numel() for p in SegNetNetwork(11, decoder_upsampling=mode).parameters())
    # transposed convolutions add channels^2 x 4 x 4 per stage; unpooling and bilinear add nothing
    extra = 16 * (64**2 + 128**2 + 256**2 + 2 * 512**2)
    assert params == 29_445_643 + (extra if mode == "transpose" else 0)


def test_deeplab_vgg_structure():
    net = DeepLabVGGNetwork(5, rates=(6, 12, 18, 24)).eval()
    assert [p.stride for p in net.encoder.pools] == [2, 2, 2, 1, 1]
    assert [p.kernel_size for p in net.encoder.pools] == [3] * 5
    assert {c[0].dilation for c in net.encoder.stages[4]} == {(2, 2)}
    assert [h[0].fc6.dilation[0] for h in net.heads] == [6, 12, 18, 24]
    assert {h[0].fc6.out_channels for h in net.heads} == {1024}
    x = torch.randn(1, 3, 41, 57)
    with torch.no_grad():
        # output stride 8, Caffe's ceil-mode 3x3/2 pools: 41 -> 21 -> 11 -> 6, 57 -> 29 -> 15 -> 8
        assert net.encoder(x)[-1].shape[-2:] == (6, 8)
        assert net(x).shape == (1, 5, 41, 57)
    with pytest.raises(ConfigError, match="output_stride must be 8, 16 or 32"):
        DeepLabVGGNetwork(5, output_stride=4)


def test_gfrnet_returns_coarse_to_fine_label_maps_in_training():
    model = MODELS["GFRNet"](num_classes=4)
    assert model.hparams.aux_weight == 1.0  # the paper's equal stage weights
    net = model.net.train()
    # the released model: VGG16-BN encoder, dropout 0.5 after pool3-5 and after conv6/conv7
    assert net.encoder.timm_name == "vgg16_bn" and net.encoder_dropout.p == 0.5
    assert [m.p for m in net.fc if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]
    assert all(g.shallow[0].out_channels == 4 for g in net.gates)  # straight to the classes
    out = net(torch.randn(1, 3, 45, 61))
    assert out["out"].shape == (1, 4, 45, 61)
    # pool5 (stride 32), then conv5_3, conv4_3, conv3_3, conv2_2 sizes; conv1_2's is the output
    assert [a.shape[-2:] for a in out["aux"]] == [(2, 2), (3, 4), (6, 8), (12, 16), (23, 31)]
    mask = torch.randint(0, 4, (1, 45, 61))
    assert model.compute_loss(out, mask) > model.compute_loss(out["out"], mask)
    assert isinstance(net.eval()(torch.randn(1, 3, 33, 35)), torch.Tensor)


def test_gfrnet_experiment_weights_all_six_losses_as_released():
    # mrochan/gfrnet models/camvid/train_camvid_gate.prototxt: losses l1..l6 (SoftmaxWithLoss,
    # weight_by_label_freqs) all carry these class_weighting values (SegNet's CamVid weights)
    released = [
        0.2595,
        0.1826,
        4.5640,
        0.1417,
        0.9051,
        0.3826,
        9.6446,
        1.8418,
        0.6823,
        6.2478,
        7.3614,
    ]
    config = yaml.safe_load((REPO / "experiments" / "gfrnet.yaml").read_text())
    options = config["model"]["init_args"]
    assert options["class_weights"] == released and options["aux_weight"] == 1.0
    options = {**options, "encoder_weights": None}
    model = MODELS["GFRNet"](num_classes=11, **options)
    out = model.net.train()(torch.randn(1, 3, 45, 61))
    mask = torch.randint(0, 11, (1, 45, 61))
    weight = torch.tensor(released)
    maps = [out["out"], *out["aux"]]
    assert len(maps) == 6
    expected = sum(
        F.cross_entropy(F.interpolate(m, size=(45, 61), mode="bilinear"), mask, weight=weight)
        for m in maps
    )
    assert torch.allclose(model.compute_loss(out, mask), expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["FCN8s", "DeepLabASPP", "GFRNet"])
def test_timm_encoders(name):
    model = MODELS[name](num_classes=3, encoder="resnet18", in_channels=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 4, 45, 61)).shape == (1, 3, 45, 61)


def test_bad_options_are_clear():
    with pytest.raises(ConfigError, match="stride must be 8, 16 or 32"):
        FCNNetwork(3, stride=4)
    with pytest.raises(ConfigError, match="decoder_upsampling must be"):
        SegNetBasicNetwork(3, decoder_upsampling="nearest")


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vgg16.pth"
    torch.save(timm.create_model("vgg16").state_dict(), path)
    return path


def test_weights_from_a_timm_vgg16_file(vgg16_file):
    sd = torch.load(vgg16_file)
    fcn = FCN8s(num_classes=3, encoder_weights=str(vgg16_file)).net
    assert torch.equal(fcn.encoder.stages[0][0][0].weight, sd["features.0.weight"])
    assert torch.equal(fcn.encoder.stages[2][2][0].bias, sd["features.14.bias"])
    assert torch.equal(fcn.encoder.stages[4][2][0].weight, sd["features.28.weight"])
    assert torch.equal(fcn.fc.fc6.weight, sd["pre_logits.fc1.weight"])
    assert torch.equal(fcn.fc.fc7.weight, sd["pre_logits.fc2.weight"])
    del fcn
    # DeepLab: fc6/fc7 decimated to 1024 filters and 3x3 taps; a 1-channel stem is adapted
    deeplab = MODELS["DeepLabLargeFOV"](
        num_classes=3, in_channels=1, encoder_weights=str(vgg16_file)
    ).net
    fc = deeplab.heads[0][0]
    assert torch.equal(fc.fc6.weight, sd["pre_logits.fc1.weight"][::4, :, ::3, ::3])
    assert torch.equal(fc.fc6.bias, sd["pre_logits.fc1.bias"][::4])
    assert torch.equal(fc.fc7.weight, sd["pre_logits.fc2.weight"][::4, ::4])
    stem = deeplab.encoder.stages[0][0][0].weight
    assert stem.shape == (64, 1, 3, 3)
    torch.testing.assert_close(stem[:, 0], sd["features.0.weight"].sum(1))
    assert torch.equal(deeplab.encoder.stages[3][1][0].weight, sd["features.19.weight"])


def test_a_file_of_another_architecture_is_refused(tmp_path, vgg16_file):
    with pytest.raises(EncoderWeightsError, match=r"vgg16.pth' does not fit timm model 'vgg16_bn'"):
        GFRNetNetwork(3, encoder="vgg16_bn", encoder_weights=str(vgg16_file))


def test_weights_from_a_timm_vgg16_bn_file(tmp_path):
    # SegNet's encoder is VGG16-BN: convolutions, BatchNorm affine parameters and statistics
    torch.manual_seed(0)
    sd = timm.create_model("vgg16_bn").state_dict()
    sd["features.41.running_mean"] = torch.randn(512)  # non-trivial statistics
    torch.save(sd, tmp_path / "vgg16_bn.pth")
    net = MODELS["SegNet"](num_classes=3, encoder_weights=str(tmp_path / "vgg16_bn.pth")).net
    last = net.encoder.stages[4][2]
    assert torch.equal(net.encoder.stages[0][0][0].weight, sd["features.0.weight"])
    assert torch.equal(net.encoder.stages[1][1][1].weight, sd["features.11.weight"])
    assert torch.equal(last[0].weight, sd["features.40.weight"])
    assert torch.equal(last[1].running_mean, sd["features.41.running_mean"])
