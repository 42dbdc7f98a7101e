"""U-Net (Ronneberger, Fischer and Brox, MICCAI 2015, "U-Net: Convolutional Networks for Biomedical
Image Segmentation"), in two forms:

- ``encoder: original``: the paper's network (its Fig. 1): a contracting path of double 3x3 conv
  blocks and 4 max-poolings (64 -> 1024 channels at 64 base channels), an expansive path of 2x2
  up-convolutions that halve the channels, concatenation with the skip, and double 3x3 convs; a 1x1
  conv to the classes. 31.04M parameters at 64 base channels for 11 classes (paper: ~31M).
  Deviations, needed for seglight's contract and for training from scratch: "same" padding instead
  of the paper's unpadded convolutions (so the logits have the input's size, no overlap-tile), and
  BatchNorm after each conv (``norm: false`` removes it, as in the paper). Initialised as the
  paper's Sec. 3 says: every weight N(0, 2/N), N the incoming nodes of a neuron (He's fan-in),
  the 1x1 classifier included; biases 0.
- ``encoder: <any timm model>`` (e.g. resnet34): the encoder's feature pyramid (timm
  features_only) with the same decoder, nearest-neighbour upsampling and decoder channels
  (256, 128, 64, 32, 16), as in segmentation_models.pytorch's Unet (24.4M parameters with resnet34).

Any input size works, odd ones included: each upsampling goes to the skip's exact size.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from seglight.errors import ConfigError
from seglight.models.base import SegmentationModel
from seglight.nn import (
    DoubleConv,
    TimmEncoder,
    init_classifier,
    init_weights,
    pad_or_crop_to,
    resize_to,
)

Upsampling = Literal["transpose", "nearest", "bilinear"]


class UNetEncoder(nn.Module):
    """The paper's contracting path: DoubleConv, then `depth` times (max-pool 2x2, DoubleConv).

    Returns `depth + 1` feature maps, with base_channels * 2**i channels at stride 2**i.
    """

    def __init__(
        self, in_channels: int = 3, base_channels: int = 64, depth: int = 4, norm: bool = True
    ):
        super().__init__()
        self.channels = [base_channels * 2**i for i in range(depth + 1)]
        self.reductions = [2**i for i in range(depth + 1)]
        stages = [DoubleConv(in_channels, self.channels[0], norm)]
        for c_in, c_out in zip(self.channels[:-1], self.channels[1:], strict=True):
            # ceil_mode: an odd size rounds up, so no input is too small for 4 poolings
            stages.append(
                nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), DoubleConv(c_in, c_out, norm))
            )
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class UNetDecoderBlock(nn.Module):
    """Upsample to the skip's size, concatenate the skip (if any), DoubleConv."""

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        upsampling: Upsampling,
        norm: bool,
    ):
        super().__init__()
        self.upsampling = upsampling
        if upsampling == "transpose":
            self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
            in_channels = out_channels
        self.conv = DoubleConv(in_channels + skip_channels, out_channels, norm)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]
    ) -> torch.Tensor:
        if self.upsampling == "transpose":
            x = pad_or_crop_to(self.up(x), size)
        else:
            x = resize_to(x, size, self.upsampling)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class UNetDecoder(nn.Module):
    """The expansive path over any encoder's features (shallow to deep).

    Block i upsamples and fuses the (i+2)-th deepest feature; blocks beyond the encoder's
    shallowest feature have no skip and upsample x2 (the last one to the input size).
    """

    def __init__(
        self,
        encoder_channels: list[int],
        decoder_channels: list[int],
        upsampling: Upsampling = "nearest",
        norm: bool = True,
    ):
        super().__init__()
        skips = encoder_channels[-2::-1]
        if len(decoder_channels) < len(skips):
            raise ConfigError(
                f"decoder_channels needs at least {len(skips)} entries for this encoder "
                f"(one per skip connection), got {list(decoder_channels)}"
            )
        in_channels = [encoder_channels[-1], *decoder_channels[:-1]]
        self.blocks = nn.ModuleList(
            UNetDecoderBlock(c_in, skips[i] if i < len(skips) else 0, c_out, upsampling, norm)
            for i, (c_in, c_out) in enumerate(zip(in_channels, decoder_channels, strict=True))
        )

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x, skips = features[-1], features[-2::-1]
        for i, block in enumerate(self.blocks):
            skip = skips[i] if i < len(skips) else None
            if skip is not None:
                target = tuple(skip.shape[-2:])
            elif i == len(self.blocks) - 1:
                target = tuple(size)
            else:
                target = (2 * x.shape[-2], 2 * x.shape[-1])
            x = block(x, skip, target)
        return x


