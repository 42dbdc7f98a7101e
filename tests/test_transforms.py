"""Joint augmentation keeps image and mask aligned: the mask is derived from the image, so after
any geometric transform it must still be derivable from the transformed image."""

import numpy as np
import torch

from seglight.data.transforms import EvalTransform, TrainTransform, denormalize, normalize

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LEVELS = torch.tensor([20, 60, 100, 140, 180, 220])  # class c <-> grey level LEVELS[c]


def image_and_mask(h=48, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # 8x8 blocks of random classes: big enough that most pixels are away from an edge
    blocks = torch.randint(0, len(LEVELS), (-(-h // 8), -(-w // 8)), generator=g)
    mask = blocks.repeat_interleave(8, 0).repeat_interleave(8, 1)[:h, :w]
    # horizontal asymmetry: a flip of the image alone would be caught
    mask[:, : w // 4] = 0
    image = LEVELS[mask].to(torch.uint8).expand(3, h, w).clone()
    return image, mask.to(torch.uint8)


def recover_mask(image: torch.Tensor) -> torch.Tensor:
    grey = denormalize(image, MEAN, STD).float().mean(0)
    return (grey[None] - LEVELS.view(-1, 1, 1).float()).abs().argmin(0)


def interior(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood has one label (bilinear resampling blends edges), away from
    the crop's border (beyond which the neighbourhood is unknown)."""
    m = mask.float()[None, None]
    mx = torch.nn.functional.max_pool2d(m, 3, 1, 1)
    mn = -torch.nn.functional.max_pool2d(-m, 3, 1, 1)
    inside = (mx == mn)[0, 0]
    inside[[0, -1], :] = False
    inside[:, [0, -1]] = False
    return inside


def test_geometry_keeps_image_and_mask_aligned():
    torch.manual_seed(0)
    t = TrainTransform(
        crop_size=(40, 40), scale_range=(0.5, 2.0), hflip=True, color_jitter=0.0, mean=MEAN, std=STD
    )
    flips = 0
    for seed in range(40):
        image, mask = image_and_mask(seed=seed)
        out_image, out_mask = t(image, mask)
        assert out_image.shape == (3, 40, 40) and out_mask.shape == (40, 40)
        assert out_image.dtype == torch.float32 and out_mask.dtype == torch.int64
        labelled = out_mask != 255
        check = labelled & interior(out_mask.masked_fill(~labelled, 0))
        assert check.sum() > 100
        assert torch.equal(recover_mask(out_image)[check], out_mask[check])
        assert set(out_mask.unique().tolist()) <= set(range(len(LEVELS))) | {
            255
        }  # nearest: no new labels
        flips += int(out_mask[:, :10].eq(0).float().mean() < out_mask[:, -10:].eq(0).float().mean())
    assert flips > 0  # flips did happen


def test_padding_uses_ignore_label_and_mean_colour():
    torch.manual_seed(0)
    image, mask = image_and_mask(16, 16)
    t = TrainTransform(
        crop_size=(32, 32),
        scale_range=(1.0, 1.0),
        hflip=False,
        color_jitter=0.0,
        mean=MEAN,
        std=STD,
    )
    out_image, out_mask = t(image, mask)
    assert (out_mask == 255).sum() == 32 * 32 - 16 * 16
    assert torch.allclose(out_image[:, out_mask == 255], torch.zeros(1), atol=1e-5)


def test_jitter_changes_image_only():
    torch.manual_seed(1)
    image, mask = image_and_mask()
    t = TrainTransform(crop_size=None, hflip=False, color_jitter=0.4, mean=MEAN, std=STD)
    out_image, out_mask = t(image, mask)
    assert torch.equal(out_mask, mask.long())
    assert not torch.allclose(out_image, normalize(image, MEAN, STD))


def test_eval_transform_is_deterministic_and_full_size():
    image, mask = image_and_mask(37, 53)
    a = EvalTransform(MEAN, STD)(image, mask)
    b = EvalTransform(MEAN, STD)(image, mask)
    assert a[0].shape == (3, 37, 53) and torch.equal(a[0], b[0]) and torch.equal(a[1], mask.long())
    assert np.allclose(denormalize(a[0], MEAN, STD).numpy(), image.numpy(), atol=1)
