"""UPerNet (Xiao, Liu, Zhou, Jiang and Sun, ECCV 2018, "Unified Perceptual Parsing for Scene
Understanding"), the semantic-segmentation head of ConvNeXt (Liu et al. 2022, Table 3) and Swin
(Liu et al. 2021, Table 3) on ADE20K, as in mmsegmentation's ``UPerHead`` (which those papers'
released configs use):

- pyramid pooling (PSPNet's PPM, bins 1/2/3/6, each pooled map -> 1x1 conv-BN-ReLU to 512) on the
  deepest level, concatenated with it and fused by a 3x3 conv-BN-ReLU (512);
- an FPN over four levels (strides 4/8/16/32): 1x1 conv-BN-ReLU laterals to 512, top-down
  addition with bilinear upsampling, a 3x3 conv-BN-ReLU on each merged level but the top;
- all four levels upsampled to 1/4, concatenated (2048) and fused by a 3x3 conv-BN-ReLU (512),
  dropout 0.1, a 1x1 classifier, bilinear upsampling to the input;
- the auxiliary FCN head on the stride-16 level (3x3 conv-BN-ReLU to 256, dropout 0.1, 1x1
  classifier; loss weight 0.4): in training the network returns {"out", "aux"} and
  SegmentationModel adds ``aux_weight`` times its loss.

Encoders: any timm model with four levels at strides 4..32 (ConvNeXt, Swin, ResNet, PVTv2, ...);
a plain ViT (``vit_base_patch16_224``, ``vit_small_patch14_dinov2``, ...) through BEiT's simple
feature pyramid on blocks (2, 5, 8, 11) of 12 (seglight.nn.pyramid), with position embeddings
interpolated to any crop (timm's ``dynamic_img_size``); inputs whose sides do not divide by the
patch size (ViT) or by 32 (Swin, PVTv2, HRNet) are zero-padded and the logits cropped back.

Differences from the papers' code: the backbones come from timm, without the extra LayerNorm that
mmsegmentation's ConvNeXt/Swin wrappers put on each output level (3k parameters); stochastic
depth (0.4 for ConvNeXt-T, 0.3 for Swin-T in the papers) is the ``drop_path_rate`` option, 0 by
default (the experiment files set it).

Size at ADE20K (150 classes, 512x2048 for FLOPs; the papers count multiply-adds as "FLOPs"):
ConvNeXt-T 60M / 939 GFLOPs (ConvNeXt Table 3), Swin-T 60M / 945 GFLOPs (Swin Table 3); ours:
60.24M and 59.94M (aux head included, as in the papers' counts).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from seglight.models.base import SegmentationModel
from seglight.nn import (
    ConvNormAct,
    FCNHead,
    TimmEncoder,
    classifier_conv,
    init_weights,
    pad_to_multiple,
    resize_to,
    unpad,
)
from seglight.nn.context import PyramidPooling
from seglight.nn.pyramid import FeaturePyramid
from seglight.profile import PaperCost


class UPerHead(nn.Module):
    """UPerNet's decoder: PPM on the deepest level + FPN, fused at the finest level.

    Shapes: features [B, in_channels[i], H/s_i, W/s_i] (fine to coarse) -> [B, channels, H/s_0,
    W/s_0].
    """

    def __init__(
        self, in_channels: list[int], channels: int = 512, bins: tuple[int, ...] = (1, 2, 3, 6)
    ) -> None:
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, bins, branch_channels=channels)
        self.laterals = nn.ModuleList(ConvNormAct(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvNormAct(len(in_channels) * channels, channels, 3)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.laterals, features, strict=False)]
        laterals.append(self.ppm(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + resize_to(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=False)]
        outs.append(laterals[-1])
        size = tuple(outs[0].shape[-2:])
        return self.fuse(torch.cat([resize_to(o, size) for o in outs], dim=1))


class UPerNetNetwork(nn.Module):
    """UPerNet as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W]
    (eval), or {"out": logits, "aux": [B, num_classes, ~H/16, ~W/16]} in training with `aux`.

    Args:
        num_classes: output classes.
        in_channels: input channels.
        encoder: a timm model name with four levels at strides 4..32, or a plain ViT.
        encoder_weights: null, "imagenet", a file or a URL (seglight.nn.encoders).
        encoder_indices: which timm feature levels (for a ViT: blocks) to use (default: all, the
            last four used; a ViT: evenly spaced, (2, 5, 8, 11) of 12).
        channels: the head's width (512).
        bins: pyramid pooling bin sizes (1, 2, 3, 6).
        aux: build the auxiliary FCN head on the third level (stride 16).
        dropout: dropout before the classifiers (0.1).
        drop_path_rate: the encoder's stochastic depth, when the timm model has one.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str = "convnext_tiny",
        encoder_weights: str | None = None,
        encoder_indices: tuple[int, ...] | None = None,
        channels: int = 512,
        bins: tuple[int, ...] = (1, 2, 3, 6),
        aux: bool = True,
        dropout: float = 0.1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        options = {"drop_path_rate": drop_path_rate} if drop_path_rate else None
        self.encoder = TimmEncoder(
            encoder, encoder_weights, in_channels, out_indices=encoder_indices, timm_options=options
        )
        self.neck = FeaturePyramid(
            self.encoder.channels,
            self.encoder.reductions,
            4,
            f"UPerNet: encoder {encoder!r}"
            + (f" with encoder_indices {list(encoder_indices)}" if encoder_indices else ""),
        )
        self.decoder = UPerHead(self.neck.channels, channels, tuple(bins))
        self.classifier = nn.Sequential(
            nn.Dropout2d(dropout), classifier_conv(channels, num_classes, 1)
        )
        self.aux_head = FCNHead(self.neck.channels[2], num_classes) if aux else None
        for module in (self.neck, self.decoder, self.classifier, self.aux_head):
            if module is not None:
                init_weights(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.encoder.input_multiple)
        features = self.neck(self.encoder(x))
        padded = tuple(x.shape[-2:])
        out = unpad(self.classifier(self.decoder(features)), padded, (h, w))
        if self.training and self.aux_head is not None:
            # the auxiliary logits too: the padding must not be scored against the mask
            aux = self.aux_head(features[2])
            return {"out": out, "aux": unpad(aux, padded, (h, w)) if padded != (h, w) else aux}
        return out


