"""FC-DenseNet, "The One Hundred Layers Tiramisu" (Jégou, Drozdzal, Vazquez, Romero and Bengio,
CVPR Workshops 2017, "The One Hundred Layers Tiramisu: Fully Convolutional DenseNets for Semantic
Segmentation").

One network class, :class:`FCDenseNetNetwork`, and the paper's three variants (its Table 3):

- ``FCDenseNet56``: 4 layers per dense block, growth rate k=12;
- ``FCDenseNet67``: 5 layers per dense block, k=16;
- ``FCDenseNet103``: 4, 5, 7, 10, 12 / 15 / 12, 10, 7, 5, 4 layers, k=16 (the paper's Table 2).

The building blocks follow Table 1: a layer is BN-ReLU-3x3 conv-dropout(0.2); transition down is
BN-ReLU-1x1 conv-dropout(0.2)-2x2 max-pool; transition up is a 3x3 transposed conv of stride 2.
The network (Table 2, Fig. 1): a 3x3 conv to 48 channels; 5 dense blocks, each followed by a
transition down, whose outputs (the whole stack) are the skip connections; a bottleneck dense
block; 5 (transition up, concatenation with the skip, dense block). On the upsampling path only
the *new* feature maps of each dense block (not its input) are upsampled, so that the width
does not keep growing towards full resolution (the paper's Sec. 3.2); the last block's whole
stack goes to a 1x1 conv to the classes.
The layer count in the names counts every convolution: 103 = 1 + 91 dense layers + 5 TD + 5 TU + 1.

Parameters for 11 classes (the paper's CamVid), against its Table 3: FCDenseNet56 1.38M (paper
1.5M, 8% under), FCDenseNet67 3.46M (3.5M), FCDenseNet103 9.32M (9.4M). The authors' Lasagne code
(github.com/SimJeg/FC-DenseNet) counts BatchNorm's running mean and inverse std as parameters too
(its summary sums get_all_param_values); counted that way the networks have 1.40M, 3.50M and
9.43M, which matches Table 3 for 67 and 103; the rest of 56's gap to "1.5M" is not explained by
the paper or the code. Convs keep their biases, as in the authors' code, whose TransitionUp and
transition-down widths this follows where the paper's Table 2 is ambiguous.

Any input size works: the max-pools round up (``ceil_mode``), so no input is too small for five
of them, and each transposed conv's output (2n + 1 pixels) is cropped to its skip's size.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from seglight.errors import ConfigError
from seglight.models.base import SegmentationModel
from seglight.nn import DenseBlock, DenseLayer, init_classifier, init_weights, pad_or_crop_to

FCDENSENET103_LAYERS = [4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4]


class TransitionDown(nn.Sequential):
    """BN-ReLU-1x1 conv-dropout, then 2x2 max-pool: [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__(
            DenseLayer(channels, channels, kernel_size=1, dropout=dropout),
            nn.MaxPool2d(2, ceil_mode=True),
        )


class TransitionUp(nn.Module):
    """3x3 transposed conv of stride 2 (no padding, as the authors'), cropped to the skip's size,
    then concatenated with the skip: [B, C, h, w], [B, S, H, W] -> [B, C + S, H, W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(channels, channels, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = pad_or_crop_to(self.conv(x), tuple(skip.shape[-2:]))
        return torch.cat([x, skip], dim=1)


class FCDenseNetNetwork(nn.Module):
    """FC-DenseNet as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W].

    Args:
        num_classes: output classes.
        in_channels: input channels.
        growth_rate: k, the feature maps each dense layer adds.
        layers_per_block: layers of each dense block: a list of 2 * P + 1 entries (P down blocks,
            the bottleneck, P up blocks, for P poolings), or one number for 5 poolings.
        first_channels: channels of the first 3x3 conv (48 in the paper).
        dropout: dropout after every conv of the dense layers and transitions down.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        growth_rate: int = 16,
        layers_per_block: int | list[int] = FCDENSENET103_LAYERS,
        first_channels: int = 48,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        layers = [layers_per_block] * 11 if isinstance(layers_per_block, int) else layers_per_block
        layers = list(layers)
        if len(layers) % 2 == 0 or len(layers) < 3 or min(layers) < 1:
            raise ConfigError(
                "layers_per_block must be a positive number, or a list of 2 * P + 1 positive "
                f"numbers (P down blocks, the bottleneck, P up blocks), got {layers_per_block}"
            )
        if growth_rate < 1 or first_channels < 1:
            raise ConfigError(
                f"growth_rate and first_channels must be >= 1, got {growth_rate}, {first_channels}"
            )
        pools = len(layers) // 2
        self.first_conv = nn.Conv2d(in_channels, first_channels, kernel_size=3, padding=1)

        self.down_blocks, self.transitions_down = nn.ModuleList(), nn.ModuleList()
        channels, skip_channels = first_channels, []
        for n in layers[:pools]:
            block = DenseBlock(channels, growth_rate, n, dropout)
            channels = block.out_channels
            skip_channels.append(channels)
            self.down_blocks.append(block)
            self.transitions_down.append(TransitionDown(channels, dropout))
        self.bottleneck = DenseBlock(channels, growth_rate, layers[pools], dropout)

        self.transitions_up, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        new_channels = layers[pools] * growth_rate
        for n, skip in zip(layers[pools + 1 :], reversed(skip_channels), strict=True):
            self.transitions_up.append(TransitionUp(new_channels))
            block = DenseBlock(new_channels + skip, growth_rate, n, dropout)
            self.up_blocks.append(block)
            new_channels = n * growth_rate
        self.head = nn.Conv2d(block.out_channels, num_classes, kernel_size=1)
        # He-uniform, fan-in (HeUniform, as the authors' Lasagne code): fan-out on the 16-channel
        # dense layers after hundreds of inputs made the initial logits' std ~22
        init_weights(self, mode="fan_in", uniform=True)
        init_classifier(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first_conv(x)
        skips = []
        for block, down in zip(self.down_blocks, self.transitions_down, strict=True):
            x = block(x)
            skips.append(x)
            x = down(x)
        previous = self.bottleneck
        x = previous(x)
        for up, block, skip in zip(
            self.transitions_up, self.up_blocks, reversed(skips), strict=True
        ):
            # only the previous block's new feature maps are upsampled (the paper's Fig. 1)
            x = block(up(x[:, previous.in_channels :], skip))
            previous = block
        return self.head(x)


class FCDenseNet:
    """The options and the build shared by the FC-DenseNet variants (a mixin, not a
    SegmentationModel itself, so that only the paper's three variants are registered).

    Args:
        growth_rate: k, the feature maps each dense layer adds.
        layers_per_block: layers of each dense block: one number (5 poolings), or a list of
            2 * P + 1 numbers for P down blocks, the bottleneck and P up blocks.
        first_channels: channels of the first 3x3 conv (48 in the paper).
        dropout: dropout after each conv of the dense layers and transitions down (0.2).
    """

    def __init__(
        self,
        growth_rate: int,
        layers_per_block: int | list[int],
        first_channels: int = 48,
        dropout: float = 0.2,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = FCDenseNetNetwork(
            self.num_classes,
            self.in_channels,
            growth_rate=growth_rate,
            layers_per_block=layers_per_block,
            first_channels=first_channels,
            dropout=dropout,
        )


class FCDenseNet56(FCDenseNet, SegmentationModel):
    """FC-DenseNet56 (Jégou et al. 2017): 4 layers per dense block, growth rate 12.

    paper_params: Table 3 (CamVid, 11 classes); the paper gives no FLOPs.

    Args:
        growth_rate: k, the feature maps each dense layer adds (12).
        layers_per_block: layers of every dense block (4), or a list of 2 * P + 1 numbers.
    """

    paper_params: ClassVar[float | None] = 1.5

    def __init__(self, growth_rate: int = 12, layers_per_block: int | list[int] = 4, **kwargs):
        super().__init__(growth_rate=growth_rate, layers_per_block=layers_per_block, **kwargs)


class FCDenseNet67(FCDenseNet, SegmentationModel):
    """FC-DenseNet67 (Jégou et al. 2017): 5 layers per dense block, growth rate 16.

    paper_params: Table 3 (CamVid, 11 classes); the paper gives no FLOPs.

    Args:
        growth_rate: k, the feature maps each dense layer adds (16).
        layers_per_block: layers of every dense block (5), or a list of 2 * P + 1 numbers.
    """

    paper_params: ClassVar[float | None] = 3.5

    def __init__(self, growth_rate: int = 16, layers_per_block: int | list[int] = 5, **kwargs):
        super().__init__(growth_rate=growth_rate, layers_per_block=layers_per_block, **kwargs)


class FCDenseNet103(FCDenseNet, SegmentationModel):
    """FC-DenseNet103 (Jégou et al. 2017): the Tiramisu of Table 2, growth rate 16.

    paper_params: Table 3 (CamVid, 11 classes); the paper gives no FLOPs.

    Args:
        growth_rate: k, the feature maps each dense layer adds (16).
        layers_per_block: layers of each dense block, [4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4].
    """

    paper_params: ClassVar[float | None] = 9.4

    def __init__(
        self,
        growth_rate: int = 16,
        layers_per_block: int | list[int] = FCDENSENET103_LAYERS,
        **kwargs,
    ):
        super().__init__(growth_rate=growth_rate, layers_per_block=layers_per_block, **kwargs)
