"""Context modules: the multi-scale blocks that sit between an encoder and a classifier.

Every context module maps the encoder's deepest features [B, in_channels, h, w] to
[B, out_channels, h, w] (same h, w, any size, odd included), so one can replace another on the
same encoder (DeepLab's ``context`` option):

- ``ASPP`` (DeepLabv3, Chen et al. 2017, Sec. 3.3): a 1x1 branch, one 3x3 branch per atrous rate,
  an image-pooling branch, concatenated and projected by a 1x1 conv;
- ``KernelSharingASPP`` (KSAC, Huang et al. 2019): the same, with ONE 3x3 kernel shared by all
  rates, so adding a rate adds no 3x3 kernel;
- ``PyramidPooling`` (PSPNet, Zhao et al. 2017, Sec. 3.3): average pooling to 1x1, 2x2, 3x3 and
  6x6 bins, a 1x1 conv to in_channels / len(bins) per bin, upsampling, concatenation with the
  features, and PSPNet's 3x3 fusion conv;
- ``"none"`` in ``build_context``: a 1x1 conv-BN-ReLU projection, the no-context baseline.

Batch size 1 in training: a pooling branch pooled to 1x1 has a single value per channel, from
which BatchNorm cannot compute batch statistics (PyTorch raises "Expected more than 1 value per
channel"). `PoolingBranch` then normalises with its running statistics (as in eval) and leaves
them unchanged; everything else trains normally. In eval mode batch size 1 is always fine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from seglight.errors import ConfigError
from seglight.nn.blocks import ConvNormAct, resize_to

ContextKind = Literal["aspp", "ksac", "ppm", "none"]
CONTEXTS: tuple[str, ...] = ("aspp", "ksac", "ppm", "none")


class SeparableConv2d(nn.Sequential):
    """Depthwise-separable convolution as in DeepLabv3+'s Xception variant: a (dilated) depthwise
    kxk conv -> BN -> ReLU, then a pointwise 1x1 conv -> BN -> ReLU.

    Parameters: in*k*k + in*out (+ BN) instead of in*out*k*k for a ConvNormAct.
    Shapes: [B, in_channels, H, W] -> [B, out_channels, H, W].
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1
    ) -> None:
        super().__init__(
            ConvNormAct(
                in_channels, in_channels, kernel_size, dilation=dilation, groups=in_channels
            ),
            ConvNormAct(in_channels, out_channels, 1),
        )


def conv3x3(
    in_channels: int, out_channels: int, dilation: int = 1, separable: bool = False
) -> nn.Module:
    """3x3 conv-BN-ReLU ("same" padding), depthwise-separable when `separable`."""
    if separable:
        return SeparableConv2d(in_channels, out_channels, 3, dilation)
    return ConvNormAct(in_channels, out_channels, 3, dilation=dilation)


class PoolingBranch(nn.Module):
    """Adaptive average pooling to `bins` x `bins`, 1x1 conv -> BN -> ReLU, bilinear upsampling
    back to the input's size: ASPP's image-level branch (bins=1) and one PSPNet pyramid level.

    Shapes: [B, in_channels, h, w] -> [B, out_channels, h, w].
    With a single value per channel (batch 1, bins 1) in training, BN uses its running statistics
    and does not update them (see the module docstring).
    """

    def __init__(self, in_channels: int, out_channels: int, bins: int = 1) -> None:
        super().__init__()
        self.bins = bins
        self.pool = nn.AdaptiveAvgPool2d(bins)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = norm_pooled(self.norm, self.conv(self.pool(x)))
        return resize_to(self.act(y), tuple(x.shape[-2:]))


def norm_pooled(norm: nn.BatchNorm2d, y: torch.Tensor, min_values: int = 2) -> torch.Tensor:
    """`norm(y)`, except in training with fewer than `min_values` values per channel (batch 1 and a
    1x1 pooled map: batch statistics are undefined), then normalise with the running statistics,
    as in eval, and leave them unchanged. (`min_values=3` also covers two values, which batch
    statistics turn into -1/+1, or 0/0 when equal, whatever they were.)"""
    if norm.training and y.shape[0] * y.shape[2] * y.shape[3] < min_values:
        n = norm
        return F.batch_norm(y, n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps)
    return norm(y)


class SharedAtrousConv(nn.Module):
    """KSAC's kernel-sharing atrous convolution: one 3x3 kernel [out, in, 3, 3] applied at every
    rate, each result with its own BN -> ReLU (the rates' outputs have different statistics).

    Adding a rate adds a BatchNorm (2 * out_channels parameters), never a kernel.
    Shapes: [B, in_channels, h, w] -> list of len(rates) tensors [B, out_channels, h, w].
    """

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.rates = tuple(rates)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.norms = nn.ModuleList(nn.BatchNorm2d(out_channels) for _ in self.rates)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [
            self.act(norm(F.conv2d(x, self.weight, padding=rate, dilation=rate)))
            for rate, norm in zip(self.rates, self.norms, strict=True)
        ]


