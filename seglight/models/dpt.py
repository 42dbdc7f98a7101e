"""DPT (Ranftl, Bochkovskiy and Koltun, ICCV 2021, "Vision Transformers for Dense Prediction"),
the semantic-segmentation model of Sec. 3 / Fig. 1 and Sec. 4.2 (ADE20K, Table 4), as in the
authors' code (isl-org/DPT, ``dpt/models.py`` and ``blocks.py``):

- a plain ViT; the tokens of four blocks (ViT-B: 2, 5, 8, 11; ViT-L: 4, 11, 17, 23; in general
  evenly spaced, the last included) are reassembled into images at 1/4, 1/8, 1/16 and 1/32 of the
  input (for patch 16): a 1x1 projection to 96/192/384/768 channels (ViT-B; ViT-L 256/512/1024/
  1024), then a 4x4 stride-4 transposed conv, a 2x2 stride-2 transposed conv, nothing, and a 3x3
  stride-2 conv; a 3x3 conv (no bias) takes each to 256;
- four fusion blocks (RefineNet-style: residual conv units of ReLU-conv3x3-BN twice, addition of
  the next shallower level after its own residual unit, 2x bilinear upsampling, 1x1 conv), from
  the deepest level up;
- the segmentation head: 3x3 conv-BN-ReLU (256), dropout 0.1, 1x1 classifier, 2x bilinear
  upsampling (to the input).

Any timm ViT works (``vit_base_patch16_224``, ``vit_small_patch14_dinov2``, ``eva02_*``, ...),
at any crop: position embeddings are interpolated to the patch grid (timm's
``dynamic_img_size``), and a side that does not divide by the patch size is zero-padded and the
logits cropped back. ``freeze_encoder`` trains the head only.

Differences: the class token is ignored (the paper's "readout: ignore"; its best ADE20K model
projects it into each patch token, "project"): timm's feature getter returns the patch tokens only.
The fusion blocks resize to the next level's size (not exactly 2x) so odd patch grids work.
The auxiliary head of the authors' training (unreleased) is not built. DPT-Hybrid (ResNet-50 +
ViT-B, 49.02 mIoU on ADE20K) is not provided; the default is DPT-Base (ViT-B/16, no parameter
count printed in the paper for its segmentation model, so none here).
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
    classifier_conv,
    init_weights,
    pad_to_multiple,
    resize_to,
    unpad,
)


def vit_encoder(
    encoder: str,
    encoder_weights: str | None,
    in_channels: int,
    out_indices: tuple[int, ...] | None,
    model: str,
    **timm_options,
) -> TimmEncoder:
    """A TimmEncoder for a plain ViT (all maps at the patch stride), or a ConfigError naming
    `model` and the encoder when `encoder` is not one."""
    enc = TimmEncoder(
        encoder, encoder_weights, in_channels, out_indices=out_indices, timm_options=timm_options
    )
    if len(set(enc.reductions)) != 1 or enc.input_multiple == 1:
        raise ConfigError(
            f"{model} needs a plain ViT encoder (e.g. vit_base_patch16_224, "
            f"vit_small_patch14_dinov2), got {encoder!r} with feature strides {enc.reductions}"
        )
    return enc


def freeze(module: nn.Module) -> None:
    """No gradients for `module`'s parameters (their BatchNorms, if any, are kept in eval mode by
    the network's `train`)."""
    for p in module.parameters():
        p.requires_grad_(False)


