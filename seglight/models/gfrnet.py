"""G-FRNet (Islam, Rochan, Bruce and Wang, CVPR 2017, "Gated Feedback Refinement Network for
Dense Image Labeling").

Following the paper's Sec. 3 and its architecture figure: an encoder (VGG16's 13 convolutions,
the paper's) gives feature maps f1..f6 at strides 1, 2, 4, 8, 16 and 32 (here conv1_2, conv2_2,
conv3_3, conv4_3, conv5_3 and pool5: 224 -> 7 as in the figure). A 3x3 convolution of the
deepest map gives the coarse label map P_G (stride 32). Then, from deep to shallow, each step
refines the label map:

- gate unit: the shallower map f_i and the next-deeper f_i+1 each go through a 3x3 conv-BN-ReLU
  to the channels of f_i; the deeper one is upsampled to f_i's size and the two are multiplied
  element-wise (M_f = v_i * u_i+1): the deeper, more discriminative features gate which shallow
  details are passed on;
- gated refinement unit: a 3x3 conv-BN of the gate's output to one channel per class,
  concatenated with the previous label map upsampled (bilinear, x2) to its size, and a 3x3
  convolution to the refined label map.

Where the paper leaves a detail implicit (which VGG maps feed the gates, the gate's channel
count) the choice is the one stated here.

The last label map (stride 1) is the output; in training the coarser ones (P_G and the
intermediate maps, 5 in all) are returned as ``aux`` for deep supervision. The paper sums the
stage losses with equal weights, hence ``aux_weight: 1.0`` by default here; the paper compares each
map with the labels downsampled to its size, seglight's base class upsamples the map to the
labels instead. Parameters for 11 classes: 26.69M (VGG16's convolutions 14.71M, gate units
11.77M, refinement units and coarse classifier 0.21M; the paper gives no count). Gate channels follow the shallower map, capped at 512 (VGG16's widest,
so the paper's network is unchanged) to keep wide timm encoders affordable.

``encoder: <timm model>`` (e.g. resnet50): its feature pyramid replaces f1..f6 (strides 2..32
for most; the final map is then upsampled to the input size).
"""

from __future__ import annotations

import torch
from torch import nn

from seglight.models.base import SegmentationModel
from seglight.nn import ConvNormAct, TimmEncoder, init_weights, resize_to
from seglight.nn.vgg import VGG16, VGG16_NAMES, load_vgg16_weights


class GateUnit(nn.Module):
    """[B, C_i, h, w] and [B, C_i+1, h/2, w/2] -> gated features [B, channels, h, w]."""

    def __init__(self, shallow_channels: int, deep_channels: int, channels: int) -> None:
        super().__init__()
        self.shallow = ConvNormAct(shallow_channels, channels)
        self.deep = ConvNormAct(deep_channels, channels)

    def forward(self, shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        return self.shallow(shallow) * resize_to(self.deep(deep), shallow.shape[-2:])


class RefinementUnit(nn.Module):
    """Gated features [B, C, h, w] and the coarser label map [B, K, h', w'] -> [B, K, h, w]."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.reduce = ConvNormAct(channels, num_classes, act=False)
        self.refine = nn.Conv2d(2 * num_classes, num_classes, 3, padding=1)

    def forward(self, gated: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = resize_to(labels, gated.shape[-2:])
        return self.refine(torch.cat([self.reduce(gated), labels], dim=1))


class GFRNetNetwork(nn.Module):
    """G-FRNet as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W]; in
    training ``{"out": logits, "aux": [coarsest, ..., second finest label map]}``.

    Args:
        num_classes: output classes.
        in_channels: input channels.
        encoder: "vgg16" (the paper's), "vgg16_bn", or any timm model name.
        encoder_weights: null, "imagenet", a file or a URL.
        max_gate_channels: cap on the gate units' channels (512: VGG16's widest).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str = "vgg16",
        encoder_weights: str | None = None,
        max_gate_channels: int = 512,
    ) -> None:
        super().__init__()
        if encoder in VGG16_NAMES:
            self.encoder = VGG16(in_channels, batch_norm=encoder == "vgg16_bn")
            init_weights(self.encoder)
            load_vgg16_weights(self.encoder, encoder_weights)
            channels = [*self.encoder.channels, self.encoder.channels[-1]]  # + pool5
        else:
            self.encoder = TimmEncoder(encoder, encoder_weights, in_channels)
            channels = self.encoder.channels
        self.coarse = nn.Conv2d(channels[-1], num_classes, 3, padding=1)
        # deep to shallow: gate i fuses feature i with feature i + 1
        levels = range(len(channels) - 2, -1, -1)
        self.gates = nn.ModuleList(
            GateUnit(channels[i], channels[i + 1], min(channels[i], max_gate_channels))
            for i in levels
        )
        self.refinements = nn.ModuleList(
            RefinementUnit(min(channels[i], max_gate_channels), num_classes) for i in levels
        )
        init_weights(self.coarse)
        init_weights(self.gates)
        init_weights(self.refinements)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder maps, shallow to deep (VGG16: conv1_2, ..., conv5_3, pool5)."""
        if not isinstance(self.encoder, VGG16):
            return self.encoder(x)
        features = []
        for stage, pool in zip(self.encoder.stages, self.encoder.pools, strict=True):
            x = stage(x)
            features.append(x)
            x = pool(x)
        return [*features, x]

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict:
        size = x.shape[-2:]
        features = self.features(x)
        labels = [self.coarse(features[-1])]
        for i, gate, refine in zip(
            range(len(features) - 2, -1, -1), self.gates, self.refinements, strict=True
        ):
            labels.append(refine(gate(features[i], features[i + 1]), labels[-1]))
        out = resize_to(labels[-1], size)
        if self.training:
            return {"out": out, "aux": labels[:-1]}
        return out


class GFRNet(SegmentationModel):
    """G-FRNet (Islam et al. 2017): VGG16 encoder, gate units and gated refinement units giving
    coarse-to-fine label maps, all supervised.

    No parameter or FLOP figure in the paper (26.69M here for 11 classes).

    Args:
        encoder: "vgg16" (the paper's), "vgg16_bn", or any timm model name (e.g. resnet50).
        encoder_weights: null (from scratch), "imagenet", a weights file or a URL. The paper
            initialises the encoder from ImageNet VGG16.
        max_gate_channels: cap on the gate units' channels (512 leaves VGG16's unchanged).
        aux_weight: weight of each coarser label map's loss (1.0: the paper's equal weights).
    """

    def __init__(
        self,
        encoder: str = "vgg16",
        encoder_weights: str | None = None,
        max_gate_channels: int = 512,
        aux_weight: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(aux_weight=aux_weight, **kwargs)
        self.net = GFRNetNetwork(
            self.num_classes,
            self.in_channels,
            encoder=encoder,
            encoder_weights=encoder_weights,
            max_gate_channels=max_gate_channels,
        )
