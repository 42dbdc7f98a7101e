"""HRNetV2 + OCR: the high-resolution network's segmentation representation (Wang et al., TPAMI
2020, "Deep High-Resolution Representation Learning for Visual Recognition", Sec. 3 "HRNetV2",
Fig. 4 b) with the object-contextual representations of Yuan, Chen and Wang (ECCV 2020,
"Object-Contextual Representations for Semantic Segmentation", Sec. 3.2-3.3, Fig. 3), as in the
authors' released code (HRNet/HRNet-Semantic-Segmentation, branch HRNet-OCR, ``seg_hrnet_ocr.py``):

- HRNetV2: timm's HRNet (W18/W48) four branches at 1/4, 1/8, 1/16 and 1/32 (48/96/192/384
  channels for W48), the lower three upsampled bilinearly to 1/4 and concatenated (720 channels);
- soft object regions: the auxiliary head (1x1 conv-BN-ReLU, 1x1 classifier) on the concatenation,
  supervised by the labels (loss weight 0.4, the released config's): training returns
  {"out", "aux"};
- the pixel representation: 3x3 conv-BN-ReLU to 512;
- object region representations: each class's spatial softmax of the soft regions pools the pixel
  representations (K region vectors of 512);
- object contextual representations: attention of every pixel (query: two 1x1 conv-BN-ReLU to 256)
  over the K regions (keys: likewise; values: one 1x1 conv-BN-ReLU to 256, then back up to 512),
  scaled by 256^-1/2; concatenated with the pixel representation, 1x1 conv-BN-ReLU to 512, dropout
  0.05, and the 1x1 classifier; logits upsampled from 1/4 to the input.

Differences: timm's HRNet is the ImageNet classification network's body, the same as the
segmentation backbone (its stem and four stages; the classification head is not used); inputs
whose sides do not divide by 32 are zero-padded and the logits cropped back (HRNet's fuse layers
upsample by exact factors). No parameter count is taken from the papers here: ours for 19 classes
are 70.37M with W48 (70.3M is the figure usually quoted for the released W48-OCR model; we could
not check it against the papers here), 12.08M with W18; all of them run at inference, the
soft-region head included (OCR pools with its regions).
"""

from __future__ import annotations

import math
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


class ObjectContext(nn.Module):
    """OCR: object region representations from the soft regions, then pixel-region attention.

    Shapes: feats [B, C, h, w], regions [B, K, h, w] -> [B, C, h, w].
    """

    def __init__(self, channels: int = 512, key_channels: int = 256, dropout: float = 0.05):
        super().__init__()
        self.query = nn.Sequential(
            ConvNormAct(channels, key_channels, 1), ConvNormAct(key_channels, key_channels, 1)
        )
        self.key = nn.Sequential(
            ConvNormAct(channels, key_channels, 1), ConvNormAct(key_channels, key_channels, 1)
        )
        self.value = ConvNormAct(channels, key_channels, 1)
        self.up = ConvNormAct(key_channels, channels, 1)
        self.fuse = nn.Sequential(ConvNormAct(2 * channels, channels, 1), nn.Dropout2d(dropout))
        self.scale = 1.0 / math.sqrt(key_channels)

    def forward(self, feats: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feats.shape
        # object region representations: [B, K, C] -> as a [B, C, K, 1] "image" for the 1x1 convs
        weights = regions.flatten(2).softmax(dim=-1)  # spatial softmax per class
        proxy = torch.bmm(weights, feats.flatten(2).transpose(1, 2)).transpose(1, 2).unsqueeze(-1)
        query = self.query(feats).flatten(2).transpose(1, 2)  # [B, hw, Ck]
        key = self.key(proxy).flatten(2)  # [B, Ck, K]
        value = self.value(proxy).flatten(2).transpose(1, 2)  # [B, K, Ck]
        attention = (torch.bmm(query, key) * self.scale).softmax(dim=-1)  # [B, hw, K]
        context = torch.bmm(attention, value).transpose(1, 2).reshape(b, -1, h, w)
        return self.fuse(torch.cat([self.up(context), feats], dim=1))


class HRNetOCRNetwork(nn.Module):
    """HRNetV2 + OCR as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W]
    (eval), or {"out": logits, "aux": soft object regions [B, num_classes, ~H/4, ~W/4]} in training.

    Args:
        num_classes: output classes.
        in_channels: input channels.
        encoder: a timm HRNet (hrnet_w48, the paper's; hrnet_w18, ...).
        encoder_weights: null, "imagenet", a file or a URL (seglight.nn.encoders).
        ocr_channels: width of the pixel and object-contextual representations (512).
        key_channels: width of the attention's queries and keys (256).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str = "hrnet_w48",
        encoder_weights: str | None = None,
        ocr_channels: int = 512,
        key_channels: int = 256,
    ) -> None:
        super().__init__()
        if not encoder.startswith("hrnet"):
            raise ConfigError(
                f"HRNetOCR needs a timm HRNet encoder (hrnet_w18, hrnet_w48), got {encoder!r}"
            )
        # the four branches themselves, not timm's classification "incre" features
        self.encoder = TimmEncoder(
            encoder, encoder_weights, in_channels, timm_options={"feature_location": ""}
        )
        width = sum(self.encoder.channels[-4:])
        self.aux_head = nn.Sequential(
            ConvNormAct(width, width, 1), classifier_conv(width, num_classes, 1)
        )
        self.pixel = ConvNormAct(width, ocr_channels, 3)
        self.ocr = ObjectContext(ocr_channels, key_channels)
        self.classifier = classifier_conv(ocr_channels, num_classes, 1)
        for module in (self.aux_head, self.pixel, self.ocr, self.classifier):
            init_weights(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.encoder.input_multiple)
        branches = self.encoder(x)[-4:]
        size = tuple(branches[0].shape[-2:])
        feats = torch.cat([resize_to(f, size) for f in branches], dim=1)  # HRNetV2's concat
        regions = self.aux_head(feats)
        out = self.classifier(self.ocr(self.pixel(feats), regions))
        padded = tuple(x.shape[-2:])
        out = unpad(out, padded, (h, w))
        if self.training:
            # the padding must not be scored against the mask
            aux = unpad(regions, padded, (h, w)) if padded != (h, w) else regions
            return {"out": out, "aux": aux}
        return out


class HRNetOCR(SegmentationModel):
    """HRNetV2 + OCR (Wang et al. 2020; Yuan et al. 2020): high-resolution branches concatenated,
    object-contextual representations, soft-region auxiliary head.

    Args:
        encoder: a timm HRNet: hrnet_w48 (default, the paper's) or hrnet_w18, ...
        encoder_weights: null (from scratch), "imagenet", a weights file or a URL.
    """

    paper_params: ClassVar[float | None] = None

    def __init__(
        self, encoder: str = "hrnet_w48", encoder_weights: str | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.net = HRNetOCRNetwork(
            self.num_classes, self.in_channels, encoder=encoder, encoder_weights=encoder_weights
        )
