"""BiSeNet V2 (Yu, Gao, Wang, Yu, Shen and Sang, IJCV 2021, "BiSeNet V2: Bilateral Network with
Guided Aggregation for Real-time Semantic Segmentation"), Fig. 3, Tables 1-2, as in
mmsegmentation's ``BiSeNetV2`` (which the paper's numbers are usually reproduced with):

- Detail branch (Table 1): three stages of 3x3 conv-BN-ReLU, 64/64/128 channels, each starting
  with stride 2, 2/3/3 convs (1/8 of the input);
- Semantic branch: the Stem block (3x3 stride-2 conv to 16; a 1x1-to-8 + 3x3 stride-2 conv path
  beside a 3x3 max pool, concatenated, fused by a 3x3 conv; 1/4), Gather-and-Expansion layers
  (expansion 6; stride 2 with two depthwise convs and a depthwise-separable shortcut) to 32 (1/8),
  64 (1/16) and 128 (1/32, four layers), and the Context Embedding block (global average pooling,
  BN, 1x1 conv, added, 3x3 conv);
- Bilateral Guided Aggregation (Fig. 6): each branch gates the other (sigmoid), at 1/8 and 1/32,
  summed at 1/8 and fused by a 3x3 conv;
- the segmentation head (3x3 conv-BN-ReLU to 1024, dropout 0.1, 1x1 classifier) and four booster
  (auxiliary) heads on the Stem and the three later semantic stages (to 16/64/256/1024 channels,
  two 3x3 convs each, as mmsegmentation's configs), used in training only: the network returns
  {"out", "aux": [four logits]} and SegmentationModel adds ``aux_weight`` times each head's loss
  (the paper weights every loss 1: ``aux_weight: 1.0`` in the experiment files).

The paper gives 21.15 GFLOPs (multiply-adds) for a 512x1024 input, 19 classes (Table 8, Cityscapes)
and no parameter count. Ours at that setting: 24.6 GMACs (9.8 of them in the 1024-channel
segmentation head at 1/8, whose width the paper does not state) and 3.36M parameters without the
booster heads (14.80M with them: the 1024-channel booster on the 1/32 features holds 10.3M).
"""

from __future__ import annotations

import torch
from torch import nn

from seglight.models.base import SegmentationModel
from seglight.nn import ConvNormAct, FCNHead, init_weights, resize_to
from seglight.nn.context import norm_pooled
from seglight.profile import PaperCost


def dw_conv(channels: int, stride: int = 1, act: bool = False) -> ConvNormAct:
    """3x3 depthwise conv-BN (no activation by default)."""
    return ConvNormAct(channels, channels, 3, stride=stride, groups=channels, act=act)


