"""Parameter and FLOP counting (seglight.profile) and `python -m seglight models --flops`."""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from conftest import REPO, run_cli
from torch import nn

from seglight.commands.listings import cmd_models
from seglight.errors import ConfigError
from seglight.models import GCN, MODELS, UNet
from seglight.nn import BilinearUpsample
from seglight.profile import count_flops, count_parameters, model_cost, parse_size


def test_single_conv_by_hand():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    # each of the 8 x 10 x 12 outputs takes 3 x 3 x 3 multiply-accumulates; biases not counted
    assert count_flops(conv, (1, 3, 10, 12)) == 2 * (8 * 10 * 12) * (3 * 3 * 3)
    assert count_flops(conv, (4, 3, 10, 12)) == 4 * 2 * (8 * 10 * 12) * (3 * 3 * 3)
    assert count_parameters(conv) == 8 * 3 * 3 * 3 + 8


def test_tiny_network_by_hand():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),  # 8x8 -> 4x4
        nn.BatchNorm2d(4),  # not counted
        nn.ReLU(),  # not counted
        nn.ConvTranspose2d(4, 2, 2, stride=2),  # 4x4 -> 8x8
        nn.Flatten(),
        nn.Linear(2 * 8 * 8, 5),
    )
    macs = 4 * 4 * 4 * (3 * 9) + 4 * 4 * 4 * (2 * 2 * 2) + 128 * 5
    assert count_flops(net, (1, 3, 8, 8)) == 2 * macs
    conv_t = 4 * 2 * 4 + 2
    assert count_parameters(net) == 4 * 27 + 2 * 4 + conv_t + 128 * 5 + 5
    net[0].weight.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == count_parameters(net) - 4 * 27


def test_count_flops_restores_training_mode_and_ignores_aux_heads():
    model = GCN(num_classes=3, encoder="resnet18").train()
    flops = count_flops(model, (1, 3, 64, 64))
    assert model.training and model.net.training
    assert flops > 0


def test_meta_device_count_equals_the_cpu_count():
    size = (1, 3, 64, 96)
    params, flops = model_cost(UNet, size, num_classes=11, encoder="resnet18")
    model = UNet(num_classes=11, encoder="resnet18")
    assert params == count_parameters(model) == 14_328_251
    assert flops == count_flops(model, size)


def test_parse_size():
    assert parse_size("360x480") == (360, 480)
    for bad in ("360", "ax3", "0x4"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def _markdown_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_models_flops_markdown_command(capsys):
    cmd_models(["UNet", "GCN", "--flops", "--size", "64x96", "--markdown"])
    out = capsys.readouterr().out
    rows = _markdown_rows(out)
    assert rows[0] == [
        "model",
        "params",
        "paper params",
        "GFLOPs 64x96",
        "paper's setting",
        "ours there",
        "paper",
        "description",
    ]
    assert rows[1][:2] == ["---", "---:"]
    assert [r[0] for r in rows[2:]] == ["UNet", "GCN"]
    unet = dict(zip(rows[0], rows[2], strict=True))
    assert unet["params"] == "31.04M" and unet["paper params"] == "31M"
    expected = count_flops(UNet(num_classes=11), (1, 3, 64, 96)) / 1e9
    assert unet["GFLOPs 64x96"] == f"{expected:.1f}"
    assert "2 FLOPs per multiply-accumulate" in out


def test_models_command_rejects_unknown_names():
    with pytest.raises(ConfigError, match="unknown model"):
        cmd_models(["NoSuchNet"])


@pytest.mark.slow
def test_models_flops_over_the_whole_registry():
    # the README table: every architecture at CamVid's size, through the real CLI
    out = run_cli(["models", "--flops", "--markdown"], cwd=REPO).stdout
    rows = _markdown_rows(out)[2:]
    assert sorted(r[0] for r in rows) == sorted(MODELS)
    for row in rows:
        assert re.fullmatch(r"\d+\.\d\dM", row[1]), row
        assert re.fullmatch(r"\d+\.\d", row[3]), row
    # the rich table (no --flops) still lists every model with its parameter count
    out = run_cli(["models"], cwd=REPO, env={"COLUMNS": "200"}).stdout
    assert "31.04M" in out and all(name in out for name in MODELS)


def test_flops_scale_with_the_input_area():
    model = UNet(num_classes=2, encoder="original", base_channels=4)
    small = count_flops(model, (1, 3, 32, 32))
    assert count_flops(model, (1, 3, 64, 64)) == 4 * small
    assert torch.is_grad_enabled()


def test_paper_flops_are_compared_at_the_papers_setting_and_unit(capsys):
    """DeepLabv3's 81.02 is multiply-adds of the ResNet-101 model at 513x513 (21 classes): ours is
    counted there, in GMACs, not at --size with the default backbone in GFLOPs."""
    cmd_models(["DeepLabV3", "ENet", "UNet", "--flops", "--size", "64x96", "--markdown"])
    rows = _markdown_rows(capsys.readouterr().out)
    table = {r[0]: dict(zip(rows[0], r, strict=True)) for r in rows[2:]}
    v3 = table["DeepLabV3"]
    assert v3["paper's setting"] == "513x513, 21 classes, encoder=resnet101"
    assert v3["paper"] == "81.02 GMACs"
    _, flops = model_cost(
        MODELS["DeepLabV3"], (1, 3, 513, 513), num_classes=21, encoder="resnet101"
    )
    assert v3["ours there"] == f"{flops / 2e9:.2f} GMACs"
    enet = table["ENet"]  # ENet's Table 3: GFLOPs (2 x multiply-adds) at 640x360
    assert enet["paper's setting"] == "360x640, 11 classes" and enet["paper"] == "3.83 GFLOPs"
    _, flops = model_cost(MODELS["ENet"], (1, 3, 360, 640), num_classes=11)
    assert enet["ours there"] == f"{flops / 1e9:.2f} GFLOPs"
    assert table["UNet"]["paper"] == table["UNet"]["ours there"] == "-"  # no figure: no column


def test_fixed_bilinear_filters_are_buffers_not_parameters():
    fixed = BilinearUpsample(4, 8, trainable=False)
    assert not list(fixed.parameters()) and "weight" in dict(fixed.named_buffers())
    assert "weight" in fixed.state_dict()  # checkpoints keep it under the same name
    learned = BilinearUpsample(4, 2, trainable=True)
    assert [n for n, _ in learned.named_parameters()] == ["weight"]
    # FCN-32s: its only upsampling is the fixed x32 one, so no parameter of it is counted
    net = MODELS["FCN32s"](num_classes=3).net
    buffers = sum(
        b.numel() for m in net.modules() if isinstance(m, BilinearUpsample) for b in m.buffers()
    )
    assert buffers == 3 * 64 * 64
    assert count_parameters(net) == sum(p.numel() for p in net.parameters() if p.requires_grad)
