"""PSPNet (Zhao, Shi, Qi, Wang and Jia, CVPR 2017, "Pyramid Scene Parsing Network").

The network of the paper's Fig. 3 and Sec. 3.3-3.4, as in the authors' code (hszhao/semseg):

- a dilated ResNet at output stride 8 (the last two stages use dilation 2 and 4 instead of stride);
- the pyramid pooling module on the last features (2048 channels for ResNet-50): average pooling
  to 1x1, 2x2, 3x3 and 6x6 bins, each pooled map -> 1x1 conv to 2048/4 = 512 channels, BN, ReLU,
  bilinear upsampling; concatenation with the features (4096 channels);
- a 3x3 conv-BN-ReLU to 512, dropout 0.1, a 1x1 classifier, bilinear upsampling x8 to the input;
- the deep-supervision auxiliary head on the stage-3 (res4) features: 3x3 conv-BN-ReLU to 256,
  dropout 0.1, 1x1 classifier. In training the network returns {"out": logits, "aux": aux logits
  at the stage-3 resolution}; SegmentationModel resizes the aux logits to the mask and adds
  ``aux_weight`` (0.4, the paper's Sec. 3.4 / Table 3 best) times their loss. In eval the network
  returns the main logits only, and the aux head costs nothing.

Differences from the paper: the default encoder is timm's ``resnet50`` with the usual 7x7 stem;
the paper's ResNet-50/101 have a "deep stem" of three 3x3 convs (64, 64, 128), which timm calls
``resnet50s`` / ``resnet101s`` (``encoder: resnet101s`` is the paper's best setting). The paper
gives no parameter or FLOP counts. Parameters for 11 classes: 48.95M with resnet50 (2.36M of it
in the aux head, unused at inference), 49.07M with resnet50s, 68.07M with resnet101s.

Pyramid level 1 with batch size 1 in training: its BatchNorm normalises with running statistics
(seglight.nn.context.PoolingBranch); training loaders drop the last incomplete batch anyway.
"""

from __future__ import annotations

import torch
from torch import nn

from seglight.models.base import SegmentationModel
from seglight.nn import ConvNormAct, TimmEncoder, init_classifier, init_weights, resize_to
from seglight.nn.context import PyramidPooling


class PSPNetNetwork(nn.Module):
    """PSPNet as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W]
    (eval), or {"out": logits, "aux": [B, num_classes, ~H/8, ~W/8]} in training with `aux`.

    Args:
        num_classes: output classes.
        in_channels: input channels.
        encoder: a timm model name (resnet50; the paper: resnet50s/resnet101s, deep stem).
        encoder_weights: null, "imagenet", a file or a URL (seglight.nn.encoders).
        output_stride: 8 (the paper), 16 or 32, through encoder dilation.
        bins: pyramid pooling bin sizes (1, 2, 3, 6).
        channels: channels of the 3x3 conv after pyramid pooling (512).
        aux: build the auxiliary head on the second-to-last (stage-3) features.
        dropout: dropout before the classifiers (0.1).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str = "resnet50",
        encoder_weights: str | None = None,
        output_stride: int = 8,
        bins: tuple[int, ...] = (1, 2, 3, 6),
        channels: int = 512,
        aux: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.encoder = TimmEncoder(encoder, encoder_weights, in_channels, output_stride)
        self.ppm = PyramidPooling(self.encoder.channels[-1], channels, bins)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))
        self.aux_head = (
            nn.Sequential(
                ConvNormAct(self.encoder.channels[-2], 256, 3),
                nn.Dropout2d(dropout),
                nn.Conv2d(256, num_classes, 1),
            )
            if aux
            else None
        )
        for module in (self.ppm, self.classifier, self.aux_head):
            if module is not None:
                init_weights(module)
        for head in (self.classifier, self.aux_head):
            if head is not None:
                init_classifier(head[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        size = tuple(x.shape[-2:])
        features = self.encoder(x)
        out = resize_to(self.classifier(self.ppm(features[-1])), size)
        if self.training and self.aux_head is not None:
            return {"out": out, "aux": self.aux_head(features[-2])}
        return out


class PSPNet(SegmentationModel):
    """PSPNet (Zhao et al. 2017): dilated ResNet + pyramid pooling (1/2/3/6) + aux head.

    Args:
        encoder: any timm model name (default resnet50; the paper's deep-stem ResNet: resnet50s
            or resnet101s).
        encoder_weights: null (from scratch), "imagenet", a weights file or a URL.
        output_stride: encoder output stride: 8 (default, as in the paper), 16 or 32.
        bins: pyramid pooling bin sizes.
        aux: auxiliary head on the stage-3 features, trained with weight `aux_weight` (0.4).
    """

    def __init__(
        self,
        encoder: str = "resnet50",
        encoder_weights: str | None = None,
        output_stride: int = 8,
        bins: tuple[int, ...] = (1, 2, 3, 6),
        aux: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = PSPNetNetwork(
            self.num_classes,
            self.in_channels,
            encoder=encoder,
            encoder_weights=encoder_weights,
            output_stride=output_stride,
            bins=tuple(bins),
            aux=aux,
        )
