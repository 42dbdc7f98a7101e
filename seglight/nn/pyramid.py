"""Multi-level features for decoders that fuse a pyramid (UPerNet's FPN, Mask2Former's pixel
decoder): the encoder's deepest `levels` maps, strides 4..32 for a CNN or a hierarchical
transformer; for a plain ViT, whose blocks all run at the patch stride, the simple feature
pyramid of BEiT (Bao et al. 2022, Sec. 3.3 / the authors' semantic-segmentation code, as in
mmsegmentation's UPerNet-ViT configs): four blocks' outputs rescaled by 4 (two 2x2 transposed
convs with BN and GELU between), 2 (one transposed conv), 1 and 1/2 (2x2 max pooling).
"""

from __future__ import annotations

import torch
from torch import nn

from seglight.errors import ConfigError


class FeaturePyramid(nn.Module):
    """The last `levels` feature maps of an encoder, as a pyramid (see the module docstring).

    Args:
        channels: the encoder's channels per returned map (TimmEncoder.channels).
        reductions: the encoder's strides per map (TimmEncoder.reductions).
        levels: how many levels the decoder needs (4).
        what: how the encoder was chosen, for the error message (e.g. "encoder 'resnet18'").

    Attributes:
        channels, reductions: those of the returned levels (a ViT's: patch/4 .. patch*2).

    Shapes: list of encoder maps -> list of `levels` maps [B, channels[i], H/r_i, W/r_i].
    """

    def __init__(
        self, channels: list[int], reductions: list[int], levels: int = 4, what: str = "encoder"
    ) -> None:
        super().__init__()
        if len(channels) < levels:
            raise ConfigError(
                f"{what} gives {len(channels)} feature level(s) (strides {reductions}), but the "
                f"decoder needs {levels}; choose an encoder (or encoder_indices) with {levels} levels"
            )
        self.plain_vit = len(set(reductions)) == 1
        self.levels = levels
        if not self.plain_vit:
            self.rescale = None
            self.channels = list(channels[-levels:])
            self.reductions = list(reductions[-levels:])
            return
        if levels != 4:
            raise ConfigError(f"the ViT feature pyramid has 4 levels, {levels} asked for ({what})")
        c, r = channels[-1], reductions[-1]
        self.rescale = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(c, c, 2, stride=2),
                    nn.BatchNorm2d(c),
                    nn.GELU(),
                    nn.ConvTranspose2d(c, c, 2, stride=2),
                ),
                nn.ConvTranspose2d(c, c, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2, ceil_mode=True),  # ceil: an odd patch grid keeps its last row
            ]
        )
        self.channels = [c] * 4
        self.reductions = [r / 4, r / 2, r, r * 2]

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        features = features[-self.levels :]
        if self.rescale is None:
            return features
        return [op(f) for op, f in zip(self.rescale, features, strict=True)]
