"""LinkNet (Chaurasia and Culurciello, VCIP 2017, "LinkNet: Exploiting Encoder Representations for
Efficient Semantic Segmentation").

The paper's network (its Fig. 2-3 and Table 1) on any timm encoder (ResNet-18 by default, as in
the paper):

- encoder: the encoder's four deepest feature maps (ResNet-18's blocks 1-4: 64, 128, 256, 512
  channels at strides 4, 8, 16, 32);
- decoder block i (m -> n channels): 1x1 conv to m/4, 3x3 full (transposed) conv of stride 2,
  1x1 conv to n, each with BN and ReLU; decoders 4, 3, 2 are (512, 256), (256, 128), (128, 64) and
  decoder 1 is (64, 64) with stride 1, since ResNet's block 1 does not downsample;
- the input of each encoder block is *added* to the output of its decoder (not concatenated, so
  the decoder stays narrow): d4 = dec4(e4) + e3, d3 = dec3(d4) + e2, d2 = dec2(d3) + e1;
- classifier: 3x3 full conv of stride 2 (64 -> 32), 3x3 conv (32 -> 32), 2x2 full conv of stride
  2 (32 -> classes), back at the input size.

Deviation: the input of encoder block 1 (ResNet's stem after max-pooling) is not among the
feature maps a timm encoder returns, so decoder 1 gets block 1's *output* instead:
d1 = dec1(d2) + e1 (the same size and channels; no parameter changes). Decoder convs have no
bias (as in the authors' code, github.com/e-lab/pytorch-linknet).

11.53M parameters for 11 classes with ResNet-18, against the paper's 11.5M (its Table 2, which
names no class count: each class adds 129 parameters) and 21.2 GFLOPs (the same table, next to
ENet's 3.83 GFLOPs, which ENet's paper gives for a 3x640x360 input). For another encoder, its four deepest maps are used (their strides must double) and the
decoder widths follow its channels.

Any input size works: each full conv's output is cropped (or padded) to its lateral's size.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from seglight.errors import ConfigError
from seglight.models.base import SegmentationModel
from seglight.nn import (
    ConvNormAct,
    TimmEncoder,
    init_classifier,
    init_weights,
    pad_or_crop_to,
    resize_to,
)
from seglight.profile import PaperCost


def full_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Module:
    """Transposed conv giving exactly `stride` x the input size (3x3: padding 1)."""
    padding = (kernel_size - 1) // 2
    return nn.ConvTranspose2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        output_padding=stride + 2 * padding - kernel_size,
        bias=False,
    )


class LinkNetDecoderBlock(nn.Module):
    """1x1 conv to in/4, 3x3 full conv of `stride`, 1x1 conv to `out_channels` (BN-ReLU each).

    Shapes: [B, in_channels, h, w] -> [B, out_channels, H, W], (H, W) = `size` (~stride x h).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        mid = in_channels // 4
        self.reduce = ConvNormAct(in_channels, mid, kernel_size=1)
        self.up = full_conv(mid, mid, 3, stride)
        self.up_act = nn.Sequential(nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.expand = ConvNormAct(mid, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = pad_or_crop_to(self.up(self.reduce(x)), size)
        return self.expand(self.up_act(x))


class LinkNetNetwork(nn.Module):
    """LinkNet as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W].

    Args:
        num_classes: output classes.
        in_channels: input channels.
        encoder: a timm model name (resnet18 in the paper).
        encoder_weights: null, "imagenet", a file or a URL (seglight.nn.encoders).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str = "resnet18",
        encoder_weights: str | None = None,
    ) -> None:
        super().__init__()
        self.encoder = TimmEncoder(encoder, encoder_weights, in_channels)
        channels, strides = self.encoder.channels[-4:], self.encoder.reductions[-4:]
        if len(strides) < 4 or strides != [strides[0] * 2**i for i in range(4)]:
            raise ConfigError(
                f"LinkNet needs an encoder whose four deepest feature maps have doubling strides "
                f"(e.g. 4, 8, 16, 32); {encoder!r} has strides {self.encoder.reductions}"
            )
        self.first_stride = strides[0]
        # deepest first: (512 -> 256), (256 -> 128), (128 -> 64), (64 -> 64, stride 1)
        self.decoder = nn.ModuleList(
            LinkNetDecoderBlock(channels[i], channels[max(i - 1, 0)], stride=2 if i else 1)
            for i in (3, 2, 1, 0)
        )
        self.classifier = nn.Sequential(
            full_conv(channels[0], 32, 3, stride=2),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            ConvNormAct(32, 32, kernel_size=3),
            nn.ConvTranspose2d(32, num_classes, kernel_size=2, stride=2),
        )
        init_weights(self.decoder)
        init_weights(self.classifier)
        init_classifier(self.classifier[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        e1, e2, e3, e4 = self.encoder(x)[-4:]
        d = e4
        for block, lateral in zip(self.decoder, (e3, e2, e1, e1), strict=True):
            d = block(d, tuple(lateral.shape[-2:])) + lateral  # added, not concatenated
        logits = self.classifier(d)
        # stride-4 features come back 4x (rounded up: crop); any other stride is resized
        return pad_or_crop_to(logits, size) if self.first_stride == 4 else resize_to(logits, size)


class LinkNet(SegmentationModel):
    """LinkNet (Chaurasia and Culurciello 2017): ResNet-18 encoder, light decoder, added skips.

    paper_params and paper_cost: the paper's Table 2 (GFLOPs at 640x360, as ENet's Table 3
    which it extends; see the module docstring).

    Args:
        encoder: any timm model name (resnet18 in the paper).
        encoder_weights: null (from scratch), "imagenet" (the paper's pretrained encoder), a
            weights file or a URL.
    """

    paper_params: ClassVar[float | None] = 11.5
    paper_cost = PaperCost(21.2, "GFLOPs", (360, 640))

    def __init__(
        self, encoder: str = "resnet18", encoder_weights: str | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.net = LinkNetNetwork(
            self.num_classes,
            self.in_channels,
            encoder=encoder,
            encoder_weights=encoder_weights,
        )