class UPerNet(SegmentationModel):
    """UPerNet (Xiao et al. 2018): FPN + pyramid pooling on any timm encoder (ConvNeXt, Swin, ViT).

    paper_params / paper_gflops: UPerNet with ConvNeXt-T on ADE20K (150 classes, 512x2048 for
    FLOPs, multiply-adds), ConvNeXt Table 3; Swin-T: 60M / 945 (Swin Table 3).

    Args:
        encoder: any timm model name (default convnext_tiny; swin_tiny_patch4_window7_224,
            vit_base_patch16_224, vit_small_patch14_dinov2, resnet50, ...).
        encoder_weights: null (from scratch), "imagenet", a weights file or a URL.
        encoder_indices: timm feature levels (ViT: blocks) to use; see UPerNetNetwork.
        aux: auxiliary FCN head on the stride-16 level, weight `aux_weight` (0.4).
        drop_path_rate: the encoder's stochastic depth (the papers: 0.4 ConvNeXt-T, 0.3 Swin-T).
    """

    paper_params: ClassVar[float | None] = 60.0
    paper_cost = PaperCost(939.0, "GMACs", (512, 2048), 150)

    def __init__(
        self,
        encoder: str = "convnext_tiny",
        encoder_weights: str | None = None,
        encoder_indices: tuple[int, ...] | None = None,
        aux: bool = True,
        drop_path_rate: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = UPerNetNetwork(
            self.num_classes,
            self.in_channels,
            encoder=encoder,
            encoder_weights=encoder_weights,
            encoder_indices=tuple(encoder_indices) if encoder_indices else None,
            aux=aux,
            drop_path_rate=drop_path_rate,
        )
