"""DDRNet (Hong, Pan, Sun and Jia 2021, "Deep Dual-resolution Networks for Real-time and Accurate
Semantic Segmentation of Road Scenes"), DDRNet-23-slim and DDRNet-23 (Table 1, Fig. 3-5), as in
the authors' released code (ydhongHIT/DDRNet, ``DDRNet_23_slim.py`` / ``DDRNet_23.py``):

- a stem of two 3x3 stride-2 conv-BN-ReLU (1/4), then ResNet basic blocks: stage 1 (C, two
  blocks), stage 2 (2C, 1/8, two blocks);
- from stage 3 on, two branches: a low-resolution one that keeps downsampling (4C at 1/16, 8C at
  1/32, then a bottleneck block to 16C at 1/64) and a high-resolution one that stays at 1/8 with 2C
  channels; after stages 3 and 4 they exchange information bilaterally: high-to-low by strided 3x3
  convs (one per halving), low-to-high by a 1x1 conv (+BN) and bilinear upsampling, added;
- the Deep Aggregation Pyramid Pooling Module (DAPPM, Fig. 5) on the 1/64 features: average pools
  with kernels 5/9/17 and strides 2/4/8, and global pooling, each BN-ReLU-1x1 conv to 128 and
  upsampled, fused hierarchically (each added to the previous scale, BN-ReLU-3x3 conv),
  concatenated, compressed to 4C by BN-ReLU-1x1 conv, plus a 1x1 shortcut;
- its output upsampled to 1/8 and added to the high-resolution branch, then the segmentation head
  (BN-ReLU-3x3 conv to 64 (slim) / 128, BN-ReLU-1x1 classifier), upsampled 8x to the input;
- the auxiliary head (the same head on the high-resolution branch after stage 3's exchange),
  weight 0.4 in the paper (Sec. 4.2; seglight's default ``aux_weight``). Training returns
  {"out", "aux"}.

C = 32 for 23-slim and 64 for 23. Within a stage every block ends in ReLU but the last, which
ends without: the next operation (a fusion's ReLU, the next stage's input ReLU, DAPPM's or the
head's BN-ReLU) applies it (the released ``_make_layer`` and ``no_relu``; the one-block bottleneck
stages at 1/64 and on the high-resolution branch end without ReLU too). The logits are resized to the input (any size) rather
than upsampled by exactly 8.

Difference: in training, a DAPPM pooled map with fewer than three values per channel (inputs under
~200 pixels a side) is normalised with the BatchNorm's running statistics (batch statistics of one
or two values are undefined or degenerate: two equal values normalise to 0).

Size (Cityscapes, 19 classes, 1024x2048; the paper's "GFLOPs" are multiply-adds): 23-slim 5.7M and
36.3 GFLOPs, 23 20.1M and 143.1 GFLOPs (Table 4). Ours: 5.70M and 20.15M without the aux head
(the paper's counts), 5.73M and 20.30M with it; 36.3 and 143.1 GMACs at 1024x2048 (half our
GFLOPs), as the paper's.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from seglight.errors import ConfigError
from seglight.models.base import SegmentationModel
from seglight.nn import ConvNormAct, classifier_conv, init_weights, resize_to
from seglight.nn.context import norm_pooled
from seglight.profile import PaperCost

#: base width C, DAPPM width, head width per variant (the released code's planes, spp_planes,
#: head_planes)
VARIANTS: dict[str, tuple[int, int, int]] = {"23-slim": (32, 128, 64), "23": (64, 128, 128)}


class Block(nn.Module):
    """ResNet basic (expansion 1) or bottleneck (expansion 2, DDRNet's) block; `relu=False` leaves
    the output before the final ReLU (the next operation applies it).

    Shapes: [B, in_channels, H, W] -> [B, channels * expansion, H / stride, W / stride].
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        bottleneck: bool = False,
        relu: bool = True,
    ) -> None:
        super().__init__()
        out = channels * (2 if bottleneck else 1)
        if bottleneck:
            self.body = nn.Sequential(
                ConvNormAct(in_channels, channels, 1),
                ConvNormAct(channels, channels, 3, stride=stride),
                ConvNormAct(channels, out, 1, act=False),
            )
        else:
            self.body = nn.Sequential(
                ConvNormAct(in_channels, channels, 3, stride=stride),
                ConvNormAct(channels, out, 3, act=False),
            )
        self.shortcut = (
            ConvNormAct(in_channels, out, 1, stride=stride, act=False)
            if stride != 1 or in_channels != out
            else nn.Identity()
        )
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x) + self.shortcut(x)
        return torch.relu(y) if self.relu else y


def stage(in_channels: int, channels: int, blocks: int, stride: int = 1, bottleneck: bool = False):
    """`blocks` blocks, the first with `stride`; every block but the last ends in ReLU, the last
    without (the next operation applies it). As the released ``_make_layer``: its first block
    takes the block's default ``no_relu`` (False for BasicBlock, True for Bottleneck, DDRNet's
    stages being two basic blocks or one bottleneck), the later ones ``no_relu`` on the last."""
    out = channels * (2 if bottleneck else 1)
    return nn.Sequential(
        *(
            Block(
                in_channels if i == 0 else out,
                channels,
                stride if i == 0 else 1,
                bottleneck,
                relu=i < blocks - 1,
            )
            for i in range(blocks)
        )
    )


