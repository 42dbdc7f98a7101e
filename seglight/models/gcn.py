"""GCN (Peng, Zhang, Yu, Luo and Sun, CVPR 2017, "Large Kernel Matters -- Improve Semantic
Segmentation by Global Convolutional Network"): the network of the paper's Fig. 2.

- A ResNet encoder's four stages (res-2..res-5, strides 4..32) each feed a Global Convolutional
  Network block (Fig. 2(b)): a k x k receptive field made of two separable branches,
  (k x 1 then 1 x k) + (1 x k then k x 1), summed, with no nonlinearity inside (Sec. 3.1), that
  outputs a score map with one channel per class. k = 15 (`kernel_size`), the paper's best
  (Table 1).
- Each score map goes through a Boundary Refinement block (Fig. 2(c)): x + conv3x3(relu(conv3x3(x))).
- From the deepest, score maps are upsampled x2 by a transposed convolution ("Deconv" in Fig. 2;
  kernel 4, stride 2, initialised to bilinear interpolation, learned) and summed with the next
  shallower one, each sum followed by a BR; the stride-4 result goes through two more
  (Deconv, BR) steps to the input resolution. ``upsampling: bilinear`` uses fixed bilinear
  interpolation instead (many re-implementations do).
Every upsampled map is cropped to the exact size of the map it is added to, so any input size
works without a final resize.

The paper uses an ImageNet-pretrained ResNet-152; the default here is ResNet-50 (the backbone of
the paper's ResNet-GCN study, Sec. 4.2), which builds in a fraction of a second on a CPU;
``encoder: resnet152`` gives the paper's network. The paper gives no parameter or FLOP count for
the whole network. The decoder is small because it works on score maps: with bias, a GCN block has
2 k C (C_in + C) + 4 C parameters for C classes. For 11 classes the decoder has 1.31M parameters
(0.68M in the res-5 GCN block) and the encoder the rest: 24.8M in all on ResNet-50, 59.5M on
ResNet-152.

The decoder keeps PyTorch's default conv init: Kaiming fan-out init, computed from the 11-channel
outputs of convolutions with 2048 x 15 inputs, makes the initial logits ~50 times larger.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from seglight.errors import ConfigError
from seglight.models.base import SegmentationModel
from seglight.nn import TimmEncoder, bilinear_kernel

GCNUpsampling = Literal["transpose", "bilinear"]


class GlobalConvBlock(nn.Module):
    """GCN block (Fig. 2(b)): conv_1xk(conv_kx1(x)) + conv_kx1(conv_1xk(x)), no nonlinearity.

    A dense k x k receptive field for O(k) instead of O(k^2) weights per channel pair.
    Shapes: [B, in_channels, H, W] -> [B, out_channels, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 15):
        super().__init__()
        k, p = kernel_size, kernel_size // 2
        self.left = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, (k, 1), padding=(p, 0)),
            nn.Conv2d(out_channels, out_channels, (1, k), padding=(0, p)),
        )
        self.right = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, (1, k), padding=(0, p)),
            nn.Conv2d(out_channels, out_channels, (k, 1), padding=(p, 0)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(x) + self.right(x)


class BoundaryRefinement(nn.Module):
    """BR block (Fig. 2(c)): x + conv3x3(relu(conv3x3(x))). [B, C, H, W] -> same."""

    def __init__(self, channels: int):
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)


def bilinear_deconv(channels: int) -> nn.ConvTranspose2d:
    """x2 transposed conv whose initial weights are bilinear interpolation of each channel (as in
    FCN). Kernel 4, stride 2, padding 1 give exactly twice the input; output_padding adds one more
    row and column, always cropped away (see GCNNetwork._upsample), which seglight.nn's
    BilinearUpsample does not offer."""
    deconv = nn.ConvTranspose2d(
        channels, channels, 4, stride=2, padding=1, output_padding=1, bias=False
    )
    with torch.no_grad():
        deconv.weight.zero_()
        deconv.weight[range(channels), range(channels)] = bilinear_kernel(2)
    return deconv


