"""SegFormer (Xie, Wang, Yu, Anandkumar, Alvarez and Luo, NeurIPS 2021, "SegFormer: Simple and
Efficient Design for Semantic Segmentation with Transformers").

Encoder: the Mix Transformer MiT-B0..B5 (Sec. 3.1, Appendix Table 6): four stages at strides
4/8/16/32, each an overlapping patch embedding (7x7 stride 4, then 3x3 stride 2 convs), blocks of
efficient self-attention (keys and values spatially reduced by a strided conv of ratio 8/4/2/1 and
a LayerNorm), and Mix-FFN (Linear -> 3x3 depthwise conv -> GELU -> Linear, expansion 4), and a
LayerNorm after each stage. Decoder: the all-MLP head (Sec. 3.2, Eq. 1), as in the authors' code
(NVlabs/SegFormer, ``segformer_head.py``): one linear layer per level to C (256 for B0/B1, 768
for B2..B5), bilinear upsampling to 1/4, concatenation [c4, c3, c2, c1], a 1x1 conv-BN-ReLU to C
(the released code's ``linear_fuse``; the paper says "MLP"), dropout 0.1, a 1x1 classifier, and
bilinear upsampling to the input.

The encoder is timm's PVTv2 (Wang et al. 2022), the same family by the same group: its
overlapping patch embeddings, spatial-reduction attention (conv + LayerNorm, ratios 8/4/2/1,
qkv bias), depthwise-conv FFN and per-stage norms are MiT's layer for layer, with the same depths,
widths and heads for B0..B5. The one difference is the FFN expansion: PVTv2 uses 8/8/4/4 (B0..B4),
MiT 4 everywhere; we build PVTv2 with ``mlp_ratios=(4, 4, 4, 4)``, which gives MiT exactly
(B0 encoder 3.32M parameters, paper 3.4M; B2 24.2M, paper 24.2M). MiT weights converted to timm's
PVTv2 names load through ``encoder_weights`` (a file); timm's own PVTv2 ImageNet weights do not fit
B0..B4 (their FFNs are wider), only B5's.

Differences: inputs whose sides do not divide by 32 are zero-padded at the bottom/right and the
logits cropped back (a stage-1 map smaller than the reduction conv's 8x8 kernel cannot be
attended, and this keeps the strides exact); the authors resize instead. Stochastic depth
(``drop_path_rate`` 0.1 in the paper's training) is an option, 0 by default (the experiment files
set 0.1).

Size (Table 1/2, ADE20K, 150 classes, 512x512): B0 3.8M parameters and 8.4 GFLOPs, B2 27.5M and
62.4 GFLOPs (the paper's "FLOPs" are multiply-adds, as mmcv counts them: our 2 x MAC counts are
about twice these).
"""

from __future__ import annotations

from typing import ClassVar, Literal

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
from seglight.profile import PaperCost

Variant = Literal["b0", "b1", "b2", "b3", "b4", "b5"]
#: decoder width per variant (the paper's C, Table 6 / the authors' configs)
DECODER_CHANNELS: dict[str, int] = {
    "b0": 256,
    "b1": 256,
    "b2": 768,
    "b3": 768,
    "b4": 768,
    "b5": 768,
}


class AllMLPDecoder(nn.Module):
    """SegFormer's all-MLP decoder: per-level linear layer (a 1x1 conv with bias) to `channels`,
    upsampling to the first level's size, concatenation (deepest first), 1x1 conv-BN-ReLU fuse.

    Shapes: features [B, in_channels[i], H/s_i, W/s_i] -> [B, channels, H/s_0, W/s_0].
    """

    def __init__(self, in_channels: list[int], channels: int = 256) -> None:
        super().__init__()
        self.linear = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = ConvNormAct(len(in_channels) * channels, channels, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = tuple(features[0].shape[-2:])
        ups = [resize_to(lin(f), size) for lin, f in zip(self.linear, features, strict=True)]
        return self.fuse(torch.cat(ups[::-1], dim=1))


class SegFormerNetwork(nn.Module):
    """SegFormer as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W].

    Args:
        num_classes: output classes.
        in_channels: input channels.
        variant: "b0".."b5" (MiT-B0..B5).
        encoder_weights: null, or a weights file / URL of timm's ``pvt_v2_<variant>`` built with
            ``mlp_ratios=(4, 4, 4, 4)`` (see the module docstring).
        decoder_channels: the decoder's C (default: 256 for B0/B1, 768 otherwise).
        dropout: dropout before the classifier (0.1).
        drop_path_rate: stochastic depth of the encoder (the paper trains with 0.1).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        variant: Variant = "b0",
        encoder_weights: str | None = None,
        decoder_channels: int | None = None,
        dropout: float = 0.1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if variant not in DECODER_CHANNELS:
            raise ConfigError(
                f"SegFormer variant must be one of {', '.join(DECODER_CHANNELS)}, got {variant!r}"
            )
        self.encoder = TimmEncoder(
            f"pvt_v2_{variant}",
            encoder_weights,
            in_channels,
            timm_options={"mlp_ratios": (4, 4, 4, 4), "drop_path_rate": drop_path_rate},
        )
        channels = decoder_channels or DECODER_CHANNELS[variant]
        self.decoder = AllMLPDecoder(self.encoder.channels, channels)
        self.classifier = nn.Sequential(
            nn.Dropout2d(dropout), classifier_conv(channels, num_classes, 1)
        )
        init_weights(self.decoder)
        init_weights(self.classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.encoder.input_multiple)
        logits = self.classifier(self.decoder(self.encoder(x)))
        return unpad(logits, tuple(x.shape[-2:]), (h, w))


class SegFormer(SegmentationModel):
    """SegFormer (Xie et al. 2021): Mix Transformer encoder (MiT-B0..B5) + all-MLP decoder.

    paper_params / paper_gflops: SegFormer-B0 on ADE20K (150 classes, 512x512), Table 2; B2 is
    27.5M / 62.4 GFLOPs (multiply-adds). See the module docstring for the encoder (timm PVTv2).

    Args:
        variant: "b0" (default) .. "b5".
        encoder_weights: null (from scratch) or a MiT weights file in timm's PVTv2 layout.
        drop_path_rate: encoder stochastic depth (0.1 in the paper).
    """

    paper_params: ClassVar[float | None] = 3.8
    paper_cost = PaperCost(8.4, "GMACs", (512, 512), 150)

    def __init__(
        self,
        variant: Variant = "b0",
        encoder_weights: str | None = None,
        drop_path_rate: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = SegFormerNetwork(
            self.num_classes,
            self.in_channels,
            variant=variant,
            encoder_weights=encoder_weights,
            drop_path_rate=drop_path_rate,
        )
