"""SegNet and SegNet-Basic (Badrinarayanan, Kendall and Cipolla, PAMI 2017, "SegNet: A Deep
Convolutional Encoder-Decoder Architecture for Image Segmentation").

- ``SegNet``: the encoder is VGG16-BN's 13 convolutions (conv-BN-ReLU) with 5 2x2 max-poolings
  whose argmax indices are kept; the decoder mirrors it: each stage upsamples with the indices of
  the matching pooling (max-unpooling, producing a sparse map) and densifies it with the mirrored
  conv-BN-ReLU layers (the last layer of each stage maps to the next stage's channels, as in the
  released segnet_train.prototxt); a final 3x3 convolution gives the class scores. 29.45M
  parameters for 11 classes: 29.46M is the figure quoted for SegNet on CamVid (e.g. ENet,
  Paszke et al. 2016, Table 3; the SegNet paper gives 14.7M for the encoder, Sec. 3); the decoder
  convolutions here have no bias since BatchNorm follows them (-14k).
- ``SegNetBasic``: the paper's smaller net for its decoder study (Sec. 4.1 and Table 1): 4
  encoders and 4 decoders of 64 channels with 7x7 kernels, BatchNorm after every convolution, no
  biases, no ReLU in the decoder, a 1x1 classifier and, as in the released
  segnet_basic_train.prototxt, local response normalisation of the input. 1.42M parameters for 11
  classes (paper, Table 1: 1.425M).

``decoder_upsampling`` selects the paper's decoder variants (Table 1) for an ablation: "unpool"
(max-unpooling with the encoder's indices, SegNet's), "bilinear" (fixed bilinear interpolation,
the paper's Bilinear-Interpolation variant) or "transpose" (a learned 4x4 transposed convolution
initialised to bilinear, as FCN's decoder upsampling; adds channels^2 x 16 parameters per stage).
Unpooling keeps only the indices of the encoder (no feature maps) for the decoder, which is what
makes SegNet's inference memory small.

Odd sizes: poolings round up (Caffe's ceil mode) and each decoder stage upsamples to the
pre-pooling size of its encoder stage (``MaxUnpool2d(output_size=...)``), so any H, W works.
The encoder can be initialised from ImageNet VGG16-BN (``encoder_weights``, timm's ``vgg16_bn``
layout), as in the paper; the decoder always starts from scratch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from seglight.errors import ConfigError
from seglight.models.base import SegmentationModel
from seglight.nn import ConvNormAct, init_classifier, init_weights, resize_to
from seglight.nn.vgg import (
    VGG16,
    VGG16_CHANNELS,
    VGG16_DEPTHS,
    BilinearUpsample,
    load_vgg16_weights,
)
from seglight.profile import PaperCost

Upsampling = Literal["unpool", "bilinear", "transpose"]


class DecoderUpsample(nn.Module):
    """One decoder upsampling of SegNet's variants: [B, C, h, w] -> [B, C, *size].

    Args:
        channels: feature channels.
        mode: "unpool" (max-unpooling with the encoder's indices), "bilinear" or "transpose".
    """

    def __init__(self, channels: int, mode: Upsampling) -> None:
        super().__init__()
        if mode not in ("unpool", "bilinear", "transpose"):
            raise ConfigError(
                f"decoder_upsampling must be 'unpool', 'bilinear' or 'transpose', got {mode!r}"
            )
        self.mode = mode
        if mode == "unpool":
            self.up = nn.MaxUnpool2d(2, 2)
        elif mode == "transpose":
            self.up = BilinearUpsample(channels, 2)

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor | None, size: Sequence[int]
    ) -> torch.Tensor:
        if self.mode == "unpool":
            return self.up(x, indices, output_size=size)
        if self.mode == "transpose":
            return self.up(x, size)
        return resize_to(x, tuple(size))


def encode_decode(
    x: torch.Tensor,
    encoder: Sequence[nn.Module],
    pools: Sequence[nn.Module],
    upsamples: Sequence[DecoderUpsample],
    decoder: Sequence[nn.Module],
) -> torch.Tensor:
    """SegNet's forward: encoder stage -> pool (keeping indices and size) ..., then each decoder
    stage upsamples to its mirrored encoder stage's size and convolves."""
    indices, sizes = [], []
    for stage, pool in zip(encoder, pools, strict=True):
        x = stage(x)
        sizes.append(x.shape[-2:])
        x = pool(x)
        x, idx = x if isinstance(x, tuple) else (x, None)
        indices.append(idx)
    for upsample, stage, idx, size in zip(
        upsamples, decoder, indices[::-1], sizes[::-1], strict=True
    ):
        x = stage(upsample(x, idx, size))
    return x


class SegNetNetwork(nn.Module):
    """SegNet as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W].

    Args:
        num_classes: output classes.
        in_channels: input channels.
        encoder_weights: null, "imagenet", a file or a URL (timm's vgg16_bn layout).
        decoder_upsampling: "unpool" (the paper's), "bilinear" or "transpose".
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder_weights: str | None = None,
        decoder_upsampling: Upsampling = "unpool",
    ) -> None:
        super().__init__()
        self.encoder = VGG16(
            in_channels, batch_norm=True, return_indices=decoder_upsampling == "unpool"
        )
        init_weights(self.encoder)
        load_vgg16_weights(self.encoder, encoder_weights)
        # decoder stage s mirrors encoder stage s (deepest first); its last layer maps to the
        # channels of stage s - 1 (stage 0 ends with the classifier instead)
        upsamples, stages = [], []
        for s in reversed(range(5)):
            c, depth = VGG16_CHANNELS[s], VGG16_DEPTHS[s]
            outs = [c] * (depth - 1) + ([VGG16_CHANNELS[s - 1]] if s else [])
            stages.append(nn.Sequential(*(ConvNormAct(c, c_out) for c_out in outs)))
            upsamples.append(DecoderUpsample(c, decoder_upsampling))
        self.upsamples = nn.ModuleList(upsamples)
        self.decoder = nn.ModuleList(stages)
        self.classifier = nn.Conv2d(VGG16_CHANNELS[0], num_classes, 3, padding=1)
        init_weights(self.decoder)
        init_classifier(self.classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = encode_decode(x, self.encoder.stages, self.encoder.pools, self.upsamples, self.decoder)
        return self.classifier(x)


class SegNetBasicNetwork(nn.Module):
    """SegNet-Basic as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W].

    Args:
        num_classes: output classes.
        in_channels: input channels.
        channels: channels of every layer (64 in the paper).
        kernel_size: kernel of every convolution (7 in the paper).
        depth: number of encoders (= decoders), 4 in the paper.
        decoder_upsampling: "unpool" (the paper's), "bilinear" or "transpose".
        input_lrn: local response normalisation of the input (the released prototxt's).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        channels: int = 64,
        kernel_size: int = 7,
        depth: int = 4,
        decoder_upsampling: Upsampling = "unpool",
        input_lrn: bool = True,
    ) -> None:
        super().__init__()
        self.input_norm = (
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0) if input_lrn else nn.Identity()
        )
        unpool = decoder_upsampling == "unpool"
        self.encoder = nn.ModuleList(
            ConvNormAct(in_channels if i == 0 else channels, channels, kernel_size)
            for i in range(depth)
        )
        self.pools = nn.ModuleList(
            nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=unpool) for _ in range(depth)
        )
        self.upsamples = nn.ModuleList(
            DecoderUpsample(channels, decoder_upsampling) for _ in range(depth)
        )
        self.decoder = nn.ModuleList(
            ConvNormAct(channels, channels, kernel_size, act=False) for _ in range(depth)
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_weights(self.encoder)
        init_weights(self.decoder)
        init_classifier(self.classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = encode_decode(
            self.input_norm(x), self.encoder, self.pools, self.upsamples, self.decoder
        )
        return self.classifier(x)


class SegNet(SegmentationModel):
    """SegNet (Badrinarayanan et al. 2017): VGG16-BN encoder, max-unpooling decoder.

    paper_params / paper_cost: 29.46M and 286.03 GFLOPs (2 x multiply-adds) at 640x360
    (CamVid's 11 classes; as quoted by ENet's Table 3, Paszke et al. 2016: the SegNet paper gives
    neither). seglight's count at 640x360 is 284.6 GFLOPs.

    Args:
        encoder_weights: null (from scratch), "imagenet", a weights file or a URL for the VGG16-BN
            encoder (timm's vgg16_bn layout). The paper initialises it from ImageNet VGG16.
        decoder_upsampling: "unpool" (max-unpooling with the encoder's indices, the paper's),
            "bilinear" (fixed interpolation) or "transpose" (learned, bilinear-initialised).
    """

    paper_params = 29.46
    paper_cost = PaperCost(286.03, "GFLOPs", (360, 640))

    def __init__(
        self,
        encoder_weights: str | None = None,
        decoder_upsampling: Upsampling = "unpool",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = SegNetNetwork(
            self.num_classes,
            self.in_channels,
            encoder_weights=encoder_weights,
            decoder_upsampling=decoder_upsampling,
        )


class SegNetBasic(SegmentationModel):
    """SegNet-Basic (Badrinarayanan et al. 2017): 4 + 4 layers of 64 channels, 7x7 kernels.

    paper_params: 1.425M (PAMI'17 Table 1); no FLOPs given.

    Args:
        channels: channels of every layer (64 in the paper).
        kernel_size: kernel size of every convolution (7 in the paper).
        depth: number of encoders and decoders (4 in the paper).
        decoder_upsampling: "unpool" (the paper's), "bilinear" or "transpose".
        input_lrn: local response normalisation of the input (as the released prototxt).
    """

    paper_params = 1.425

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 7,
        depth: int = 4,
        decoder_upsampling: Upsampling = "unpool",
        input_lrn: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = SegNetBasicNetwork(
            self.num_classes,
            self.in_channels,
            channels=channels,
            kernel_size=kernel_size,
            depth=depth,
            decoder_upsampling=decoder_upsampling,
            input_lrn=input_lrn,
        )
