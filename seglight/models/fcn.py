"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer and Darrell, CVPR 2015, "Fully Convolutional
Networks for Semantic Segmentation"; Shelhamer, Long and Darrell, PAMI 2016).

One network, three registered names: the number of skips is the only difference.

- ``encoder: vgg16`` (default; the papers' FCN-VGG16): VGG16's 13 convolutions and 5 max-poolings,
  fc6/fc7 as convolutions (7x7x4096, 1x1x4096, ReLU and dropout 0.5 each), a 1x1 score layer on
  fc7 (stride 32). FCN-16s adds a 1x1 score layer on pool4 and fuses it by addition after a 2x
  upsampling of the stride-32 scores; FCN-8s adds pool3 likewise. The intermediate 2x upsamplings
  are transposed convolutions initialised to bilinear interpolation and learned; the final
  upsampling (x32, x16, x8) is fixed bilinear interpolation (CVPR'15, Sec. 4.3; a
  `seglight.nn.BilinearUpsample`). The skip score layers start at zero (Sec. 4.2), so a fresh
  FCN-16s/8s predicts like the coarser net. Parameters for 11 classes:
  134.3M for all three (CVPR'15 Table 1: FCN-VGG16 134M); ``vgg16_bn`` adds BatchNorm (+8.4k).
- ``encoder: <timm model>`` (e.g. resnet50): the score layers read the encoder's stride-32,
  stride-16 and stride-8 features directly (no fc6/fc7: those are VGG's classifier); the rest is
  the same.

Padding and cropping: the reference Caffe nets pad the input by 100 pixels (so that the 7x7 fc6
fits any image) and crop each upsampled map at a computed offset. Here every convolution has
"same" padding (fc6: 3), poolings round up (so pool5 is at least 1x1), and each bilinear
transposed convolution uses padding f/2 so that its output is aligned with its target
(pixel centres match, as in ``F.interpolate(align_corners=False)``); the upsampled map is then
cropped at the bottom/right to the skip's (finally the input's) size. The result is the same
alignment without computing 200 extra rows and columns at every layer. Not reproduced: the
PAMI at-once recipe's fixed scaling of pool4/pool3 (by 0.01 / 0.0001) before their score layers,
which only compensates for SGD's learning-rate scale on those layers, and the zero-initialised
fc7 score layer (a zero score layer passes no gradient to the encoder on the first step; it is
drawn from N(0, 0.01) here).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from seglight.errors import ConfigError
from seglight.models.base import SegmentationModel
from seglight.nn import TimmEncoder, init_classifier, init_weights
from seglight.nn.vgg import VGG16, VGG16_NAMES, VGGFC, BilinearUpsample, load_vgg16_weights

SKIPS = {32: 0, 16: 1, 8: 2}


class FCNNetwork(nn.Module):
    """FCN as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W].

    Args:
        num_classes: output classes.
        in_channels: input channels.
        stride: 32, 16 or 8: FCN-32s (no skip), FCN-16s (pool4) or FCN-8s (pool4 and pool3).
        encoder: "vgg16" (the paper's), "vgg16_bn", or any timm model name.
        encoder_weights: null, "imagenet", a file or a URL (timm's vgg16 layout for "vgg16":
            fc6/fc7 are loaded from its pre_logits.fc1/fc2).
        dropout: dropout after fc6 and fc7 (VGG encoders).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        stride: Literal[8, 16, 32] = 8,
        encoder: str = "vgg16",
        encoder_weights: str | None = None,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if stride not in SKIPS:
            raise ConfigError(f"FCN stride must be 8, 16 or 32, got {stride}")
        if encoder in VGG16_NAMES:
            self.encoder = VGG16(in_channels, batch_norm=encoder == "vgg16_bn")
            self.fc = VGGFC(512, 4096, kernel_size=7, dropout=dropout)
            init_weights(self.encoder)
            init_weights(self.fc)
            load_vgg16_weights(self.encoder, encoder_weights, [self.fc])
            channels = [256, 512, 4096]  # pool3, pool4, fc7
        else:
            self.encoder = TimmEncoder(encoder, encoder_weights, in_channels)
            self.fc = None
            missing = [r for r in (8, 16, 32) if r not in self.encoder.reductions]
            if missing:
                raise ConfigError(
                    f"FCN needs features at strides 8, 16 and 32; timm encoder {encoder!r} has "
                    f"strides {self.encoder.reductions}"
                )
            # the last feature map of each stride (some encoders have several per stride)
            self.levels = [
                len(self.encoder.reductions) - 1 - self.encoder.reductions[::-1].index(r)
                for r in (8, 16, 32)
            ]
            channels = [self.encoder.channels[i] for i in self.levels]
        self.score = nn.Conv2d(channels[-1], num_classes, 1)  # score_fr
        init_classifier(self.score, std=0.01)  # N(0, 0.01), as the released FCN prototxts
        skips = SKIPS[stride]
        # score_pool4, score_pool3 (deep to shallow), zero-initialised as in the paper
        self.skip_scores = nn.ModuleList(
            nn.Conv2d(c, num_classes, 1) for c in channels[-2::-1][:skips]
        )
        for conv in self.skip_scores:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        # upscore2, upscore_pool4: learned, initialised to bilinear
        self.skip_upsamples = nn.ModuleList(BilinearUpsample(num_classes, 2) for _ in range(skips))
        self.upsample = BilinearUpsample(num_classes, stride, trainable=False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features at strides 8, 16 and 32 (VGG: pool3, pool4 and fc7)."""
        if self.fc is not None:
            pools = self.encoder(x)
            return [pools[2], pools[3], self.fc(pools[4])]
        features = self.encoder(x)
        return [features[i] for i in self.levels]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        features = self.features(x)
        score = self.score(features[-1])
        for feature, conv, upsample in zip(
            features[-2::-1], self.skip_scores, self.skip_upsamples, strict=False
        ):
            skip = conv(feature)
            score = upsample(score, skip.shape[-2:]) + skip
        return self.upsample(score, size)


class FCN32s(SegmentationModel):
    """FCN-32s (Long et al. 2015): VGG16 with convolutionalised fc6/fc7, scores at stride 32.

    paper_params: 134M (CVPR'15 Table 1, FCN-VGG16, 21 classes); no FLOPs given.

    Args:
        encoder: "vgg16" (the paper's), "vgg16_bn", or any timm model name (e.g. resnet50).
        encoder_weights: null (from scratch), "imagenet", a weights file or a URL. The paper
            fine-tunes from ImageNet VGG16.
        dropout: dropout after fc6 and fc7 (0.5 in the paper; VGG encoders only).
    """

    stride: ClassVar[int] = 32
    paper_params = 134.0

    def __init__(
        self,
        encoder: str = "vgg16",
        encoder_weights: str | None = None,
        dropout: float = 0.5,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = FCNNetwork(
            self.num_classes,
            self.in_channels,
            stride=self.stride,
            encoder=encoder,
            encoder_weights=encoder_weights,
            dropout=dropout,
        )


class FCN16s(FCN32s):
    """FCN-16s (Long et al. 2015): FCN-32s plus the pool4 skip (same options)."""

    stride: ClassVar[int] = 16


class FCN8s(FCN32s):
    """FCN-8s (Long et al. 2015): FCN-16s plus the pool3 skip (same options)."""

    stride: ClassVar[int] = 8
