"""CRF post-processing of predicted probabilities: mean-field inference in a CRF whose pairwise
Potts potentials are Gaussian in position (smoothness) and in position and colour (appearance).

- `dense_crf`: the fully connected CRF of Krähenbühl and Koltun (NIPS 2011) as DeepLab uses it
  (Chen et al., ICLR 2015 and TPAMI 2017), through `pydensecrf2` (permutohedral lattice, on the
  CPU, image by image). Install with `pip install pydensecrf2` (the `crf` extra).
- `conv_crf`: the convolutional CRF of Teichmann and Cipolla (BMVC 2019, "Convolutional CRFs
  for Semantic Segmentation"): the same potentials restricted to a local window, so a
  message-passing step is a batched unfold on the device (GPU or CPU), in pure torch.

Both take probabilities [B, K, H, W] and the images as uint8 RGB [B, 3, H, W] (colour distances
are in 0..255 units, as in both papers) and return refined probabilities [B, K, H, W].
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.nn.functional as F

from seglight.errors import ConfigError

INSTALL_HINT = (
    "the dense CRF needs pydensecrf2: pip install pydensecrf2 (or pip install -e '.[crf]'); "
    "crf: conv is a pure-torch alternative"
)


# The defaults are DeepLab-LargeFOV's released CRF parameters (run_densecrf.sh of DeepLab v1,
# Chen et al. 2015: w2 = 3, sigma_gamma = 3 are Krähenbühl's defaults; w1, sigma_alpha,
# sigma_beta were cross-validated on VOC val). DeepLab v2's ResNet-101 release uses bi_w 4,
# bi_xy_std 67, bi_rgb_std 3, pos_w 3, pos_xy_std 1.
def dense_crf(
    probs: torch.Tensor,
    image: torch.Tensor,
    iterations: int = 10,
    bi_w: float = 4.0,
    bi_xy_std: float = 49.0,
    bi_rgb_std: float = 5.0,
    pos_w: float = 3.0,
    pos_xy_std: float = 3.0,
) -> torch.Tensor:
    """Fully connected CRF (Krähenbühl and Koltun 2011) on each image, DeepLab's parameters.

    Unary -log p; pairwise Potts with weight bi_w for the appearance kernel
    exp(-|p_i - p_j|^2 / 2 bi_xy_std^2 - |I_i - I_j|^2 / 2 bi_rgb_std^2) and pos_w for the
    smoothness kernel exp(-|p_i - p_j|^2 / 2 pos_xy_std^2); `iterations` mean-field steps.

    probs: [B, K, H, W] probabilities; image: uint8 RGB [B, 3, H, W]. Returns float32
    [B, K, H, W] on probs' device. Runs on the CPU (a host copy of each image).
    """
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise ConfigError(INSTALL_HINT) from e
    b, k, h, w = probs.shape
    out = np.empty((b, k, h, w), np.float32)
    probs_np = probs.detach().float().cpu().numpy()
    images = image.detach().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(b):
        crf = dcrf.DenseCRF2D(w, h, k)
        unary = -np.log(np.clip(probs_np[i], 1e-8, 1.0)).reshape(k, -1)
        crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
        crf.addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)
        crf.addPairwiseBilateral(
            sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=np.ascontiguousarray(images[i]), compat=bi_w
        )
        out[i] = np.asarray(crf.inference(iterations), np.float32).reshape(k, h, w)
    return torch.from_numpy(out).to(probs.device)


def _pairwise_kernel(
    image: torch.Tensor,
    window: int,
    downsample: int,
    pos_w: float,
    pos_xy_std: float,
    bi_w: float,
    bi_xy_std: float,
    bi_rgb_std: float,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Weighted sum of both kernels between each (downsampled) pixel and its window x window
    neighbours, the centre excluded: [B, window^2, h * w], and (h, w)."""
    b, _, height, width = image.shape
    yy, xx = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=image.device),
        torch.arange(width, dtype=torch.float32, device=image.device),
        indexing="ij",
    )
    # positions in input pixels, colours in 0..255: the standard deviations keep their meaning
    # at any downsampling (each low-resolution pixel takes its block's mean position and colour)
    feats = torch.cat([torch.stack([yy, xx]).expand(b, 2, height, width), image.float()], 1)
    if downsample > 1:
        feats = F.avg_pool2d(feats, downsample, ceil_mode=True)
    h, w = feats.shape[-2:]
    neighbours = F.unfold(feats, window, padding=window // 2).view(b, 5, window * window, h * w)
    diff2 = (neighbours - feats.view(b, 5, 1, h * w)) ** 2
    pos2, rgb2 = diff2[:, :2].sum(1), diff2[:, 2:].sum(1)  # [B, window^2, h*w]
    kernel = pos_w * torch.exp(-pos2 / (2 * pos_xy_std**2)) + bi_w * torch.exp(
        -pos2 / (2 * bi_xy_std**2) - rgb2 / (2 * bi_rgb_std**2)
    )
    kernel[:, (window * window) // 2] = 0  # no message from a pixel to itself
    # neighbours outside the image get any value here: their probabilities are unfolded as 0
    return kernel, (h, w)


# The defaults are ConvCRF's configuration (Teichmann and Cipolla's convcrf.py default_conf:
# filter_size 11, blur 4, pos_feats sdims 3 / compat 3, col_feats sdims 80 / schan 13 / compat
# 10, message weight 0.2, 5 iterations).
def conv_crf(
    probs: torch.Tensor,
    image: torch.Tensor,
    iterations: int = 5,
    window: int = 11,
    downsample: int = 4,
    pos_w: float = 3.0,
    pos_xy_std: float = 3.0,
    bi_w: float = 10.0,
    bi_xy_std: float = 80.0,
    bi_rgb_std: float = 13.0,
    weight: float = 0.2,
) -> torch.Tensor:
    """Convolutional CRF (Teichmann and Cipolla 2019): mean-field inference with the dense CRF's
    Gaussian (pos_*) and bilateral (bi_*) Potts kernels truncated to a window x window
    neighbourhood, computed at 1/downsample resolution (ConvCRF's "blur"; messages are
    upsampled bilinearly). Each step, with U = log p and Q the current marginals:

        m_i(l) = sum_{j in window(i), j != i} k(i, j) Q_j(l)        (message passing, unfold)
        Q_i    = softmax((1 - weight) U_i + weight m_i)              (Potts compatibility:
                                                                      agreement lowers energy)

    probs: [B, K, H, W]; image: RGB [B, 3, H, W] in 0..255. Batched, on probs' device; memory
    about B * (K + 5) * window^2 * H * W / downsample^2 floats. Returns float32 [B, K, H, W].
    """
    if window < 1 or window % 2 == 0:
        raise ConfigError(f"conv CRF window must be odd and positive, got {window}")
    if downsample < 1:
        raise ConfigError(f"conv CRF downsample must be >= 1, got {downsample}")
    b, k, height, width = probs.shape
    probs = probs.float()
    unary = probs.clamp(min=1e-8).log()
    kernel, (h, w) = _pairwise_kernel(
        image.to(probs.device), window, downsample, pos_w, pos_xy_std, bi_w, bi_xy_std, bi_rgb_std
    )
    q = probs
    for _ in range(iterations):
        q_low = F.avg_pool2d(q, downsample, ceil_mode=True) if downsample > 1 else q
        neighbours = F.unfold(q_low, window, padding=window // 2).view(b, k, window * window, -1)
        message = (neighbours * kernel[:, None]).sum(2).view(b, k, h, w)
        if downsample > 1:
            message = F.interpolate(
                message, size=(height, width), mode="bilinear", align_corners=False
            )
        q = torch.softmax((1 - weight) * unary + weight * message, 1)
    return q


def _defaults(fn) -> dict:
    """The keyword defaults of a CRF function: its parameters, in one place (the signature)."""
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


#: the CRFs' parameters and their defaults, for crf_options
DENSE_CRF_DEFAULTS = _defaults(dense_crf)
CONV_CRF_DEFAULTS = _defaults(conv_crf)
CRFS = {"dense": (dense_crf, DENSE_CRF_DEFAULTS), "conv": (conv_crf, CONV_CRF_DEFAULTS)}


def apply_crf(
    name: str, probs: torch.Tensor, image: torch.Tensor, options: dict | None = None
) -> torch.Tensor:
    """Run the CRF `name` ("dense" or "conv") with its defaults updated by `options`."""
    if name not in CRFS:
        raise ConfigError(f"unknown CRF {name!r}; known: {', '.join(CRFS)}")
    fn, defaults = CRFS[name]
    unknown = set(options or {}) - set(defaults)
    if unknown:
        raise ConfigError(
            f"crf_options: unknown option(s) {sorted(unknown)} for the {name} CRF; "
            f"it takes {sorted(defaults)}"
        )
    return fn(probs, image, **{**defaults, **(options or {})})
