"""ENet (Paszke, Chaurasia, Kim and Culurciello, 2016, "ENet: A Deep Neural Network Architecture
for Real-Time Semantic Segmentation", arXiv:1606.02147).

The network of the paper's Table 1 (output sizes there are for a 512x512 input):

- initial block: a 3x3 conv of stride 2 with 13 channels, concatenated with a 2x2 max-pool of the
  input (16 channels for RGB), then BN and PReLU;
- stage 1: downsampling bottleneck1.0 (16 -> 64), 4 regular bottlenecks;
- stage 2: downsampling bottleneck2.0 (64 -> 128), then regular, dilated 2, asymmetric 5,
  dilated 4, regular, dilated 8, asymmetric 5, dilated 16; stage 3: the same without 2.0;
- stage 4: upsampling bottleneck4.0 (128 -> 64), 2 regular; stage 5: upsampling 5.0 (64 -> 16),
  1 regular; a final transposed ("full") conv to the classes at the input size.

A bottleneck (Fig. 2b): the main branch is the identity, or, when downsampling, a 2x2 max-pool
whose output is zero-padded to the new channel count; the extension is a 1x1 projection to a
quarter of the output channels (a 2x2 conv of stride 2 when downsampling), the main conv (3x3
regular or dilated, 5x1 then 1x5 asymmetric, or a 3x3 transposed conv of stride 2 when
upsampling), a 1x1 expansion, and spatial dropout (0.01 in stage 1, 0.1 after); BN and PReLU
between the convs and PReLU after the sum. Projections have no bias. An upsampling bottleneck's
main branch is a 1x1 conv + BN and max-unpooling with the indices of the matching downsampling.
Details the paper leaves open follow the authors' Torch code (github.com/e-lab/ENet-training):
the decoder's bottlenecks are a quarter of their *output* channels wide, the final full conv is
2x2 of stride 2, BN eps is 1e-3. Deviations: PReLU also in the decoder and spatial dropout 0.1
there too, as the paper's text says (the authors' decoder code uses ReLU and no dropout); the
network is trained end to end rather than encoder first.

0.364M parameters for 11 classes, against the paper's 0.37M (its Table 3, which names no class
count: each class adds 65 parameters to the final full conv). 3.39 GFLOPs (multiply-adds x 2, as
torch.utils.flop_counter counts them) for a 3x640x360 input, against the paper's 3.83 GFLOPs
(Table 3, same input; it does not say what it counts).

Any input size works: every pooling rounds up (``ceil_mode``), the 2x2 conv of a downsampling
bottleneck sees its input zero-padded to an even size, and the unpooling and transposed convs
produce exactly the size that was pooled.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from seglight.errors import ConfigError
from seglight.models.base import SegmentationModel
from seglight.nn import init_classifier, init_weights, pad_or_crop_to
from seglight.profile import PaperCost

#: stages 2 and 3 of Table 1 after bottleneck2.0: (kind, dilation)
STAGE_2_3 = [
    ("regular", 1),
    ("dilated", 2),
    ("asymmetric", 1),
    ("dilated", 4),
    ("regular", 1),
    ("dilated", 8),
    ("asymmetric", 1),
    ("dilated", 16),
]


def norm_act(channels: int) -> nn.Sequential:
    """BN (eps 1e-3, as the authors') then a per-channel PReLU."""
    return nn.Sequential(nn.BatchNorm2d(channels, eps=1e-3), nn.PReLU(channels))


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)