class UNetNetwork(nn.Module):
    """U-Net as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W].

    Args:
        num_classes: output classes.
        in_channels: input channels.
        encoder: "original" (the paper's encoder) or a timm model name.
        encoder_weights: for a timm encoder: null, "imagenet", a file or a URL (seglight.nn.encoders).
        base_channels: channels of the original encoder's first stage (64 in the paper).
        decoder_channels: output channels of each decoder block, deepest first. Default: the
            mirror of the original encoder (512, 256, 128, 64 at base 64), or (256, 128, 64, 32, 16)
            for a timm encoder.
        upsampling: "transpose" (2x2 up-convolution, the paper's), "nearest" or "bilinear".
            Default: transpose for the original encoder, nearest for a timm encoder.
        norm: BatchNorm after each decoder (and original encoder) convolution.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str = "original",
        encoder_weights: str | None = None,
        base_channels: int = 64,
        decoder_channels: list[int] | None = None,
        upsampling: Upsampling | None = None,
        norm: bool = True,
    ):
        super().__init__()
        if encoder == "original":
            if encoder_weights not in (None, "none"):
                raise ConfigError(
                    "the original U-Net encoder has no pretrained weights; use encoder_weights: null"
                )
            self.encoder = UNetEncoder(in_channels, base_channels, norm=norm)
            decoder_channels = decoder_channels or self.encoder.channels[-2::-1]
            upsampling = upsampling or "transpose"
        else:
            self.encoder = TimmEncoder(encoder, encoder_weights, in_channels)
            decoder_channels = (
                decoder_channels or [256, 128, 64, 32, 16][: len(self.encoder.channels)]
            )
            upsampling = upsampling or "nearest"
        self.decoder = UNetDecoder(self.encoder.channels, list(decoder_channels), upsampling, norm)
        self.head = nn.Conv2d(decoder_channels[-1], num_classes, kernel_size=1)
        if encoder == "original":
            # the paper's init (Sec. 3): every layer, the 1x1 classifier included, N(0, 2/N)
            # with N the incoming nodes of a neuron (He et al.'s fan-in)
            for part in (self.encoder, self.decoder, self.head):
                init_weights(part, mode="fan_in")
            for m in self.decoder.modules():  # a 2x2 stride-2 up-conv's output sees C_in inputs
                if isinstance(m, nn.ConvTranspose2d):  # (torch's fan-in counts C_out k^2)
                    nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.in_channels))
        else:
            init_weights(self.decoder)
            init_classifier(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        logits = self.head(self.decoder(self.encoder(x), size))
        return resize_to(logits, size)


class UNet(SegmentationModel):
    """U-Net (Ronneberger et al. 2015), original or on a timm encoder.

    paper_params: "about 31M" (the paper's text; no FLOPs given).

    Args:
        encoder: "original" for the paper's encoder, or any timm model name (e.g. resnet34).
        encoder_weights: null (from scratch), "imagenet", a weights file or a URL.
        base_channels: first-stage channels of the original encoder (64 in the paper).
        decoder_channels: channels of each decoder block, deepest first (default: see UNetNetwork).
        upsampling: "transpose", "nearest" or "bilinear" (default: transpose for the original,
            nearest for a timm encoder).
        norm: BatchNorm after each convolution (the 2015 paper has none).
    """

    paper_params = 31.0

    def __init__(
        self,
        encoder: str = "original",
        encoder_weights: str | None = None,
        base_channels: int = 64,
        decoder_channels: list[int] | None = None,
        upsampling: Upsampling | None = None,
        norm: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = UNetNetwork(
            self.num_classes,
            self.in_channels,
            encoder=encoder,
            encoder_weights=encoder_weights,
            base_channels=base_channels,
            decoder_channels=decoder_channels,
            upsampling=upsampling,
            norm=norm,
        )
