"""Small building blocks shared by the architectures.

Every architecture file imports from here instead of re-writing the same conv-norm-act stack,
so a fix (or a faster kernel) lands everywhere at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvNormAct(nn.Sequential):
    """Conv2d -> BatchNorm2d -> ReLU, with "same" padding for odd kernels.

    The conv has no bias when a norm follows (the norm's shift makes it redundant).
    Shapes: [B, in_channels, H, W] -> [B, out_channels, H / stride, W / stride].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        norm: bool = True,
        act: bool = True,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=not norm,
            )
        ]
        if norm:
            layers.append(nn.BatchNorm2d(out_channels))
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class FCNHead(nn.Sequential):
    """The common segmentation/auxiliary head: `convs` 3x3 conv-BN-ReLU to `channels`, dropout,
    1x1 classifier (mmsegmentation's FCNHead; UPerNet's auxiliary head, BiSeNetV2's heads).

    Shapes: [B, in_channels, h, w] -> [B, num_classes, h, w].
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        convs: int = 1,
        dropout: float = 0.1,
    ) -> None:
        layers = [ConvNormAct(in_channels if i == 0 else channels, channels) for i in range(convs)]
        super().__init__(*layers, nn.Dropout2d(dropout), classifier_conv(channels, num_classes))


class DoubleConv(nn.Sequential):
    """Two 3x3 ConvNormAct: the basic block of U-Net's encoder and decoder."""

    def __init__(self, in_channels: int, out_channels: int, norm: bool = True) -> None:
        super().__init__(
            ConvNormAct(in_channels, out_channels, norm=norm),
            ConvNormAct(out_channels, out_channels, norm=norm),
        )


def pad_or_crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad (bottom/right) or crop `x` [B,C,h,w] to spatial `size` (H, W).

    Used after a stride-2 transposed convolution, whose output is one pixel short of an
    odd-sized skip connection; padding keeps the learned upsampling exact elsewhere.
    """
    dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if dh == 0 and dw == 0:
        return x
    return F.pad(x, (0, dw, 0, dh))  # negative pads crop


def resize_to(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize `x` [B,C,h,w] to spatial `size`; a no-op when it already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad `x` [B,C,H,W] at the bottom/right so that H and W divide by `multiple`; the
    network crops its logits back with `x[..., :H, :W]` (for encoders that need such sizes:
    ViT patches, Swin windows, HRNet's exact upsampling; see TimmEncoder.input_multiple)."""
    h, w = x.shape[-2:]
    dh, dw = -h % multiple, -w % multiple
    return F.pad(x, (0, dw, 0, dh)) if dh or dw else x


def unpad(logits: torch.Tensor, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Logits [B,K,h,w] of an input zero-padded to `padded` (pad_to_multiple) resized to `padded`
    and cropped to the unpadded input's `size`: every pixel keeps its own prediction."""
    return resize_to(logits, tuple(padded))[..., : size[0], : size[1]]


def init_weights(module: nn.Module, mode: str = "fan_out", uniform: bool = False) -> None:
    """He (Kaiming) convs for ReLU, unit norms, zero biases: the usual from-scratch init.

    Args:
        module: every Conv2d / ConvTranspose2d / BatchNorm2d / GroupNorm inside it is reset.
        mode: "fan_out" (torchvision's ResNets) or "fan_in" (He et al.'s derivation for the
            forward pass; Caffe's "msra" filler and Keras' HeUniform): fan-out on a layer with
            few outputs (e.g. a 16-channel dense layer after hundreds of inputs) inflates the
            activations by sqrt(fan_in / fan_out).
        uniform: He-uniform instead of He-normal (the same variance).
    """
    init = nn.init.kaiming_uniform_ if uniform else nn.init.kaiming_normal_
    for m in module.modules():
        if getattr(m, "is_classifier", False):  # made by classifier_conv: logits start small
            init_classifier(m)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            init(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def classifier_conv(in_channels: int, num_classes: int, kernel_size: int = 1) -> nn.Conv2d:
    """The convolution producing the logits [B, num_classes, h, w]. It is marked, so that
    `init_weights` over a whole network gives it `init_classifier`'s init (not He's), whatever
    order a model initialises its parts in."""
    conv = nn.Conv2d(in_channels, num_classes, kernel_size, padding=kernel_size // 2)
    conv.is_classifier = True
    return conv


def init_classifier(conv: nn.Conv2d | nn.ConvTranspose2d, std: float | None = None) -> None:
    """A classifier (the convolution producing the logits): PyTorch's default init (uniform,
    std = 1 / sqrt(3 fan_in), i.e. gain 1/3 of He's variance), or N(0, std) with zero bias when
    `std` is given (FCN's and DeepLab's prototxts: 0.01). Either way the logits start small and
    the initial loss near ln(num_classes), whatever the features' scale; a ReLU-gain He init
    there gave logits of std ~2-20 and an initial loss of 4-30."""
    if std is None:
        conv.reset_parameters()
        return
    nn.init.normal_(conv.weight, 0.0, std)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
