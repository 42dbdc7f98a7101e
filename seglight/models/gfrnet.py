"""G-FRNet (Islam, Rochan, Bruce and Wang, CVPR 2017, "Gated Feedback Refinement Network for
Dense Image Labeling"), as in the authors' released CamVid model (mrochan/gfrnet,
models/camvid/train_camvid_gate.prototxt), which settles what the paper's Sec. 3 and figure
leave open:

- encoder: VGG16 with BatchNorm after every convolution, and dropout 0.5 after pool3, pool4 and
  pool5; its maps f1..f6 are conv1_2, conv2_2, conv3_3, conv4_3, conv5_3 and pool5 (strides 1 to
  32);
- conv6 and conv7: two 3x3 convolutions to 1024 channels after pool5, each with BN, ReLU and
  dropout 0.5; the coarse label map P_G (stride 32) is a 3x3 convolution of conv7;
- gate units, from deep to shallow: the shallower map f_i goes through a 3x3 convolution
  straight to one channel per class and BN; the deeper input is the previous gate's such
  branch (for the first gate, a 3x3 convolution of pool5 to the class count, without BN),
  upsampled bilinearly to f_i's size; the two are multiplied element-wise and normalised (BN):
  the deeper, more discriminative features gate which shallow details pass;
- gated refinement units: the gate's output concatenated with the previous label map upsampled
  to its size, and a 3x3 convolution to the refined label map (stride 16, 8, 4, 2, 1).

Every label map is supervised, each upsampled to the labels' size with equal loss weights (as the
released prototxt does; hence ``aux_weight: 1.0``). Weights are initialised as the prototxt's
"msra" fillers (He, fan-in), biases zero, except the six convolutions that produce label maps:
PyTorch's default (seglight's classifier init, so that training starts at a loss near
ln(classes); with the msra filler it starts ~35% higher).

conv6 and conv7 are padded ("same", ``pad: 1`` in both released prototxts), so the coarse map
keeps pool5's size. Parameters: for 11 classes 29,194,090, the released model's count exactly
(VGG16-BN 14.73M, conv6/conv7 14.16M, gates and refinement units 0.30M; the paper gives no
count).

The released training weights the classes in all six losses by median frequency (SegNet's
published CamVid weights); ``experiments/gfrnet.yaml`` sets them (``class_weights``).

``encoder: vgg16`` drops the encoder's BatchNorm (the paper's plain VGG16: ImageNet weights for
it are the paper's initialisation). ``encoder: <timm model>`` (e.g. resnet50): its feature
pyramid replaces f1..f6, without the encoder dropout (usually strides 2..32; the final map is
then upsampled to the input size).
"""

from __future__ import annotations

import torch
from torch import nn

from seglight.models.base import SegmentationModel
from seglight.nn import TimmEncoder, init_classifier, init_weights, resize_to
from seglight.nn.vgg import VGG16, VGG16_NAMES, VGGConv, load_vgg16_weights

#: the released encoder's dropout after pool3, pool4 and pool5 (0-based stage indices)
ENCODER_DROPOUT_AFTER = (2, 3, 4)


def conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv (with bias, as Caffe's) -> BN: [B, in, h, w] -> [B, out, h, w]."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels)
    )


