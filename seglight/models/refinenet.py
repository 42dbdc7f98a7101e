"""RefineNet (Lin, Milan, Shen and Reid, CVPR 2017, "RefineNet: Multi-Path Refinement Networks for
High-Resolution Semantic Segmentation"): the 4-cascaded RefineNet of the paper's Fig. 2(c) on a
ResNet encoder (ResNet-101 by default, the paper's main model; any timm model works).

Each RefineNet block (the paper's Fig. 2(a), Sec. 3.2):
- adaptive convolutions: every input path goes through two residual convolution units (RCU:
  ReLU, 3x3 conv, ReLU, 3x3 conv, plus the identity; no batch norm) at that path's width, 512 for
  RefineNet-4 and 256 for the others, as in the paper;
- multi-resolution fusion: a 3x3 conv per path to the smallest width, upsampling (bilinear) to the
  largest resolution, summation (skipped for RefineNet-4, which has one path);
- chained residual pooling (CRP): a ReLU, then a chain of (5x5 max-pool stride 1, 3x3 conv)
  blocks, each block's output summed into the path (two blocks, as in Fig. 2(d));
- an output RCU.
RefineNet-4 takes the stride-32 features; RefineNet-3..1 fuse the previous block's output with the
stride-16, 8 and 4 features. Two more RCUs follow RefineNet-1 before the prediction, as in the
paper (so that three RCUs precede it, as they separate the blocks), then the classifier; the
stride-4 logits are upsampled (bilinear) to the input size.

Not in the paper's text, taken from the authors' released model: a 3x3 conv (no bias) that
reduces each encoder feature to its path's width before the RCUs (2048 -> 512, 1024/512/256 ->
256), without which the identity of the first RCU would not fit, and a 3x3 classifier.

Parameters (11 classes, ResNet-101): 109.8M, of which 42.5M are the encoder. The RefineNet paper
gives no parameter or FLOP count, so `paper_params` is None. The authors' released model has four
CRP blocks per RefineNet where Fig. 2(d) draws two: ``crp_blocks: 4`` gives 118.0M, the 118M that
Nekrasov et al. (BMVC 2018, "Light-Weight RefineNet") report for RefineNet-101.

The decoder has no normalisation, as in the paper; it keeps PyTorch's default conv init (uniform,
gain well below 1): Kaiming fan-out init grows the activations at each of its ~20 residual units
(initial logits with a standard deviation of ~4000 instead of ~0.08 on ResNet-18).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seglight.errors import ConfigError
from seglight.models.base import SegmentationModel
from seglight.nn import TimmEncoder


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # F.interpolate rather than seglight.nn.resize_to, whose same-size shortcut is a Python branch
    # on the shape that an exported graph (ONNX, torch.export) would freeze at the example's size
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def conv3x3(in_channels: int, out_channels: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)


class ResidualConvUnit(nn.Module):
    """RCU (Fig. 2(b)): x + conv(relu(conv(relu(x)))), 3x3 convs, no norm. [B,C,H,W] -> same."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.conv2 = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # not in place: x is still needed for the identity
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class ChainedResidualPooling(nn.Module):
    """CRP (Fig. 2(d)): relu(x) + b1 + b2 + ..., b_i = conv3x3(maxpool5x5(b_{i-1})), b_0 = relu(x).

    Each pooling is stride 1, so the chain sees ever larger windows at full resolution.
    Shapes: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int, blocks: int = 2):
        super().__init__()
        self.pool = nn.MaxPool2d(5, stride=1, padding=2)
        self.convs = nn.ModuleList(conv3x3(channels, channels, bias=False) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        path = x
        for conv in self.convs:
            path = conv(self.pool(path))
            x = x + path
        return x


class RefineNetBlock(nn.Module):
    """One RefineNet (Fig. 2(a)) over 1 or 2 input paths, the highest-resolution path first.

    Args:
        path_channels: channels of each input path; the output has the smallest of them.
        crp_blocks: pooling blocks in the chained residual pooling.

    Shapes: list of [B, path_channels[i], h_i, w_i] -> [B, min(path_channels), h_0, w_0].
    """

    def __init__(self, path_channels: list[int], crp_blocks: int = 2):
        super().__init__()
        out_channels = min(path_channels)
        self.adapt = nn.ModuleList(
            nn.Sequential(ResidualConvUnit(c), ResidualConvUnit(c)) for c in path_channels
        )
        # a single path "directly goes through [the fusion] without changes" (Sec. 3.2)
        self.fuse = (
            nn.ModuleList(conv3x3(c, out_channels, bias=False) for c in path_channels)
            if len(path_channels) > 1
            else None
        )
        self.crp = ChainedResidualPooling(out_channels, crp_blocks)
        self.out = ResidualConvUnit(out_channels)

    def forward(self, paths: list[torch.Tensor]) -> torch.Tensor:
        paths = [adapt(x) for adapt, x in zip(self.adapt, paths, strict=True)]
        x = paths[0]
        if self.fuse is not None:
            x = self.fuse[0](x)
            for conv, p in zip(self.fuse[1:], paths[1:], strict=True):
                x = x + upsample(conv(p), tuple(paths[0].shape[-2:]))
        return self.out(self.crp(x))


class RefineNetNetwork(nn.Module):
    """4-cascaded RefineNet as a plain nn.Module: [B, in_channels, H, W] -> [B, num_classes, H, W].

    Args:
        num_classes: output classes.
        in_channels: input channels.
        encoder: a timm model name; its four deepest feature maps feed RefineNet-1..4.
        encoder_weights: null, "imagenet", a file or a URL (seglight.nn.encoders).
        channels: path width of RefineNet-1..4, shallow to deep (paper: 256, 256, 256, 512).
        crp_blocks: pooling blocks in each chained residual pooling (paper: 2; released code: 4).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str = "resnet101",
        encoder_weights: str | None = None,
        channels: tuple[int, int, int, int] = (256, 256, 256, 512),
        crp_blocks: int = 2,
    ):
        super().__init__()
        if len(channels) != 4 or min(channels) < 1:
            raise ConfigError(f"channels needs 4 positive widths (RefineNet-1..4), got {channels}")
        if crp_blocks < 1:
            raise ConfigError(f"crp_blocks must be >= 1, got {crp_blocks}")
        self.encoder = TimmEncoder(encoder, encoder_weights, in_channels)
        if len(self.encoder.channels) < 4:
            raise ConfigError(
                f"RefineNet needs an encoder with 4 feature levels; {encoder!r} has "
                f"{len(self.encoder.channels)}"
            )
        features = self.encoder.channels[-4:]
        self.reduce = nn.ModuleList(
            conv3x3(c, w, bias=False) for c, w in zip(features, channels, strict=True)
        )
        # deepest first: RefineNet-4 has one path, RefineNet-3..1 fuse (feature, previous output)
        blocks = [RefineNetBlock([channels[3]], crp_blocks)]
        for i in (2, 1, 0):
            blocks.append(RefineNetBlock([channels[i], min(channels[i + 1 :])], crp_blocks))
        self.refine = nn.ModuleList(blocks)
        width = min(channels)
        self.head = nn.Sequential(
            ResidualConvUnit(width), ResidualConvUnit(width), conv3x3(width, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        features = [r(f) for r, f in zip(self.reduce, self.encoder(x)[-4:], strict=True)]
        y = self.refine[0]([features[3]])
        for block, feature in zip(self.refine[1:], features[2::-1], strict=True):
            y = block([feature, y])
        return upsample(self.head(y), size)


class RefineNet(SegmentationModel):
    """RefineNet (Lin et al. 2017): 4-cascaded multi-path refinement on a ResNet encoder.

    The paper reports no parameter or FLOP count (see the module docstring).

    Args:
        encoder: any timm model name (paper: resnet101; resnet152 for its best results).
        encoder_weights: null (from scratch), "imagenet", a weights file or a URL.
        channels: path widths of RefineNet-1..4, shallow to deep (paper: [256, 256, 256, 512]).
        crp_blocks: pooling blocks in each chained residual pooling (paper: 2; released code: 4).
    """

    def __init__(
        self,
        encoder: str = "resnet101",
        encoder_weights: str | None = None,
        channels: tuple[int, int, int, int] = (256, 256, 256, 512),
        crp_blocks: int = 2,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = RefineNetNetwork(
            self.num_classes,
            self.in_channels,
            encoder=encoder,
            encoder_weights=encoder_weights,
            channels=tuple(channels),
            crp_blocks=crp_blocks,
        )
