"""DenseNet's dense block (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017).

Each layer sees the concatenation of the block's input and of every earlier layer's output, and
adds `growth_rate` new feature maps to it. FC-DenseNet builds both of its paths from these.
"""

from __future__ import annotations

import torch
from torch import nn


class DenseLayer(nn.Sequential):
    """BN -> ReLU -> conv ("same" padding) -> dropout: DenseNet's composite function H_l.

    Shapes: [B, in_channels, H, W] -> [B, out_channels, H, W].
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, dropout: float = 0.2
    ) -> None:
        layers: list[nn.Module] = [
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class DenseBlock(nn.Module):
    """`num_layers` 3x3 DenseLayers of `growth_rate` maps, each fed everything before it.

    Shapes: [B, in_channels, H, W] -> [B, in_channels + num_layers * growth_rate, H, W], the input
    first: the block's new feature maps are `out[:, block.in_channels:]`.
    """

    def __init__(
        self, in_channels: int, growth_rate: int, num_layers: int, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels + num_layers * growth_rate
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, dropout=dropout)
            for i in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x
