"""DeepLab v1 LargeFOV and DeepLab v2 ASPP on VGG16 (Chen, Papandreou, Kokkinos, Murphy and
Yuille: "Semantic Image Segmentation with Deep Convolutional Nets and Fully Connected CRFs", ICLR
2015; "DeepLab: Semantic Image Segmentation with Deep Convolutional Nets, Atrous Convolution, and
Fully Connected CRFs", PAMI 2017). The networks before the CRF, which is post-processing.

The VGG16 of both papers (their released prototxts): 3x3 max-poolings with padding 1, stride 2
for pool1-3 and stride 1 for pool4 and pool5, conv5 dilated by 2, so the output stride is 8.
Then, one head per atrous rate, summed (LargeFOV: rate 12; ASPP-L: rates 6, 12, 18, 24): fc6 a
3x3 convolution with that dilation and 1024 channels, fc7 1x1 with 1024 channels (ReLU and dropout
0.5 after each), and a 1x1 score layer. LargeFOV also average-pools pool5 (3x3, stride 1, the
prototxt's pool5a) before fc6. The logits are bilinearly upsampled (x8) to the input size.
With ImageNet weights (``encoder_weights``, timm's ``vgg16`` layout), fc6 and fc7 are initialised
as in the papers by decimating VGG's 7x7x4096 fc6 and 4096 fc7 (every 4th filter, taps 0/3/6;
every ASPP branch gets the same initialisation). Parameters for 11 classes: LargeFOV 20.48M
(ICLR'15 Table 2 / PAMI'17 Table 1: 20.5M, 21 classes); ASPP 37.83M (no figure in the paper).

``encoder: <timm model>`` (e.g. resnet101, DeepLab v2's main backbone): the encoder is dilated to
``output_stride`` (8 by default), and each branch is by default a single 3x3 atrous convolution to
the classes, as in the v2 ResNet-101 model (``head_channels: 0``); ``head_channels: 1024``
restores the fc6/fc7 branches. ``output_stride`` 16 or 32 also applies to VGG16 (pool4 / pool5
then stride 2 and conv5 undilated).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from seglight.errors import ConfigError
from seglight.models.base import SegmentationModel
from seglight.nn import TimmEncoder, init_classifier, init_weights, resize_to
from seglight.nn.vgg import VGG16, VGG16_NAMES, VGGFC, load_vgg16_weights


def vgg16_deeplab(in_channels: int, batch_norm: bool, output_stride: int) -> VGG16:
    """VGG16 with 3x3 poolings; poolings beyond `output_stride` have stride 1 and the following
    convolutions are dilated to keep their field of view (8: pool4/5 stride 1, conv5 rate 2)."""
    strides = [2 if 2 ** (i + 1) <= output_stride else 1 for i in range(5)]
    dilations = [max(1, 2**i // output_stride) for i in range(5)]
    return VGG16(in_channels, batch_norm, 3, strides, dilations)


class DeepLabVGGNetwork(nn.Module):
    """DeepLab v1/v2 as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W].

    Args:
        num_classes: output classes.
        in_channels: input channels.
        rates: atrous rate of each head's fc6; the heads' scores are summed ((12,): LargeFOV;
            (6, 12, 18, 24): ASPP-L).
        encoder: "vgg16" (the papers'), "vgg16_bn", or any timm model name.
        encoder_weights: null, "imagenet", a file or a URL.
        output_stride: 8 (the papers'), 16 or 32.
        head_channels: channels of each head's fc6/fc7; 0 for a single 3x3 atrous convolution to
            the classes per head. Default: 1024 for VGG16, 0 for a timm encoder.
        pool5_avg: 3x3 average pooling before the heads (LargeFOV's pool5a; VGG16 only).
        dropout: dropout after fc6 and fc7.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        rates: Sequence[int] = (12,),
        encoder: str = "vgg16",
        encoder_weights: str | None = None,
        output_stride: int = 8,
        head_channels: int | None = None,
        pool5_avg: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ConfigError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if not rates or min(rates) < 1:
            raise ConfigError(f"rates must be a non-empty list of positive rates, got {rates}")
        vgg = encoder in VGG16_NAMES
        if vgg:
            self.encoder = vgg16_deeplab(in_channels, encoder == "vgg16_bn", output_stride)
            channels = self.encoder.channels[-1]
            init_weights(self.encoder)
        else:
            self.encoder = TimmEncoder(encoder, encoder_weights, in_channels, output_stride)
            channels = self.encoder.channels[-1]
        self.pool5_avg = nn.AvgPool2d(3, 1, padding=1) if pool5_avg and vgg else nn.Identity()
        head_channels = (1024 if vgg else 0) if head_channels is None else head_channels
        heads = []
        for rate in rates:
            if head_channels:
                fc = VGGFC(channels, head_channels, kernel_size=3, dilation=rate, dropout=dropout)
                heads.append(nn.Sequential(fc, nn.Conv2d(head_channels, num_classes, 1)))
            else:
                heads.append(nn.Conv2d(channels, num_classes, 3, padding=rate, dilation=rate))
        self.heads = nn.ModuleList(heads)
        init_weights(self.heads)
        for head in self.heads:  # score layers: N(0, 0.01) as in the prototxts
            score = head[-1] if isinstance(head, nn.Sequential) else head
            init_classifier(score, std=0.01)
        if vgg:
            fcs = [head[0] for head in self.heads] if head_channels else []
            load_vgg16_weights(self.encoder, encoder_weights, fcs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feature = self.pool5_avg(self.encoder(x)[-1])
        logits = sum(head(feature) for head in self.heads)
        return resize_to(logits, size)


class DeepLabLargeFOV(SegmentationModel):
    """DeepLab v1 LargeFOV (Chen et al. 2015): VGG16 at output stride 8, fc6 3x3 rate 12 x 1024.

    paper_params: 20.5M (ICLR'15 Table 2, 21 classes); no FLOPs given.

    Args:
        encoder: "vgg16" (the paper's), "vgg16_bn", or any timm model name (e.g. resnet101).
        encoder_weights: null (from scratch), "imagenet", a weights file or a URL. The papers
            fine-tune from ImageNet VGG16 (fc6/fc7 decimated).
        rates: atrous rates of the heads, summed (default: (12,) for LargeFOV, (6, 12, 18, 24)
            for ASPP).
        output_stride: 8 (the paper's), 16 or 32.
        head_channels: channels of each head's fc6/fc7, or 0 for one 3x3 atrous convolution to the
            classes per head (default: 1024 for VGG16, 0 for a timm encoder).
        dropout: dropout after fc6 and fc7.
    """

    default_rates: ClassVar[tuple[int, ...]] = (12,)
    pool5_avg: ClassVar[bool] = True
    paper_params = 20.5

    def __init__(
        self,
        encoder: str = "vgg16",
        encoder_weights: str | None = None,
        rates: list[int] | None = None,
        output_stride: int = 8,
        head_channels: int | None = None,
        dropout: float = 0.5,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = DeepLabVGGNetwork(
            self.num_classes,
            self.in_channels,
            rates=tuple(rates or self.default_rates),
            encoder=encoder,
            encoder_weights=encoder_weights,
            output_stride=output_stride,
            head_channels=head_channels,
            pool5_avg=self.pool5_avg,
            dropout=dropout,
        )


class DeepLabASPP(DeepLabLargeFOV):
    """DeepLab v2 ASPP-L on VGG16 (Chen et al. 2017): four fc6/fc7/score branches at rates 6,
    12, 18 and 24, summed (same options as DeepLabLargeFOV).

    paper_params: none given for ASPP (37.83M here for 11 classes); no FLOPs given.
    """

    default_rates: ClassVar[tuple[int, ...]] = (6, 12, 18, 24)
    pool5_avg: ClassVar[bool] = False
    paper_params = None