class ResidualConvUnit(nn.Module):
    """DPT's residual unit: x + (ReLU -> conv3x3 -> BN -> ReLU -> conv3x3 -> BN)(x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            ConvNormAct(channels, channels, 3, act=False),
            nn.ReLU(),
            ConvNormAct(channels, channels, 3, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class FusionBlock(nn.Module):
    """DPT's feature fusion: (x + unit1(skip)) -> unit2 -> resize to `size` -> 1x1 conv.

    Shapes: x [B, C, h, w], skip [B, C, h, w] or None -> [B, C, size].
    """

    def __init__(self, channels: int, skip: bool = True) -> None:
        super().__init__()
        # the deepest block has no skip input (the authors' code builds an unused unit for it)
        self.skip_unit = ResidualConvUnit(channels) if skip else None
        self.unit = ResidualConvUnit(channels)
        self.out_conv = nn.Conv2d(channels, channels, 1)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]
    ) -> torch.Tensor:
        if self.skip_unit is not None and skip is not None:
            x = x + self.skip_unit(skip)
        return self.out_conv(resize_to(self.unit(x), size))


class DPTNetwork(nn.Module):
    """DPT as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W].

    Args:
        num_classes: output classes.
        in_channels: input channels.
        encoder: a timm plain ViT.
        encoder_weights: null, "imagenet", a file or a URL (seglight.nn.encoders).
        encoder_indices: the four blocks to reassemble (default: evenly spaced, last included).
        reassemble_channels: the 1x1 projections' widths (default: ViT-B's 96/192/384/768 scaled
            to the ViT's width, e.g. 48/96/192/384 for ViT-S).
        channels: fusion width (256).
        dropout: dropout before the classifier (0.1).
        freeze_encoder: train the head only.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str = "vit_base_patch16_224",
        encoder_weights: str | None = None,
        encoder_indices: tuple[int, ...] | None = None,
        reassemble_channels: tuple[int, ...] | None = None,
        channels: int = 256,
        dropout: float = 0.1,
        freeze_encoder: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = vit_encoder(encoder, encoder_weights, in_channels, encoder_indices, "DPT")
        if len(self.encoder.channels) != 4:
            raise ConfigError(
                f"DPT reassembles 4 blocks; encoder_indices gives {len(self.encoder.channels)}"
            )
        width = self.encoder.channels[-1]
        dims = reassemble_channels or tuple(width * k // 8 for k in (1, 2, 4, 8))
        resample = [
            nn.ConvTranspose2d(dims[0], dims[0], 4, stride=4),
            nn.ConvTranspose2d(dims[1], dims[1], 2, stride=2),
            nn.Identity(),
            nn.Conv2d(dims[3], dims[3], 3, stride=2, padding=1),
        ]
        self.reassemble = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, d, 1), r, nn.Conv2d(d, channels, 3, padding=1, bias=False)
            )
            for d, r in zip(dims, resample, strict=True)
        )
        self.fusion = nn.ModuleList(FusionBlock(channels, skip=i < 3) for i in range(4))
        self.head = nn.Sequential(
            ConvNormAct(channels, channels, 3),
            nn.Dropout2d(dropout),
            classifier_conv(channels, num_classes, 1),
        )
        self.frozen = freeze_encoder
        if freeze_encoder:
            freeze(self.encoder)
        for module in (self.reassemble, self.fusion, self.head):
            init_weights(module)

    def train(self, mode: bool = True) -> DPTNetwork:
        super().train(mode)
        if self.frozen:  # a frozen backbone stays in eval mode (dropout off, norms fixed)
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.encoder.input_multiple)
        levels = [r(f) for r, f in zip(self.reassemble, self.encoder(x), strict=True)]
        y = None
        for i in range(3, -1, -1):  # deepest first; each block resizes to the next level's size
            size = levels[i - 1].shape[-2:] if i else tuple(2 * s for s in levels[0].shape[-2:])
            y = self.fusion[i](
                levels[i] if y is None else y, None if y is None else levels[i], size
            )
        logits = self.head(y)
        return unpad(logits, tuple(x.shape[-2:]), (h, w))


class DPT(SegmentationModel):
    """DPT (Ranftl et al. 2021): a plain ViT reassembled at four scales, fused RefineNet-style.

    Args:
        encoder: any timm plain ViT (default vit_base_patch16_224, DPT-Base;
            vit_large_patch16_384 for DPT-Large; vit_small_patch14_dinov2, ...).
        encoder_weights: null (from scratch), "imagenet", a weights file or a URL.
        encoder_indices: the four ViT blocks to reassemble.
        freeze_encoder: train the head only (a frozen pretrained ViT).
    """

    paper_params: ClassVar[float | None] = None

    def __init__(
        self,
        encoder: str = "vit_base_patch16_224",
        encoder_weights: str | None = None,
        encoder_indices: tuple[int, ...] | None = None,
        freeze_encoder: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = DPTNetwork(
            self.num_classes,
            self.in_channels,
            encoder=encoder,
            encoder_weights=encoder_weights,
            encoder_indices=tuple(encoder_indices) if encoder_indices else None,
            freeze_encoder=freeze_encoder,
        )
