"""VGG16 building blocks (Simonyan and Zisserman, ICLR 2015) for the VGG-based architectures
(FCN, SegNet, DeepLab v1/v2, G-FRNet), and bilinear upsampling as a transposed convolution.

- `VGG16`: the 13 convolutions of VGG16 (optionally with BatchNorm, as VGG16-BN) as 5 stages,
  each followed by a max-pooling whose kernel, stride and indices are configurable (FCN: 2x2;
  DeepLab: 3x3 with stride 1 in pool4/pool5 and dilated conv5; SegNet: indices for unpooling).
- `VGGFC`: VGG's fc6/fc7 as convolutions ("convolutionalised" classifier, as in FCN and DeepLab).
- `load_vgg16_weights`: timm's ``vgg16`` / ``vgg16_bn`` weights (``encoder_weights``: null,
  "imagenet", a file or a URL, see `seglight.nn.encoders`) mapped onto these modules; fc6/fc7
  are decimated when smaller (DeepLab's 1024-channel 3x3 fc6 from VGG's 4096-channel 7x7 one).
- `bilinear_kernel` / `BilinearUpsample`: a ConvTranspose2d initialised to bilinear interpolation
  (FCN's in-network upsampling); reusable by any architecture with a learned upsampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from seglight.nn.encoders import EncoderWeightsError, check_weights_file, resolve_encoder_weights

#: VGG16's channels and convolutions per stage (configuration "D" of the paper)
VGG16_CHANNELS = (64, 128, 256, 512, 512)
VGG16_DEPTHS = (2, 2, 3, 3, 3)
#: `encoder` names that select the VGG16 of this module (with timm's weight layout)
VGG16_NAMES = ("vgg16", "vgg16_bn")


def bilinear_kernel(factor: int) -> torch.Tensor:
    """The 2-D bilinear interpolation filter for upsampling by `factor`: [k, k], k = 2f - f % 2.

    As a transposed convolution with stride f and padding f // 2 it maps [h, w] to [f*h, f*w]
    and equals ``F.interpolate(scale_factor=f, mode="bilinear", align_corners=False)`` away from
    the border (where the interpolation replicates the edge and the convolution sees zeros).
    """
    size = 2 * factor - factor % 2
    centre = factor - 1 if size % 2 else factor - 0.5
    ramp = 1 - (torch.arange(size, dtype=torch.float64) - centre).abs() / factor
    return (ramp[:, None] * ramp[None, :]).float()


class BilinearUpsample(nn.ConvTranspose2d):
    """Upsampling by an integer factor with a transposed convolution initialised to bilinear
    interpolation (each channel to itself), as in FCN.

    Args:
        channels: input = output channels.
        factor: upsampling factor.
        trainable: learn the filter (a full channels x channels transposed convolution, FCN's
            intermediate upsampling); if False, a fixed per-channel (depthwise) interpolation:
            its filter is a buffer, not a parameter (FCN's final upsampling), so parameter counts
            and optimisers do not see it.

    Shapes: [B, C, h, w] -> [B, C, factor*h, factor*w], or [B, C, *size] when `size` is given
    (cropped bottom/right, which keeps the top-left alignment; replicate-padded if short).
    """

    def __init__(self, channels: int, factor: int, trainable: bool = True) -> None:
        self.factor = factor
        super().__init__(
            channels,
            channels,
            kernel_size=2 * factor - factor % 2,
            stride=factor,
            padding=factor // 2,
            groups=1 if trainable else channels,
            bias=False,
        )
        if not trainable:  # a constant: kept in the state dict under the same name
            weight = self.weight.detach()
            del self.weight
            self.register_buffer("weight", weight)

    def reset_parameters(self) -> None:
        # called by ConvTranspose2d.__init__: the bilinear filter on the diagonal, zeros elsewhere
        with torch.no_grad():
            self.weight.zero_()
            kernel = bilinear_kernel(self.factor).to(self.weight)
            for c in range(self.out_channels):
                self.weight[c, 0 if self.groups > 1 else c] = kernel

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        x = super().forward(x)
        if size is None:
            return x
        x = x[..., : size[0], : size[1]]
        dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
        if dh or dw:  # an encoder that rounded its sizes down: repeat the edge, not zeros
            x = F.pad(x, (0, dw, 0, dh), mode="replicate")
        return x


class VGGConv(nn.Sequential):
    """3x3 conv (with bias, as in VGG and VGG-BN) -> [BatchNorm] -> ReLU: timm's layer layout."""

    def __init__(
        self, in_channels: int, out_channels: int, batch_norm: bool = False, dilation: int = 1
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation)
        ]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class VGG16(nn.Module):
    """VGG16's 13 convolutions as 5 stages, each followed by a max-pooling.

    Args:
        in_channels: input channels.
        batch_norm: BatchNorm after each convolution (VGG16-BN, timm's ``vgg16_bn``).
        pool_kernel: 2 (VGG: 2x2) or 3 (DeepLab: 3x3 with padding 1).
        pool_strides: stride of each of the 5 poolings.
        dilations: dilation of each stage's convolutions (DeepLab: conv5 dilated by 2).
        return_indices: the poolings also return their argmax indices (for max-unpooling).
        channels: channels of the 5 stages (VGG16's 64, 128, 256, 512, 512); narrower stages for a
            small CPU budget (timm's weights then do not fit).

    Poolings round up (``ceil_mode``, as Caffe does), so no input is too small and every pixel
    is covered. `forward` returns the 5 pooled outputs (pool1..pool5); architectures needing the
    pre-pooling maps or the indices iterate `stages` and `pools` themselves.

    Attributes:
        channels: output channels of each stage (64, 128, 256, 512, 512).
        timm_name: "vgg16" or "vgg16_bn", the timm model whose weights fit.
    """

    def __init__(
        self,
        in_channels: int = 3,
        batch_norm: bool = False,
        pool_kernel: int = 2,
        pool_strides: Sequence[int] = (2, 2, 2, 2, 2),
        dilations: Sequence[int] = (1, 1, 1, 1, 1),
        return_indices: bool = False,
        channels: Sequence[int] = VGG16_CHANNELS,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.channels = list(channels)
        self.timm_name = "vgg16_bn" if batch_norm else "vgg16"
        stages, c_in = [], in_channels
        for c_out, depth, dilation in zip(self.channels, VGG16_DEPTHS, dilations, strict=True):
            stages.append(
                nn.Sequential(
                    *(
                        VGGConv(c_in if i == 0 else c_out, c_out, batch_norm, dilation)
                        for i in range(depth)
                    )
                )
            )
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.pools = nn.ModuleList(
            nn.MaxPool2d(
                pool_kernel,
                stride,
                padding=(pool_kernel - 1) // 2,
                ceil_mode=True,
                return_indices=return_indices,
            )
            for stride in pool_strides
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, in_channels, H, W] -> [pool1, ..., pool5], [B, channels[i], ~H/s_i, ~W/s_i]."""
        pooled = []
        for stage, pool in zip(self.stages, self.pools, strict=True):
            x = pool(stage(x))
            x = x[0] if isinstance(x, tuple) else x
            pooled.append(x)
        return pooled


class VGGFC(nn.Sequential):
    """VGG's fc6 and fc7 as convolutions: k x k conv (dilated) -> ReLU -> Dropout -> 1x1 conv
    -> ReLU -> Dropout. FCN: 7x7, 4096 channels; DeepLab: 3x3 dilated, 1024 channels.

    Shapes: [B, in_channels, h, w] -> [B, channels, h, w] ("same" padding).
    """

    def __init__(
        self,
        in_channels: int = 512,
        channels: int = 4096,
        kernel_size: int = 7,
        dilation: int = 1,
        dropout: float = 0.5,
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                channels,
                kernel_size,
                padding=dilation * (kernel_size - 1) // 2,
                dilation=dilation,
            ),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(channels, channels, 1),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    @property
    def fc6(self) -> nn.Conv2d:
        return self[0]

    @property
    def fc7(self) -> nn.Conv2d:
        return self[3]


def decimate(weight: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Subsample `weight` to `shape` by keeping every k-th entry along each smaller dimension:
    DeepLab's conversion of VGG's fc6 (4096 x 512 x 7 x 7) into 1024 x 512 x 3 x 3 (filters 0, 4,
    8, ...; taps 0, 3, 6) and of fc7 (4096 x 4096) into 1024 x 1024.
    """
    for dim, (src, dst) in enumerate(zip(weight.shape, shape, strict=True)):
        if src == dst:
            continue
        if dst > src:
            raise EncoderWeightsError(
                f"cannot decimate a weight of shape {tuple(weight.shape)} to {tuple(shape)}"
            )
        if dim >= 2:  # spatial taps: keep both ends (or the centre)
            step = (src - 1) // (dst - 1) if dst > 1 else 0
            start = (src - 1 - step * (dst - 1)) // 2
        else:  # filters / input channels
            step, start = src // dst, 0
        index = start + step * torch.arange(dst, device=weight.device)
        weight = weight.index_select(dim, index)
    return weight


def load_vgg16_weights(encoder: VGG16, weights: str | None, fcs: Sequence[VGGFC] = ()) -> None:
    """Load timm's ``vgg16`` / ``vgg16_bn`` weights into `encoder` (and fc6/fc7 into `fcs`).

    Args:
        encoder: the VGG16 to fill; its `timm_name` says which timm model the file must fit.
        weights: null (nothing is loaded), "imagenet", a state-dict file or a URL; the file is
            checked against the timm model first (missing, unexpected or mis-shaped tensors are an
            error that names the file).
        fcs: VGGFC modules that receive timm's ``pre_logits.fc1`` / ``fc2`` (fc6 / fc7), decimated
            to their size if smaller (`decimate`); the ImageNet classifier itself is not used.

    A stem with in_channels != 3 gets the RGB filters adapted by timm's `adapt_input_conv`.
    """
    path = resolve_encoder_weights(encoder.timm_name, weights)
    if path is None:
        return
    check_weights_file(encoder.timm_name, path, encoder.in_channels)
    source = timm.models.load_state_dict(str(path))
    # timm's `features` Sequential lists conv, [bn], relu per layer and one pool per stage, in
    # the same order as our stages: walking both in step gives the key mapping
    state, index = {}, 0
    for s, stage in enumerate(encoder.stages):
        for j, layer in enumerate(stage):
            for k, module in enumerate(layer):
                for name in module.state_dict():
                    state[f"stages.{s}.{j}.{k}.{name}"] = source[f"features.{index}.{name}"]
                index += 1
        index += 1  # the pooling
    stem = "stages.0.0.0.weight"
    if state[stem].shape[1] != encoder.in_channels:
        state[stem] = timm.models.adapt_input_conv(encoder.in_channels, state[stem])
    encoder.load_state_dict(state, strict=True)
    for fc in fcs:
        for target, key in ((fc.fc6, "pre_logits.fc1"), (fc.fc7, "pre_logits.fc2")):
            with torch.no_grad():
                target.weight.copy_(decimate(source[f"{key}.weight"], target.weight.shape))
                target.bias.copy_(decimate(source[f"{key}.bias"], target.bias.shape))