def norm_act_conv(in_channels: int, out_channels: int, kernel_size: int = 1) -> nn.Sequential:
    """BN -> ReLU -> conv (no bias): DDRNet's pre-activation unit in DAPPM and the heads."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(),
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
    )


class DAPPM(nn.Module):
    """Deep Aggregation Pyramid Pooling Module (DDRNet Fig. 5).

    Shapes: [B, in_channels, h, w] -> [B, out_channels, h, w].
    """

    def __init__(self, in_channels: int, branch_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pools = nn.ModuleList(
            [nn.AvgPool2d(k, s, k // 2) for k, s in ((5, 2), (9, 4), (17, 8))]
            + [nn.AdaptiveAvgPool2d(1)]
        )
        self.scales = nn.ModuleList(norm_act_conv(in_channels, branch_channels) for _ in range(5))
        self.process = nn.ModuleList(
            norm_act_conv(branch_channels, branch_channels, 3) for _ in range(4)
        )
        self.compression = norm_act_conv(5 * branch_channels, out_channels)
        self.shortcut = norm_act_conv(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        outs = [self.scales[0](x)]
        for pool, scale, process in zip(self.pools, self.scales[1:], self.process, strict=True):
            pooled = pool(x)
            norm, act, conv = scale
            # a pooled map of a small input has one or two values per channel (equal ones when
            # the kernel covers the whole map): normalised with running statistics then
            y = conv(act(norm_pooled(norm, pooled, min_values=3)))
            outs.append(process(resize_to(y, size) + outs[-1]))
        return self.compression(torch.cat(outs, dim=1)) + self.shortcut(x)


class SegHead(nn.Sequential):
    """DDRNet's head: BN-ReLU-3x3 conv to `channels`, BN-ReLU-1x1 classifier (with bias).

    Shapes: [B, in_channels, h, w] -> [B, num_classes, h, w].
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int) -> None:
        super().__init__(
            norm_act_conv(in_channels, channels, 3),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            classifier_conv(channels, num_classes, 1),
        )


class DDRNetNetwork(nn.Module):
    """DDRNet as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W]
    (eval), or {"out": logits, "aux": [B, num_classes, ~H/8, ~W/8]} in training with `aux`.

    Args:
        num_classes: output classes.
        in_channels: input channels.
        variant: "23-slim" (C = 32) or "23" (C = 64).
        aux: build the auxiliary head on the high-resolution branch after stage 3.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        variant: Literal["23-slim", "23"] = "23-slim",
        aux: bool = True,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(
                f"DDRNet variant must be one of {', '.join(VARIANTS)}, got {variant!r}"
            )
        c, spp, head = VARIANTS[variant]
        self.stem = nn.Sequential(
            ConvNormAct(in_channels, c, 3, stride=2), ConvNormAct(c, c, 3, stride=2)
        )
        self.layer1 = stage(c, c, 2)
        self.layer2 = stage(c, 2 * c, 2, stride=2)
        self.layer3 = stage(2 * c, 4 * c, 2, stride=2)  # low resolution, 1/16
        self.layer3_ = stage(2 * c, 2 * c, 2)  # high resolution, 1/8
        self.layer4 = stage(4 * c, 8 * c, 2, stride=2)  # 1/32
        self.layer4_ = stage(2 * c, 2 * c, 2)
        self.layer5 = stage(8 * c, 8 * c, 1, stride=2, bottleneck=True)  # 1/64, 16C
        self.layer5_ = stage(2 * c, 2 * c, 1, bottleneck=True)  # 4C
        self.down3 = ConvNormAct(2 * c, 4 * c, 3, stride=2, act=False)
        self.down4 = nn.Sequential(
            ConvNormAct(2 * c, 4 * c, 3, stride=2),
            ConvNormAct(4 * c, 8 * c, 3, stride=2, act=False),
        )
        self.compress3 = ConvNormAct(4 * c, 2 * c, 1, act=False)
        self.compress4 = ConvNormAct(8 * c, 2 * c, 1, act=False)
        self.spp = DAPPM(16 * c, spp, 4 * c)
        self.head = SegHead(4 * c, head, num_classes)
        self.aux_head = SegHead(2 * c, head, num_classes) if aux else None
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        size = tuple(x.shape[-2:])
        relu = torch.relu
        x2 = self.layer2(relu(self.layer1(self.stem(x))))  # 1/8 (no final ReLU)
        # bilateral fusion after stages 3 and 4: each branch gets the other's output of the stage
        # (the low branch's before its own fusion, as in the released code)
        low3, high = self.layer3(relu(x2)), self.layer3_(relu(x2))
        low = low3 + self.down3(relu(high))
        high = high + resize_to(self.compress3(relu(low3)), tuple(high.shape[-2:]))
        aux_in = high
        low4, high = self.layer4(relu(low)), self.layer4_(relu(high))
        low = low4 + self.down4(relu(high))
        high = high + resize_to(self.compress4(relu(low4)), tuple(high.shape[-2:]))
        high = self.layer5_(relu(high))
        context = resize_to(self.spp(self.layer5(relu(low))), tuple(high.shape[-2:]))
        out = resize_to(self.head(context + high), size)
        if self.training and self.aux_head is not None:
            return {"out": out, "aux": self.aux_head(aux_in)}
        return out


class DDRNet(SegmentationModel):
    """DDRNet (Hong et al. 2021): dual-resolution branches with bilateral fusion + DAPPM.

    paper_params / paper_gflops: DDRNet-23-slim on Cityscapes (19 classes, 1024x2048,
    multiply-adds), Table 4; DDRNet-23: 20.1M / 143.1.

    Args:
        variant: "23-slim" (default) or "23".
        aux: auxiliary head on the high-resolution branch, weight `aux_weight` (0.4, the paper's).
    """

    paper_params: ClassVar[float | None] = 5.7
    paper_cost = PaperCost(36.3, "GMACs", (1024, 2048), 19)

    def __init__(
        self, variant: Literal["23-slim", "23"] = "23-slim", aux: bool = True, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.net = DDRNetNetwork(self.num_classes, self.in_channels, variant=variant, aux=aux)