class InitialBlock(nn.Module):
    """3x3 conv of stride 2 (16 - in_channels maps) next to a 2x2 max-pool of the input.

    Shapes: [B, in_channels, H, W] -> [B, 16, ceil(H/2), ceil(W/2)].
    """

    def __init__(self, in_channels: int, out_channels: int = 16) -> None:
        super().__init__()
        if not 0 < in_channels < out_channels:
            raise ConfigError(
                f"ENet's initial block concatenates the max-pooled input with a conv to "
                f"{out_channels} channels in all; in_channels must be 1..{out_channels - 1}, "
                f"got {in_channels}"
            )
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.act = norm_act(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(torch.cat([self.conv(x), self.pool(x)], dim=1))


class Bottleneck(nn.Module):
    """A bottleneck that keeps the size: x + extension(x), then PReLU.

    kind: "regular" (3x3), "dilated" (3x3 with `dilation`) or "asymmetric" (5x1 then 1x5).
    Shapes: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
        self, channels: int, kind: str = "regular", dilation: int = 1, dropout: float = 0.1
    ) -> None:
        super().__init__()
        internal = channels // 4
        if kind == "asymmetric":
            conv = nn.Sequential(
                nn.Conv2d(internal, internal, (5, 1), padding=(2, 0), bias=False),
                nn.Conv2d(internal, internal, (1, 5), padding=(0, 2)),
            )
        else:
            conv = nn.Conv2d(internal, internal, 3, padding=dilation, dilation=dilation)
        self.extension = nn.Sequential(
            conv1x1(channels, internal),
            norm_act(internal),
            conv,
            norm_act(internal),
            conv1x1(internal, channels),
            nn.BatchNorm2d(channels, eps=1e-3),
            nn.Dropout2d(dropout),
        )
        self.act = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.extension(x))


class DownsamplingBottleneck(nn.Module):
    """Max-pool (indices kept) + channel zero-padding, next to 2x2/2 conv, 3x3, 1x1, dropout.

    Shapes: [B, C_in, H, W] -> ([B, C_out, ceil(H/2), ceil(W/2)], pooling indices).
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        internal = out_channels // 4
        self.pad_channels = out_channels - in_channels
        self.pool = nn.MaxPool2d(2, ceil_mode=True, return_indices=True)
        self.extension = nn.Sequential(
            nn.Conv2d(in_channels, internal, kernel_size=2, stride=2, bias=False),
            norm_act(internal),
            nn.Conv2d(internal, internal, 3, padding=1),
            norm_act(internal),
            conv1x1(internal, out_channels),
            nn.BatchNorm2d(out_channels, eps=1e-3),
            nn.Dropout2d(dropout),
        )
        self.act = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        main, indices = self.pool(x)
        main = F.pad(main, (0, 0, 0, 0, 0, self.pad_channels))  # zero feature maps
        # an odd side is zero-padded so that the strided conv matches the ceil_mode pooling
        h, w = x.shape[-2:]
        extension = self.extension(F.pad(x, (0, w % 2, 0, h % 2)))
        return self.act(main + extension), indices


class UpsamplingBottleneck(nn.Module):
    """1x1 conv + max-unpool (the matching pooling's indices) next to 1x1, 3x3 transposed conv
    of stride 2, 1x1, dropout.

    Shapes: [B, C_in, h, w] -> [B, C_out, H, W], (H, W) the size before the matching pooling.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        internal = out_channels // 4
        self.main = nn.Sequential(
            conv1x1(in_channels, out_channels), nn.BatchNorm2d(out_channels, eps=1e-3)
        )
        self.unpool = nn.MaxUnpool2d(2)
        self.project = nn.Sequential(conv1x1(in_channels, internal), norm_act(internal))
        self.up = nn.ConvTranspose2d(internal, internal, 3, stride=2, padding=1)
        self.expand = nn.Sequential(
            norm_act(internal),
            conv1x1(internal, out_channels),
            nn.BatchNorm2d(out_channels, eps=1e-3),
            nn.Dropout2d(dropout),
        )
        self.act = nn.PReLU(out_channels)

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        main = self.unpool(self.main(x), indices, output_size=size)
        # output_size picks the output padding: 2h - 1 or 2h rows, whichever was pooled
        extension = self.expand(self.up(self.project(x), output_size=size))
        return self.act(main + extension)


class ENetNetwork(nn.Module):
    """ENet as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W].

    Args:
        num_classes: output classes.
        in_channels: input channels (1 to 15: the initial block's conv makes up the other maps).
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.initial = InitialBlock(in_channels, 16)
        self.down1 = DownsamplingBottleneck(16, 64, dropout=0.01)
        self.stage1 = nn.Sequential(*(Bottleneck(64, dropout=0.01) for _ in range(4)))
        self.down2 = DownsamplingBottleneck(64, 128, dropout=0.1)
        self.stage2 = nn.Sequential(*(Bottleneck(128, k, d, 0.1) for k, d in STAGE_2_3))
        self.stage3 = nn.Sequential(*(Bottleneck(128, k, d, 0.1) for k, d in STAGE_2_3))
        self.up4 = UpsamplingBottleneck(128, 64, dropout=0.1)
        self.stage4 = nn.Sequential(Bottleneck(64), Bottleneck(64))
        self.up5 = UpsamplingBottleneck(64, 16, dropout=0.1)
        self.stage5 = Bottleneck(16)
        self.fullconv = nn.ConvTranspose2d(16, num_classes, kernel_size=2, stride=2)
        init_weights(self)
        init_classifier(self.fullconv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        x = self.initial(x)
        size1 = tuple(x.shape[-2:])
        x, indices1 = self.down1(x)
        x = self.stage1(x)
        size2 = tuple(x.shape[-2:])
        x, indices2 = self.down2(x)
        x = self.stage3(self.stage2(x))
        x = self.stage4(self.up4(x, indices2, size2))
        x = self.stage5(self.up5(x, indices1, size1))
        return pad_or_crop_to(self.fullconv(x), size)  # 2 * ceil(H / 2) -> H


class ENet(SegmentationModel):
    """ENet (Paszke et al. 2016): a real-time encoder-decoder of bottlenecks, 0.37M parameters.

    paper_params and paper_cost: Table 3 of the paper (GFLOPs, i.e. 2 x multiply-adds as its
    SegNet figure shows, for a 3x640x360 input).
    The network has no options: Table 1 fixes it.
    """

    paper_params: ClassVar[float | None] = 0.37
    paper_cost = PaperCost(3.83, "GFLOPs", (360, 640))

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = ENetNetwork(self.num_classes, self.in_channels)
