"""DeepLabv3 and DeepLabv3+, on any timm encoder, with a swappable context module.

- DeepLabv3 (Chen, Papandreou, Schroff and Adam 2017, "Rethinking Atrous Convolution for
  Semantic Image Segmentation", Sec. 3.3): a dilated encoder at output stride 16, ASPP (a 1x1 conv
  and three 3x3 convs at rates 6/12/18, doubled to 12/24/36 at output stride 8, plus image-level
  pooling; 256 channels, BatchNorm), concatenation -> 1x1 conv (256) -> 1x1 classifier, logits
  upsampled bilinearly to the input.
- DeepLabv3+ (Chen, Zhu, Papandreou, Schroff and Adam, ECCV 2018, "Encoder-Decoder with Atrous
  Separable Convolution for Semantic Image Segmentation", Sec. 3.1 and 4.1, Tables 1-2): the
  DeepLabv3 encoder, then a decoder: the stride-4 low-level features ("Conv2" of ResNet) reduced to
  48 channels by a 1x1 conv, concatenated with the 4x upsampled context features, two 3x3 convs
  of 256, classifier, 4x upsampling. ``separable: true`` makes the 3x3 convs of ASPP and decoder
  depthwise-separable (the paper's Xception variant, Sec. 3.2).

``context`` swaps the context module on the same encoder (all map the encoder's features to 256
channels, so encoder, decoder and classifier are unchanged): ``aspp`` (default), ``ksac``
(kernel-sharing ASPP, Huang et al. 2019), ``ppm`` (PSPNet's pyramid pooling, bins 1/2/3/6) or
``none`` (a 1x1 conv-BN-ReLU). See seglight.nn.context.

``rates`` are given at output stride 16 and scaled to the encoder's output stride
(x2 at OS 8, /2 at OS 32), as the paper does.

Differences from the papers: the default encoder is ResNet-50 (the papers: ResNet-101, and
modified aligned Xception-65 for DeepLabv3+; both are timm encoders: ``encoder: resnet101`` or
``xception65``); no Multi-Grid (1, 2, 4) in the last ResNet block (DeepLabv3 Sec. 4.3), since the
timm encoder is generic; dropout 0.1 after the context module, as in the official TensorFlow
implementation (the papers do not mention it).

Size for 11 classes (OS 16): DeepLabV3 39.05M parameters, DeepLabV3Plus 40.35M with ResNet-50;
58.04M and 59.34M with ResNet-101; DeepLabV3Plus 54.71M with xception65, 41.05M with
xception65 and ``separable: true``. The papers give no parameter counts, only multiply-adds for a
513x513 image at OS 16 (DeepLabv3+ Table 3, ResNet-101: DeepLabv3 81.02B, DeepLabv3+ 101.28B;
Table 5, Xception + decoder + separable convs: 54.17B). Measured here (torch FlopCounterMode, 21
classes): 71.06B, 92.82B and 54.04B. The Xception model matches to 0.2%; the ResNet-101 gap is in
the backbone (TF-slim's ResNet-101 vs timm's; timm's deep-stem ``resnet101s`` gives 78.2B), not in
the heads: the decoder adds 21.8B here and 20.3B in the paper.

Image pooling with batch size 1 in training: its BatchNorm normalises with running statistics
(seglight.nn.context.PoolingBranch); training loaders drop the last incomplete batch anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from seglight.errors import ConfigError
from seglight.models.base import SegmentationModel
from seglight.nn import ConvNormAct, TimmEncoder, init_classifier, init_weights, resize_to
from seglight.nn.context import ContextKind, build_context, conv3x3
from seglight.profile import PaperCost


def scale_rates(rates: Sequence[int], output_stride: int) -> tuple[int, ...]:
    """Atrous rates given at output stride 16, as applied at `output_stride` (x16/OS)."""
    if not rates or any(int(r) != r or r < 1 for r in rates):
        raise ConfigError(f"rates must be a non-empty list of integers >= 1, got {list(rates)}")
    return tuple(max(1, round(r * 16 / output_stride)) for r in rates)


class DeepLabV3PlusDecoder(nn.Module):
    """DeepLabv3+'s decoder: 1x1 conv-BN-ReLU of the low-level features to `low_level_channels`
    (48), concatenation with the upsampled context features, two 3x3 conv-BN-ReLU of `channels`.

    Shapes: x [B, channels, h, w], low [B, low_in, H/4, W/4] -> [B, channels, H/4, W/4].
    """

    def __init__(
        self,
        low_in: int,
        channels: int = 256,
        low_level_channels: int = 48,
        separable: bool = False,
    ) -> None:
        super().__init__()
        self.reduce = ConvNormAct(low_in, low_level_channels, 1)
        self.fuse = nn.Sequential(
            conv3x3(channels + low_level_channels, channels, separable=separable),
            conv3x3(channels, channels, separable=separable),
        )

    def forward(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        x = resize_to(x, tuple(low.shape[-2:]))
        return self.fuse(torch.cat([x, self.reduce(low)], dim=1))


class DeepLabV3Network(nn.Module):
    """DeepLabv3 as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W].

    Args:
        num_classes: output classes.
        in_channels: input channels.
        encoder: a timm model name (resnet50; the paper: resnet101).
        encoder_weights: null, "imagenet", a file or a URL (seglight.nn.encoders).
        output_stride: 8, 16 (the paper's training setting) or 32, through encoder dilation.
        context: "aspp", "ksac", "ppm" or "none" (see the module docstring).
        rates: atrous rates at output stride 16, scaled to `output_stride`.
        separable: depthwise-separable 3x3 convs in the context module (and decoder).
        channels: channels of the context module and decoder (256).
        dropout: dropout after the context module.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str = "resnet50",
        encoder_weights: str | None = None,
        output_stride: int = 16,
        context: ContextKind = "aspp",
        rates: Sequence[int] = (6, 12, 18),
        separable: bool = False,
        channels: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.encoder = TimmEncoder(encoder, encoder_weights, in_channels, output_stride)
        self.rates = scale_rates(rates, output_stride)
        self.context = build_context(
            context, self.encoder.channels[-1], channels, self.rates, separable
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_weights(self.context)
        init_classifier(self.classifier)

    def decode(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """DeepLabv3 has no decoder: the logits are upsampled bilinearly (x16 at OS 16)."""
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        features = self.encoder(x)
        y = self.decode(self.dropout(self.context(features[-1])), features)
        return resize_to(self.classifier(y), size)


class DeepLabV3PlusNetwork(DeepLabV3Network):
    """DeepLabv3+ as a plain nn.Module: DeepLabV3Network plus the decoder on the encoder's
    stride-4 features. Same arguments as DeepLabV3Network, plus:

    Args:
        low_level_channels: channels the low-level features are reduced to (48 in the paper).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str = "resnet50",
        encoder_weights: str | None = None,
        output_stride: int = 16,
        context: ContextKind = "aspp",
        rates: Sequence[int] = (6, 12, 18),
        separable: bool = False,
        channels: int = 256,
        dropout: float = 0.1,
        low_level_channels: int = 48,
    ) -> None:
        super().__init__(
            num_classes,
            in_channels,
            encoder,
            encoder_weights,
            output_stride,
            context,
            rates,
            separable,
            channels,
            dropout,
        )
        stride4 = [i for i, r in enumerate(self.encoder.reductions) if r == 4]
        if not stride4:
            raise ConfigError(
                f"DeepLabv3+ needs stride-4 low-level features, but encoder {encoder!r} has "
                f"feature strides {self.encoder.reductions}; use DeepLabV3 or another encoder"
            )
        self.low_level_index = stride4[-1]
        self.decoder = DeepLabV3PlusDecoder(
            self.encoder.channels[self.low_level_index], channels, low_level_channels, separable
        )
        init_weights(self.decoder)

    def decode(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder(x, features[self.low_level_index])


class DeepLabV3(SegmentationModel):
    """DeepLabv3 (Chen et al. 2017): dilated encoder + ASPP (or another context module).

    paper_cost: 81.02 G multiply-adds of the ResNet-101 model (21 classes) at output stride 16
    on a 513x513 image, from DeepLabv3+ Table 3 (first row); see the module docstring.

    Args:
        encoder: any timm model name (default resnet50; the paper: resnet101).
        encoder_weights: null (from scratch), "imagenet", a weights file or a URL.
        output_stride: encoder output stride: 8, 16 (default, as in the paper) or 32.
        context: context module: "aspp" (default), "ksac", "ppm" or "none".
        rates: ASPP/KSAC atrous rates at output stride 16 (doubled at 8, halved at 32).
        separable: depthwise-separable 3x3 convolutions in the context module (and decoder).
    """

    #: the plain network this module builds (DeepLabV3Plus swaps in its own)
    network: ClassVar[type[DeepLabV3Network]] = DeepLabV3Network
    paper_cost = PaperCost(81.02, "GMACs", (513, 513), 21, {"encoder": "resnet101"})

    def __init__(
        self,
        encoder: str = "resnet50",
        encoder_weights: str | None = None,
        output_stride: int = 16,
        context: ContextKind = "aspp",
        rates: tuple[int, ...] = (6, 12, 18),
        separable: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = self.network(
            self.num_classes,
            self.in_channels,
            encoder=encoder,
            encoder_weights=encoder_weights,
            output_stride=output_stride,
            context=context,
            rates=tuple(rates),
            separable=separable,
        )


class DeepLabV3Plus(DeepLabV3):
    """DeepLabv3+ (Chen et al. 2018): DeepLabv3 + a decoder on the stride-4 features.

    paper_cost: 101.28 G multiply-adds of the paper's ResNet-101 model (21 classes) at output
    stride 16 on a 513x513 image (Table 3); see the module docstring.

    Args:
        encoder: any timm model name (default resnet50; the paper: resnet101 or xception65).
        encoder_weights: null (from scratch), "imagenet", a weights file or a URL.
        output_stride: encoder output stride: 8, 16 (default, as in the paper) or 32.
        context: context module: "aspp" (default), "ksac", "ppm" or "none".
        rates: ASPP/KSAC atrous rates at output stride 16 (doubled at 8, halved at 32).
        separable: depthwise-separable 3x3 convolutions in ASPP and decoder (Xception variant).
    """

    network = DeepLabV3PlusNetwork
    paper_cost = PaperCost(101.28, "GMACs", (513, 513), 21, {"encoder": "resnet101"})