class SeparateAtrousConvs(nn.ModuleList):
    """ASPP's atrous branches: one 3x3 conv-BN-ReLU per rate, each with its own kernel.

    Shapes: [B, in_channels, h, w] -> list of len(rates) tensors [B, out_channels, h, w].
    """

    def __init__(
        self, in_channels: int, out_channels: int, rates: Sequence[int], separable: bool = False
    ) -> None:
        super().__init__(conv3x3(in_channels, out_channels, r, separable) for r in rates)
        self.rates = tuple(rates)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [branch(x) for branch in self]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with image-level features (DeepLabv3, Sec. 3.3).

    Branches, each conv followed by BN and ReLU and `out_channels` wide: a 1x1 conv, one 3x3 conv
    per atrous rate (6, 12, 18 at output stride 16; DeepLab doubles them at output stride 8), and
    image pooling (global average -> 1x1 conv -> upsample). They are concatenated and projected by
    a 1x1 conv-BN-ReLU to `out_channels`.

    Args:
        in_channels: channels of the encoder features.
        out_channels: channels of every branch and of the output (256 in the paper).
        rates: atrous rates of the 3x3 branches, as applied (already scaled to the output stride).
        separable: depthwise-separable 3x3 branches (DeepLabv3+ with Xception).
        share_kernel: one 3x3 kernel for all rates (KSAC); see `KernelSharingASPP`.

    Shapes: [B, in_channels, h, w] -> [B, out_channels, h, w].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        separable: bool = False,
        share_kernel: bool = False,
    ) -> None:
        super().__init__()
        rates = tuple(int(r) for r in rates)
        if not rates or min(rates) < 1:
            raise ConfigError(
                f"atrous rates must be a non-empty list of integers >= 1, got {rates}"
            )
        if share_kernel and separable:
            raise ConfigError(
                "the kernel-sharing ASPP (KSAC) shares a full 3x3 kernel; separable=True applies "
                "to ASPP only"
            )
        self.rates = rates
        self.conv1x1 = ConvNormAct(in_channels, out_channels, 1)
        self.atrous: nn.Module = (
            SharedAtrousConv(in_channels, out_channels, rates)
            if share_kernel
            else SeparateAtrousConvs(in_channels, out_channels, rates, separable)
        )
        self.pooling = PoolingBranch(in_channels, out_channels, bins=1)
        self.project = ConvNormAct((len(rates) + 2) * out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.conv1x1(x), *self.atrous(x), self.pooling(x)]
        return self.project(torch.cat(branches, dim=1))


class KernelSharingASPP(ASPP):
    """KSAC (Huang et al. 2019, "See More Than Once"): ASPP whose atrous branches share ONE 3x3
    kernel ("a single kernel sees the input more than once with different receptive fields"),
    plus the 1x1 and image-pooling branches, concatenated and projected like ASPP's.

    Parameters: the 3x3 kernel is in*out*9 whatever the number of rates; each extra rate adds only
    its BatchNorm (2*out) and its slice of the projection (out*out), against in*out*9 more for
    ASPP (9.4M fewer parameters than ASPP for 3 rates on 2048 channels: the paper's "about 10M
    parameters saved" with Xception).

    Shapes: [B, in_channels, h, w] -> [B, out_channels, h, w].
    """

    def __init__(
        self, in_channels: int, out_channels: int = 256, rates: Sequence[int] = (6, 12, 18)
    ) -> None:
        super().__init__(in_channels, out_channels, rates, share_kernel=True)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module (Zhao et al. 2017, Sec. 3.3, Fig. 3) and its fusion conv.

    For each bin size N in `bins` (1, 2, 3, 6): average-pool to N x N, 1x1 conv to
    `branch_channels` (default in_channels / len(bins), PSPNet's), BN, ReLU, bilinear upsampling
    to h x w. The pooled maps are concatenated with the features (2 * in_channels channels for 4
    bins) and fused by a 3x3 conv-BN-ReLU to `out_channels` (512 in PSPNet). UPerNet's PPM is the
    same with `branch_channels` = `out_channels` (512).

    Shapes: [B, in_channels, h, w] -> [B, out_channels, h, w].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 512,
        bins: Sequence[int] = (1, 2, 3, 6),
        separable: bool = False,
        branch_channels: int | None = None,
    ) -> None:
        super().__init__()
        bins = tuple(int(b) for b in bins)
        if not bins or min(bins) < 1:
            raise ConfigError(f"pyramid pooling bins must be integers >= 1, got {bins}")
        self.bins = bins
        reduced = branch_channels or in_channels // len(bins)
        self.stages = nn.ModuleList(PoolingBranch(in_channels, reduced, b) for b in bins)
        self.bottleneck = conv3x3(in_channels + reduced * len(bins), out_channels, 1, separable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *(stage(x) for stage in self.stages)], dim=1))


def build_context(
    kind: str,
    in_channels: int,
    out_channels: int = 256,
    rates: Sequence[int] = (6, 12, 18),
    separable: bool = False,
) -> nn.Module:
    """A context module by name: "aspp", "ksac", "ppm" (bins 1/2/3/6) or "none" (1x1 conv-BN-ReLU).

    All map [B, in_channels, h, w] -> [B, out_channels, h, w]. `rates` (as applied) are used by
    aspp and ksac; `separable` by aspp and ppm (KSAC shares a full 3x3 kernel, as in its paper).
    """
    if kind == "aspp":
        return ASPP(in_channels, out_channels, rates, separable)
    if kind == "ksac":
        return KernelSharingASPP(in_channels, out_channels, rates)
    if kind == "ppm":
        return PyramidPooling(in_channels, out_channels, separable=separable)
    if kind == "none":
        return ConvNormAct(in_channels, out_channels, 1)
    raise ConfigError(f"context must be one of {', '.join(CONTEXTS)}; got {kind!r}")