class GateUnit(nn.Module):
    """Shallow map [B, C_i, h, w] and the deeper gate branch [B, K, h', w'] -> (gated features
    [B, K, h, w], this gate's branch [B, K, h, w] for the next, shallower gate)."""

    def __init__(self, shallow_channels: int, num_classes: int) -> None:
        super().__init__()
        self.shallow = conv_bn(shallow_channels, num_classes)
        self.norm = nn.BatchNorm2d(num_classes)

    def forward(
        self, shallow: torch.Tensor, deep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        branch = self.shallow(shallow)
        return self.norm(branch * resize_to(deep, branch.shape[-2:])), branch


class GFRNetNetwork(nn.Module):
    """G-FRNet as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W]; in
    training ``{"out": logits, "aux": [coarsest, ..., second finest label map]}``.

    Args:
        num_classes: output classes.
        in_channels: input channels.
        encoder: "vgg16_bn" (the released model's), "vgg16", or any timm model name.
        encoder_weights: null, "imagenet", a file or a URL.
        dropout: the dropout of the encoder (after pool3-5) and of conv6/conv7 (0.5 released).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str = "vgg16_bn",
        encoder_weights: str | None = None,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if encoder in VGG16_NAMES:
            self.encoder = VGG16(in_channels, batch_norm=encoder == "vgg16_bn")
            init_weights(self.encoder, mode="fan_in")
            load_vgg16_weights(self.encoder, encoder_weights)
            channels = [*self.encoder.channels, self.encoder.channels[-1]]  # + pool5
        else:
            self.encoder = TimmEncoder(encoder, encoder_weights, in_channels)
            channels = self.encoder.channels
        self.encoder_dropout = nn.Dropout(dropout)
        self.fc = nn.Sequential(
            VGGConv(channels[-1], 1024, batch_norm=True),
            nn.Dropout(dropout),
            VGGConv(1024, 1024, batch_norm=True),
            nn.Dropout(dropout),
        )
        self.coarse = nn.Conv2d(1024, num_classes, 3, padding=1)
        self.deepest = nn.Conv2d(channels[-1], num_classes, 3, padding=1)  # the first gate's
        # deep to shallow: gate i refines with feature i (channels[-2], ..., channels[0])
        self.gates = nn.ModuleList(GateUnit(c, num_classes) for c in reversed(channels[:-1]))
        self.refinements = nn.ModuleList(
            nn.Conv2d(2 * num_classes, num_classes, 3, padding=1) for _ in self.gates
        )
        for module in (self.fc, self.deepest, self.gates):
            init_weights(module, mode="fan_in")  # the prototxt's "msra" filler
        for conv in (self.coarse, *self.refinements):  # the label maps (see the docstring)
            init_classifier(conv)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder maps, shallow to deep (VGG16: conv1_2, ..., conv5_3, pool5 after dropout)."""
        if not isinstance(self.encoder, VGG16):
            return self.encoder(x)
        features = []
        for i, (stage, pool) in enumerate(
            zip(self.encoder.stages, self.encoder.pools, strict=True)
        ):
            x = stage(x)
            features.append(x)
            x = pool(x)
            if i in ENCODER_DROPOUT_AFTER:
                x = self.encoder_dropout(x)
        return [*features, x]

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict:
        size = x.shape[-2:]
        features = self.features(x)
        labels = [self.coarse(self.fc(features[-1]))]
        deep = self.deepest(features[-1])
        for shallow, gate, refine in zip(
            reversed(features[:-1]), self.gates, self.refinements, strict=True
        ):
            gated, deep = gate(shallow, deep)
            coarser = resize_to(labels[-1], gated.shape[-2:])
            labels.append(refine(torch.cat([gated, coarser], dim=1)))
        out = resize_to(labels[-1], size)
        if self.training:
            return {"out": out, "aux": labels[:-1]}
        return out


class GFRNet(SegmentationModel):
    """G-FRNet (Islam et al. 2017): VGG16-BN encoder, conv6/conv7, gate units and gated
    refinement units giving coarse-to-fine label maps, all supervised (the released CamVid model).

    Parameters for 11 classes: 29,194,090, as the released train_camvid_gate.prototxt; the paper
    gives no parameter or FLOP figure.

    Args:
        encoder: "vgg16_bn" (the released model's), "vgg16" (the paper's text), or any timm
            model name (e.g. resnet50).
        encoder_weights: null (from scratch), "imagenet", a weights file or a URL. The authors
            initialise the encoder from ImageNet VGG16.
        dropout: dropout after pool3-5 and after conv6/conv7 (0.5, the released model's).
        aux_weight: weight of each coarser label map's loss (1.0: the released equal weights).
    """

    def __init__(
        self,
        encoder: str = "vgg16_bn",
        encoder_weights: str | None = None,
        dropout: float = 0.5,
        aux_weight: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(aux_weight=aux_weight, **kwargs)
        self.net = GFRNetNetwork(
            self.num_classes,
            self.in_channels,
            encoder=encoder,
            encoder_weights=encoder_weights,
            dropout=dropout,
        )