class StemBlock(nn.Module):
    """Shapes: [B, in_channels, H, W] -> [B, 16, H/4, W/4]."""

    def __init__(self, in_channels: int, channels: int = 16) -> None:
        super().__init__()
        self.first = ConvNormAct(in_channels, channels, 3, stride=2)
        self.conv = nn.Sequential(
            ConvNormAct(channels, channels // 2, 1),
            ConvNormAct(channels // 2, channels, 3, stride=2),
        )
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.fuse = ConvNormAct(2 * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        return self.fuse(torch.cat([self.conv(x), self.pool(x)], dim=1))


class GatherExpansion(nn.Module):
    """Gather-and-Expansion layer (Fig. 5 b/c): 3x3 conv-BN-ReLU, depthwise expansion by 6 (two
    depthwise convs when striding), 1x1 projection-BN, residual (a depthwise-separable shortcut
    when striding), ReLU.

    Shapes: [B, in_channels, H, W] -> [B, out_channels, H / stride, W / stride].
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, expansion: int = 6):
        super().__init__()
        mid = in_channels * expansion
        self.conv = ConvNormAct(in_channels, in_channels, 3)
        expand = ConvNormAct(in_channels, mid, 3, stride=stride, groups=in_channels, act=False)
        self.dw = nn.Sequential(expand, dw_conv(mid)) if stride > 1 else expand
        self.project = ConvNormAct(mid, out_channels, 1, act=False)
        self.shortcut = (
            nn.Sequential(
                dw_conv(in_channels, stride), ConvNormAct(in_channels, out_channels, 1, act=False)
            )
            if stride > 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.project(self.dw(self.conv(x))) + self.shortcut(x))


class ContextEmbedding(nn.Module):
    """Context Embedding block (Fig. 5 a): GAP -> BN -> 1x1 conv-BN-ReLU, added, 3x3 conv-BN-ReLU.

    Shapes: [B, C, h, w] -> [B, C, h, w].
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        # its shift is exactly cancelled by the BatchNorm after the 1x1 conv (a per-channel
        # constant, removed with the batch mean): frozen at zero, it would never get a gradient
        self.norm.bias.requires_grad_(False)
        self.gap_conv = ConvNormAct(channels, channels, 1)
        self.last = ConvNormAct(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = norm_pooled(self.norm, x.mean((2, 3), keepdim=True))  # batch 1 in training
        g = self.gap_conv[0](g)
        g = self.gap_conv[2](norm_pooled(self.gap_conv[1], g))
        return self.last(x + g)


class GuidedAggregation(nn.Module):
    """Bilateral Guided Aggregation (Fig. 6).

    Shapes: detail [B, C, H/8, W/8], semantic [B, C, H/32, W/32] -> [B, C, H/8, W/8].
    """

    def __init__(self, channels: int = 128) -> None:
        super().__init__()

        def dw_pw() -> nn.Sequential:  # 3x3 depthwise conv-BN, then a 1x1 conv (bias, no norm)
            return nn.Sequential(dw_conv(channels), nn.Conv2d(channels, channels, 1))

        self.detail_keep = dw_pw()
        self.detail_down = nn.Sequential(
            ConvNormAct(channels, channels, 3, stride=2, act=False),
            nn.AvgPool2d(3, stride=2, padding=1),
        )
        self.semantic_up = ConvNormAct(channels, channels, 3, act=False)
        self.semantic_keep = dw_pw()
        self.fuse = ConvNormAct(channels, channels, 3)

    def forward(self, detail: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        size = tuple(detail.shape[-2:])
        high = self.detail_keep(detail) * torch.sigmoid(resize_to(self.semantic_up(semantic), size))
        down = self.detail_down(detail)
        low = down * torch.sigmoid(resize_to(self.semantic_keep(semantic), tuple(down.shape[-2:])))
        return self.fuse(high + resize_to(low, size))


class BiSeNetV2Network(nn.Module):
    """BiSeNet V2 as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W]
    (eval), or {"out": logits, "aux": [4 booster logits at 1/4..1/32]} in training with `aux`.

    Args:
        num_classes: output classes.
        in_channels: input channels.
        aux: build the four booster heads.
        head_channels: width of the segmentation head (1024).
    """

    def __init__(
        self, num_classes: int, in_channels: int = 3, aux: bool = True, head_channels: int = 1024
    ) -> None:
        super().__init__()

        def detail_stage(cin: int, cout: int, n: int) -> list[nn.Module]:
            return [ConvNormAct(cin, cout, 3, stride=2)] + [
                ConvNormAct(cout, cout, 3) for _ in range(n - 1)
            ]

        self.detail = nn.Sequential(
            *detail_stage(in_channels, 64, 2), *detail_stage(64, 64, 3), *detail_stage(64, 128, 3)
        )
        self.stem = StemBlock(in_channels, 16)
        self.stages = nn.ModuleList(
            nn.Sequential(
                GatherExpansion(cin, cout, 2), *(GatherExpansion(cout, cout) for _ in range(n - 1))
            )
            for cin, cout, n in ((16, 32, 2), (32, 64, 2), (64, 128, 4))
        )
        self.context = ContextEmbedding(128)
        self.aggregate = GuidedAggregation(128)
        self.head = FCNHead(128, num_classes, head_channels)
        self.boosters = (
            nn.ModuleList(
                FCNHead(c, num_classes, mid, convs=2)
                for c, mid in ((16, 16), (32, 64), (64, 256), (128, 1024))
            )
            if aux
            else None
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        size = tuple(x.shape[-2:])
        semantic = [self.stem(x)]
        for stage in self.stages:
            semantic.append(stage(semantic[-1]))
        out = self.head(self.aggregate(self.detail(x), self.context(semantic[-1])))
        out = resize_to(out, size)
        if self.training and self.boosters is not None:
            aux = [head(f) for head, f in zip(self.boosters, semantic, strict=True)]
            return {"out": out, "aux": aux}
        return out


class BiSeNetV2(SegmentationModel):
    """BiSeNet V2 (Yu et al. 2021): detail + semantic branches, guided aggregation, boosters.

    paper_gflops: 512x1024 input, Cityscapes (19 classes), multiply-adds, Table 8 (see the module
    docstring for how ours compare).

    Args:
        aux: the four booster heads (training only), weight `aux_weight` (the paper: 1.0).
    """

    paper_cost = PaperCost(21.15, "GMACs", (512, 1024), 19)

    def __init__(self, aux: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = BiSeNetV2Network(self.num_classes, self.in_channels, aux=aux)
