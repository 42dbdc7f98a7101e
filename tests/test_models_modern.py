"""The modern architectures (SegFormer, UPerNet, ViT heads, DDRNet, BiSeNetV2, HRNet-OCR,
Mask2Former) against their papers: parameter counts at the papers' class counts, the structure
the papers describe, and clear errors for bad options. The registry-wide tests (test_models.py)
cover shapes, odd sizes and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seglight.errors import ConfigError
from seglight.models import DPT, BiSeNetV2, DDRNet, HRNetOCR, LinearProbe, SegFormer, UPerNet
from seglight.models.hrnet_ocr import ObjectContext
from seglight.nn import TimmEncoder


def millions(module: nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


# ----------------------------------------------------------------------------- SegFormer
@pytest.mark.parametrize("variant,paper", [("b0", 3.8), ("b2", 27.5)])
def test_segformer_parameters_match_table_2(variant, paper):
    model = SegFormer(num_classes=150, variant=variant)
    assert millions(model.net) == pytest.approx(paper, abs=0.05)


def test_segformer_encoder_is_mit():
    enc = SegFormer(num_classes=3, variant="b0").net.encoder.model
    blocks = [getattr(enc, f"stages_{i}").blocks[0] for i in range(4)]
    # efficient self-attention: keys/values reduced by 8/4/2 (stage 4 attends at full size)
    assert [b.attn.sr.stride[0] if b.attn.sr is not None else 1 for b in blocks] == [8, 4, 2, 1]
    # Mix-FFN expands by 4 in every stage (PVTv2's own default is 8/8/4/4)
    assert [b.mlp.fc1.out_features // b.mlp.fc1.in_features for b in blocks] == [4, 4, 4, 4]
    assert all(b.mlp.dwconv.groups == b.mlp.fc1.out_features for b in blocks)  # depthwise 3x3


def test_segformer_bad_variant():
    with pytest.raises(ConfigError, match="variant must be one of b0"):
        SegFormer(num_classes=3, variant="b9")


# ----------------------------------------------------------------------------- UPerNet
@pytest.mark.parametrize("encoder", ["convnext_tiny", "swin_tiny_patch4_window7_224"])
def test_upernet_parameters_match_convnext_and_swin_tables(encoder):
    # ConvNeXt Table 3 / Swin Table 3: UperNet with the T backbone, 150 classes: 60M (aux included)
    net = UPerNet(num_classes=150, encoder=encoder).net
    assert millions(net) == pytest.approx(60.0, abs=0.3)
    assert net.decoder.ppm.stages[0].conv.out_channels == 512  # mmseg's PPM: 512 per bin


def test_upernet_aux_head_in_training_only():
    model = UPerNet(num_classes=4, encoder="resnet18").train()
    out = model.net(torch.randn(2, 3, 64, 64))
    assert out["out"].shape == (2, 4, 64, 64) and out["aux"].shape == (2, 4, 4, 4)  # stride 16
    out = UPerNet(num_classes=4, encoder="pvt_v2_b0").net.train()(torch.randn(1, 3, 50, 70))
    assert out["aux"].shape == (1, 4, 50, 70)  # padded to 64x96: cropped back to the image
    model.eval()
    with torch.no_grad():
        assert model.net(torch.randn(1, 3, 64, 64)).shape == (1, 4, 64, 64)


def test_upernet_on_a_dinov2_vit_pads_crops_not_divisible_by_the_patch():
    net = UPerNet(num_classes=3, encoder="vit_small_patch14_dinov2", aux=False).net.eval()
    assert net.encoder.input_multiple == 14
    assert list(net.encoder.model.out_indices) == [2, 5, 8, 11]
    assert net.neck.reductions == [3.5, 7, 14, 28]  # BEiT's simple pyramid: x4, x2, x1, x1/2
    with torch.no_grad():
        y = net(torch.randn(1, 3, 45, 61))  # neither side divides by 14: padded, cropped back
    assert y.shape == (1, 3, 45, 61)


def test_upernet_needs_four_levels():
    with pytest.raises(
        ConfigError, match=r"encoder 'resnet18' with encoder_indices \[3, 4\] gives 2"
    ):
        UPerNet(num_classes=3, encoder="resnet18", encoder_indices=[3, 4])


# ----------------------------------------------------------------------------- ViT heads
def test_linear_probe_trains_only_the_head_and_keeps_the_backbone_in_eval():
    model = LinearProbe(num_classes=4, layers=4).train()
    net = model.net
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias"}
    assert net.head[0].num_features == 4 * 384  # the last four blocks of ViT-S, concatenated
    assert not net.encoder.training and net.head.training
    before = net.encoder.model.model.blocks[-1].mlp.fc1.weight.clone()
    out = net(torch.randn(2, 3, 30, 44))  # not multiples of 14: padded, cropped back
    model.compute_loss(out, torch.randint(0, 4, (2, 30, 44))).backward()
    assert out.shape == (2, 4, 30, 44)
    assert torch.equal(net.encoder.model.model.blocks[-1].mlp.fc1.weight, before)


def test_dpt_reassembles_four_scales_of_a_vit():
    net = DPT(num_classes=3, encoder="vit_small_patch14_dinov2").net.eval()
    x = torch.randn(1, 3, 56, 84)  # a 4x6 patch grid
    levels = [r(f) for r, f in zip(net.reassemble, net.encoder(x), strict=True)]
    assert [tuple(v.shape[-2:]) for v in levels] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    with torch.no_grad():
        assert net(torch.randn(1, 3, 57, 83)).shape == (1, 3, 57, 83)


@pytest.mark.parametrize("cls", [DPT, LinearProbe])
def test_vit_heads_refuse_a_cnn(cls):
    with pytest.raises(ConfigError, match=f"{cls.__name__} needs a plain ViT encoder"):
        cls(num_classes=3, encoder="resnet18")


# ----------------------------------------------------------------------------- DDRNet
@pytest.mark.parametrize("variant,paper", [("23-slim", 5.7), ("23", 20.1)])
def test_ddrnet_parameters_match_table_4(variant, paper):
    net = DDRNet(num_classes=19, variant=variant).net  # Cityscapes
    # the paper counts the deployed network: without the auxiliary head
    assert millions(net) - millions(net.aux_head) == pytest.approx(paper, abs=0.06)


def test_ddrnet_branches_and_aux_head():
    net = DDRNet(num_classes=4).net.train()
    out = net(torch.randn(2, 3, 64, 96))
    assert out["out"].shape == (2, 4, 64, 96) and out["aux"].shape == (2, 4, 8, 12)  # 1/8
    # the high-resolution branch keeps 2C = 64 channels at 1/8; the context ends at 1/64
    assert net.layer4_[0].body[0][0].in_channels == 64 and net.spp.scales[0][0].num_features == 512
    with pytest.raises(ConfigError, match="DDRNet variant must be one of 23-slim, 23"):
        DDRNet(num_classes=3, variant="39")


@pytest.mark.parametrize("variant", ["23-slim", "23"])
def test_ddrnet_blocks_end_in_relu_as_released(variant):
    # ydhongHIT/DDRNet segmentation/DDRNet_23_slim.py and DDRNet_23.py, ``_make_layer``: every
    # block but a stage's last ends in ReLU (BasicBlock's default no_relu=False), the last ends
    # without; the one-block bottleneck stages (layer5, layer5_; Bottleneck's default
    # no_relu=True) end without. Checked by behaviour: a block ending in ReLU is never negative.
    net = DDRNet(num_classes=3, variant=variant).net.eval()
    names = ["layer1", "layer2", "layer3", "layer3_", "layer4", "layer4_", "layer5", "layer5_"]
    negative: dict[str, bool] = {}
    hooks = [
        block.register_forward_hook(
            lambda _m, _i, out, key=f"{name}.{i}": negative.__setitem__(key, bool((out < 0).any()))
        )
        for name in names
        for i, block in enumerate(getattr(net, name))
    ]
    with torch.no_grad():
        net(torch.randn(1, 3, 128, 128))
    for hook in hooks:
        hook.remove()
    expected = {
        f"{name}.{i}": i == len(getattr(net, name)) - 1  # only a stage's last may be negative
        for name in names
        for i in range(len(getattr(net, name)))
    }
    assert negative == expected


# ----------------------------------------------------------------------------- BiSeNetV2
def test_bisenetv2_branches_and_four_booster_heads():
    net = BiSeNetV2(num_classes=19).net.train()
    out = net(torch.randn(2, 3, 64, 128))
    assert out["out"].shape == (2, 19, 64, 128)
    # boosters on the Stem (1/4) and the semantic stages at 1/8, 1/16, 1/32
    assert [tuple(a.shape[-2:]) for a in out["aux"]] == [(16, 32), (8, 16), (4, 8), (2, 4)]
    assert net.detail(torch.randn(1, 3, 64, 128)).shape == (1, 128, 8, 16)  # Table 1: 1/8, 128
    # the deployed network (no boosters) of Table 8's model, 19 classes
    assert millions(net) - millions(net.boosters) == pytest.approx(3.36, abs=0.01)


# ----------------------------------------------------------------------------- HRNet-OCR
def test_hrnet_ocr_concatenates_the_four_branches_and_supervises_soft_regions():
    net = HRNetOCR(num_classes=5, encoder="hrnet_w18").net.train()
    assert net.pixel[0].in_channels == 18 + 36 + 72 + 144  # HRNetV2's concatenation
    out = net(torch.randn(2, 3, 64, 96))  # divides by 32: the regions stay at 1/4
    assert out["out"].shape == (2, 5, 64, 96) and out["aux"].shape == (2, 5, 16, 24)
    out = net(torch.randn(1, 3, 50, 70))  # padded to 64x96: regions cropped to the image
    assert out["aux"].shape == (1, 5, 50, 70)
    with pytest.raises(ConfigError, match="HRNetOCR needs a timm HRNet encoder"):
        HRNetOCR(num_classes=3, encoder="resnet18")


def ran_in_eval(net: nn.Module, x: torch.Tensor) -> set[int]:
    """ids of the parameters of every module an eval forward of `net` on `x` runs."""
    ran: set[nn.Module] = set()
    hooks = [m.register_forward_hook(lambda m, _i, _o: ran.add(m)) for m in net.modules()]
    with torch.no_grad():
        net.eval()(x)
    for hook in hooks:
        hook.remove()
    return {id(p) for m in ran for p in m.parameters(recurse=False)}


def test_deployed_counts_what_an_eval_forward_runs():
    # README's "deployed" column: HRNet-OCR's soft-region head feeds OCR at inference (every
    # parameter runs), DDRNet's auxiliary head is training-only
    hrnet = HRNetOCR(num_classes=19, encoder="hrnet_w18").net
    ran = ran_in_eval(hrnet, torch.randn(1, 3, 64, 64))
    assert all(id(p) in ran for p in hrnet.parameters())
    ddrnet = DDRNet(num_classes=19).net
    ran = ran_in_eval(ddrnet, torch.randn(1, 3, 64, 64))
    assert {id(p) for p in ddrnet.parameters() if id(p) not in ran} == {
        id(p) for p in ddrnet.aux_head.parameters()
    }


def test_object_context_attends_over_one_region_per_class():
    ocr = ObjectContext(channels=8, key_channels=4).eval()
    feats, regions = torch.randn(2, 8, 6, 7), torch.randn(2, 3, 6, 7)
    assert ocr(feats, regions).shape == (2, 8, 6, 7)
    # region representations are softmax-weighted averages of the pixels: a region that peaks on
    # one pixel represents that pixel
    regions = torch.full((1, 1, 6, 7), -1e4)
    regions[0, 0, 2, 3] = 0
    captured = {}
    ocr.key.register_forward_hook(lambda m, i, o: captured.update(proxy=i[0]))
    ocr(feats[:1], regions)
    assert torch.allclose(captured["proxy"][0, :, 0, 0], feats[0, :, 2, 3], atol=1e-5)


# ----------------------------------------------------------------------------- encoders
def test_swin_features_come_back_nchw_and_sizes_that_divide_by_32():
    enc = TimmEncoder("swin_tiny_patch4_window7_224").eval()  # any size (strict_img_size off)
    with torch.no_grad():
        feats = enc(torch.randn(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == enc.channels == [96, 192, 384, 768]  # NHWC permuted
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert enc.input_multiple == 32 and TimmEncoder("resnet18").input_multiple == 1
