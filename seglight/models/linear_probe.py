"""The linear probe of a frozen ViT: the standard evaluation of self-supervised backbones for
semantic segmentation, as in DINOv2 (Oquab et al., TMLR 2024, Sec. 7.4 "Semantic segmentation",
Table 10, and the released ``dinov2/eval/segmentation`` configs):

- ``layers: 1`` ("linear"): the patch tokens of the last block, after the final LayerNorm, BatchNorm
  and a 1x1 conv (a linear layer per patch) to class logits, upsampled bilinearly to the input;
- ``layers: 4`` ("+ms" without its multi-scale test-time augmentation, which is
  ``inference.scales`` here): the patch tokens of the last four blocks, concatenated.

The backbone is frozen (no gradients, kept in eval mode); ``freeze_encoder: false`` fine-tunes it.
Any timm ViT, at any crop: position embeddings are interpolated to the patch grid and a side that
does not divide by the patch size is zero-padded, the logits cropped back (DINOv2's evaluation
pads likewise, ``CenterPadding``, but centred).

Difference: DINOv2's released head also concatenates the class token to every patch token; here
the patch tokens only (timm's feature getter drops the prefix tokens), as the paper describes.
DINOv2 ViT-S/14 with the linear head: 44.3 mIoU on ADE20K (Table 10) with the pretrained weights,
which need ``encoder_weights`` (a file: no download here).
"""

from __future__ import annotations

import torch
from torch import nn

from seglight.errors import ConfigError
from seglight.models.base import SegmentationModel
from seglight.models.dpt import freeze, vit_encoder
from seglight.nn import pad_to_multiple, unpad


class LinearProbeNetwork(nn.Module):
    """BatchNorm + 1x1 conv on a (frozen) ViT's patch tokens: [B, in_channels, H, W] -> logits
    [B, num_classes, H, W].

    Args:
        num_classes: output classes.
        in_channels: input channels.
        encoder: a timm plain ViT.
        encoder_weights: null, "imagenet", a file or a URL (seglight.nn.encoders).
        layers: how many last blocks' tokens to concatenate (1: "linear", 4: "+ms").
        freeze_encoder: keep the backbone frozen (the probe).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str = "vit_small_patch14_dinov2",
        encoder_weights: str | None = None,
        layers: int = 1,
        freeze_encoder: bool = True,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ConfigError(f"LinearProbe layers must be >= 1, got {layers}")
        self.encoder = vit_encoder(
            encoder,
            encoder_weights,
            in_channels,
            tuple(range(-layers, 0)),
            "LinearProbe",
            final_norm=True,  # the final LayerNorm on every block's tokens, as DINOv2's
        )
        width = sum(self.encoder.channels)
        self.head = nn.Sequential(nn.BatchNorm2d(width), nn.Conv2d(width, num_classes, 1))
        nn.init.normal_(self.head[1].weight, std=0.01)  # mmseg's init of the classifier
        nn.init.zeros_(self.head[1].bias)
        self.frozen = freeze_encoder
        if freeze_encoder:
            freeze(self.encoder)

    def train(self, mode: bool = True) -> LinearProbeNetwork:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.encoder.input_multiple)
        logits = self.head(torch.cat(self.encoder(x), dim=1))
        return unpad(logits, tuple(x.shape[-2:]), (h, w))


class LinearProbe(SegmentationModel):
    """Linear probe (DINOv2's segmentation evaluation): BN + 1x1 conv on a frozen ViT's tokens.

    Args:
        encoder: any timm plain ViT (default vit_small_patch14_dinov2).
        encoder_weights: the pretrained backbone: "imagenet" (timm's weights, from the local
            cache), a weights file or a URL; null trains nothing useful when frozen.
        layers: 1 (last block, "linear") or 4 (last four blocks concatenated, "+ms").
        freeze_encoder: keep the backbone frozen (default; false fine-tunes it).
    """

    def __init__(
        self,
        encoder: str = "vit_small_patch14_dinov2",
        encoder_weights: str | None = None,
        layers: int = 1,
        freeze_encoder: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = LinearProbeNetwork(
            self.num_classes,
            self.in_channels,
            encoder=encoder,
            encoder_weights=encoder_weights,
            layers=layers,
            freeze_encoder=freeze_encoder,
        )
