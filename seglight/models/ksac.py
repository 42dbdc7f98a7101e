"""KSAC (Huang, Wang, Jia and He 2019, "See More Than Once: Kernel-Sharing Atrous Convolution for
Semantic Segmentation", arXiv:1908.09443).

The paper's network is DeepLabv3+ with its ASPP replaced by kernel-sharing atrous convolution:
the 1x1 branch and the image-pooling branch are kept, and the three 3x3 atrous branches
(rates 6/12/18 at output stride 16, doubled at 8) use ONE shared 3x3 kernel, each rate with its
own BatchNorm; the branches are concatenated and projected as in ASPP. This module is exactly
``DeepLabV3PlusNetwork(context="ksac")`` (seglight.models.deeplabv3, seglight.nn.context).

Parameters: the shared kernel does not grow with the number of rates (the paper's point; a rate
only adds its BatchNorm and its 256x256 slice of the 1x1 projection), so larger or more rates are
nearly free (the paper's (6, 12, 18, 24) setting: ``rates: [6, 12, 18, 24]``). The paper reports
savings rather than totals, and this implementation reproduces them: against DeepLabv3+ on the
same encoder, 2 x 2048 x 256 x 9 = 9.44M parameters fewer on 2048-channel features (paper: "about
10M parameters saved" with Xception-65; here 54.71M -> 45.27M with xception65), and 32.6% fewer
for the MobileNetV2 DeepLab model (paper: 33%; mobilenetv2_100 without decoder, 21 classes,
4.52M -> 3.05M). For 11 classes: 30.91M with the default resnet50 (DeepLabV3Plus: 40.35M).
Compute is unchanged: each rate still runs a full 3x3 convolution.

Differences from the paper: the default encoder is ResNet-50 (the paper: Xception-65 and
MobileNetV2; ``encoder: xception65`` is timm's DeepLab-style aligned Xception-65); the paper
gives no total parameter count for its configuration.
"""

from __future__ import annotations

from seglight.models.base import SegmentationModel
from seglight.models.deeplabv3 import DeepLabV3PlusNetwork


class KSAC(SegmentationModel):
    """KSAC (Huang et al. 2019): DeepLabv3+ with a kernel-sharing ASPP.

    Args:
        encoder: any timm model name (default resnet50; the paper: xception65 or mobilenetv2).
        encoder_weights: null (from scratch), "imagenet", a weights file or a URL.
        output_stride: encoder output stride: 8, 16 (default, as in the paper) or 32.
        rates: atrous rates of the shared kernel at output stride 16 (doubled at 8, halved at 32).
        separable: depthwise-separable 3x3 convolutions in the decoder (the shared kernel stays a
            full 3x3 convolution, as in the paper).
    """

    def __init__(
        self,
        encoder: str = "resnet50",
        encoder_weights: str | None = None,
        output_stride: int = 16,
        rates: tuple[int, ...] = (6, 12, 18),
        separable: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = DeepLabV3PlusNetwork(
            self.num_classes,
            self.in_channels,
            encoder=encoder,
            encoder_weights=encoder_weights,
            output_stride=output_stride,
            context="ksac",
            rates=tuple(rates),
            separable=separable,
        )