class GCNNetwork(nn.Module):
    """GCN as a plain nn.Module: [B, in_channels, H, W] -> logits [B, num_classes, H, W].

    Args:
        num_classes: output classes (the width of every score map).
        in_channels: input channels.
        encoder: a timm model name; its four deepest feature maps (strides 4..32 for a ResNet)
            feed the GCN blocks.
        encoder_weights: null, "imagenet", a file or a URL (seglight.nn.encoders).
        kernel_size: k of the k x 1 / 1 x k convolutions (odd; paper: 15).
        upsampling: "transpose" (learned, bilinear-initialised; the paper's Deconv) or "bilinear".
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str = "resnet50",
        encoder_weights: str | None = None,
        kernel_size: int = 15,
        upsampling: GCNUpsampling = "transpose",
    ):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if upsampling not in ("transpose", "bilinear"):
            raise ConfigError(f"upsampling must be 'transpose' or 'bilinear', got {upsampling!r}")
        self.encoder = TimmEncoder(encoder, encoder_weights, in_channels)
        reductions = self.encoder.reductions[-4:]
        if len(reductions) < 4 or reductions != [reductions[0] * 2**i for i in range(4)]:
            raise ConfigError(
                f"GCN needs an encoder with 4 feature levels that each halve the resolution; "
                f"{encoder!r} has strides {self.encoder.reductions}"
            )
        self.upsampling = upsampling
        # x2 steps from the shallowest level to the input: the paper's two for a stride-4 level
        n_final = max(0, reductions[0].bit_length() - 1)
        self.gcn = nn.ModuleList(
            GlobalConvBlock(c, num_classes, kernel_size) for c in self.encoder.channels[-4:]
        )
        self.br_score = nn.ModuleList(BoundaryRefinement(num_classes) for _ in range(4))
        self.br_fused = nn.ModuleList(BoundaryRefinement(num_classes) for _ in range(3 + n_final))
        if upsampling == "transpose":
            self.up = nn.ModuleList(bilinear_deconv(num_classes) for _ in range(3 + n_final))

    def _upsample(self, i: int, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # no shape-dependent Python branch (like resize_to's and pad_or_crop_to's shortcuts), so
        # that an exported graph (ONNX, torch.export) stays valid at every input size
        if self.upsampling == "bilinear":
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = self.up[i](x)
        # 2 h' + 1 rows from a deeper map of h' rows; the target has 2 h' - 1 or 2 h' when the
        # encoder's stride-2 layers round up (ResNets), 2 h' or 2 h' + 1 when they round down.
        # A crop that is never a no-op leaves torch.export no size-equality guard to record, so
        # the exported graph stays valid at every input size
        return x[..., : size[0], : size[1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        features = self.encoder(x)[-4:]
        scores = [br(gcn(f)) for gcn, br, f in zip(self.gcn, self.br_score, features, strict=True)]
        y = scores[3]
        for i, skip in enumerate(scores[2::-1]):
            y = self.br_fused[i](skip + self._upsample(i, y, tuple(skip.shape[-2:])))
        # then to the input size by x2 steps, each to the input size / 2^j rounded up: what the
        # encoder's stride-2 layers produced on the way down
        n_final = len(self.br_fused) - 3
        for j in range(n_final - 1, -1, -1):
            target = ((size[0] + 2**j - 1) // 2**j, (size[1] + 2**j - 1) // 2**j)
            i = len(self.br_fused) - 1 - j
            y = self.br_fused[i](self._upsample(i, y, target))
        return y


class GCN(SegmentationModel):
    """GCN (Peng et al. 2017, "Large Kernel Matters"): global convolution + boundary refinement.

    The paper reports no parameter or FLOP count (see the module docstring).

    Args:
        encoder: any timm model name (default resnet50 for speed; the paper: resnet152).
        encoder_weights: null (from scratch), "imagenet", a weights file or a URL.
        kernel_size: k of the GCN's k x 1 and 1 x k convolutions (odd; paper: 15).
        upsampling: "transpose" (the paper's learned Deconv, bilinear-initialised) or "bilinear".
    """

    def __init__(
        self,
        encoder: str = "resnet50",
        encoder_weights: str | None = None,
        kernel_size: int = 15,
        upsampling: GCNUpsampling = "transpose",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = GCNNetwork(
            self.num_classes,
            self.in_channels,
            encoder=encoder,
            encoder_weights=encoder_weights,
            kernel_size=kernel_size,
            upsampling=upsampling,
        )
