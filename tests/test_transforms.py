"""Joint augmentation keeps image and mask aligned: the mask is derived from the image, so after
any geometric transform it must still be derivable from the transformed image."""

import numpy as np
import torch
import torch.nn.functional as F

from seglight.data.transforms import (
    EvalTransform,
    Prescale,
    TrainTransform,
    denormalize,
    normalize,
    scaled_crop,
)

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


# ----------------------------------------------------------------- random scale: the crop window
# The reference is the old TrainTransform geometry: resize the WHOLE image (F.interpolate,
# bilinear, align_corners=False, antialiased below scale 1; masks nearest-exact), pad bottom/right
# to the crop (fill / ignore), slice the window. scaled_crop must give the same pixels from the
# window's source pixels alone. Images are uint8 noise, so any misplaced window, half-pixel shift
# or wrong weight shows as errors of tens of grey levels. Tolerance for the image: 0.05 grey
# levels (of 255): torch computes each source coordinate scale * (i + 0.5) - 0.5 in float32
# (~3e-5 pixel at coordinate 500), so weights differ by that much; measured worst ~0.01.
# Masks: exactly (their source index is F.interpolate's own choice).
TOL = 0.05


def full_resize_then_crop(image, mask, scale, offset, crop, fill, ignore=255):
    h, w = mask.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    image = image.float()
    if size != (h, w):
        image = F.interpolate(
            image[None], size=size, mode="bilinear", align_corners=False, antialias=scale < 1
        )[0]
        lead, dtype = mask.shape[:-2], mask.dtype
        # (float: interpolate has no int64 kernel for a one-channel mask; labels < 2**24 are exact)
        mask = F.interpolate(mask.reshape(1, -1, h, w).float(), size=size, mode="nearest-exact")
        mask = mask.reshape(*lead, *size).to(dtype)
    ph, pw = max(size[0], crop[0]), max(size[1], crop[1])
    padded = torch.tensor(fill).view(-1, 1, 1).expand(image.shape[0], ph, pw).clone()
    padded[:, : size[0], : size[1]] = image
    padded_mask = torch.full((*mask.shape[:-2], ph, pw), ignore, dtype=mask.dtype)
    padded_mask[..., : size[0], : size[1]] = mask
    top, left = offset
    window = (slice(top, top + crop[0]), slice(left, left + crop[1]))
    return padded[(slice(None), *window)], padded_mask[(..., *window)]


def noise(h, w, g, classes=7):
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    mask = torch.randint(0, classes, (h, w), dtype=torch.uint8, generator=g)
    return image, mask


def check_window(image, mask, scale, offset, crop, fill=(1.0, 2.0, 3.0)):
    h, w = mask.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    out, out_mask = scaled_crop(image, mask, size, offset, crop, fill, 255, scale < 1)
    ref, ref_mask = full_resize_then_crop(image, mask, scale, offset, crop, fill)
    assert out.shape == ref.shape == (3, *crop) and out.dtype == torch.float32
    assert out_mask.dtype == mask.dtype and out_mask.shape == ref_mask.shape
    err = (out - ref).abs().max().item()
    assert err <= TOL, (h, w, scale, offset, crop, err)
    assert torch.equal(out_mask, ref_mask), (h, w, scale, offset, crop)


def test_window_resize_equals_full_resize_then_crop():
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        h, w = (int(v) for v in torch.randint(3, 48, (2,), generator=g))  # odd sizes included
        scale = 0.3 + 2.2 * torch.rand((), generator=g).item()
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        # crops from 1 pixel to larger than the scaled image (padding), at random offsets
        crop = tuple(int(torch.randint(1, s + 8, (), generator=g)) for s in size)
        offset = tuple(
            int(torch.randint(0, max(s, c) - c + 1, (), generator=g))
            for s, c in zip(size, crop, strict=True)
        )
        check_window(*noise(h, w, g), scale, offset, crop)


def test_window_at_every_border_and_extreme_offset():
    g = torch.Generator().manual_seed(1)
    image, mask = noise(37, 53, g)
    for scale in (0.45, 0.8, 1.0, 1.37, 2.0):
        size = (round(37 * scale), round(53 * scale))
        crop = (min(size[0], 15), min(size[1], 22))
        for top in (0, size[0] - crop[0]):
            for left in (0, size[1] - crop[1]):
                check_window(image, mask, scale, (top, left), crop)


def test_scaled_image_smaller_than_the_crop_is_padded_as_before():
    g = torch.Generator().manual_seed(2)
    image, mask = noise(21, 31, g)
    for scale, crop in ((0.5, (16, 20)), (1.0, (25, 40)), (1.3, (40, 30)), (1.3, (20, 48))):
        check_window(image, mask, scale, (0, 0), crop)
    out, out_mask = scaled_crop(image, mask, (10, 15), (0, 0), (16, 20), (7.0, 8.0, 9.0), 99, True)
    assert (out_mask[10:] == 99).all() and (out_mask[:, 15:] == 99).all()
    assert (out_mask[:10, :15] != 99).all()
    assert torch.equal(out[:, 10:, :], torch.tensor([7.0, 8.0, 9.0]).view(3, 1, 1).expand(3, 6, 20))


def test_stacked_and_wide_masks_keep_their_values_and_dtype():
    g = torch.Generator().manual_seed(3)
    image, _ = noise(30, 41, g)
    for mask in (
        torch.randint(0, 2, (4, 30, 41), dtype=torch.uint8, generator=g),  # instance stack
        torch.randint(0, 300, (30, 41), generator=g),  # int64 labels above 255
    ):
        for scale in (0.6, 1.7):
            check_window(image, mask, scale, (3, 5), (12, 17))


def test_train_transform_keeps_the_old_draws_and_geometry():
    """Same seed, same scale, crop position and output as the whole-image resize: the sample's
    augmentation stays a function of its seed (exact resume), and the law is unchanged."""
    g = torch.Generator().manual_seed(4)
    crop, lo, hi = (24, 32), 0.5, 2.0
    t = TrainTransform(crop, (lo, hi), hflip=False, color_jitter=0.0, mean=(0, 0, 0),
                       std=(1 / 255,) * 3)  # fmt: skip  # normalisation is then the identity
    for seed in range(30):
        image, mask = noise(27, 35, g)
        torch.manual_seed(seed)
        out, out_mask = t(image, mask)
        torch.manual_seed(seed)  # the draws of the old transform, in its order
        scale = lo + (hi - lo) * torch.rand(()).item()
        size = (max(1, round(27 * scale)), max(1, round(35 * scale)))
        top = int(torch.randint(0, max(size[0], crop[0]) - crop[0] + 1, ()).item())
        left = int(torch.randint(0, max(size[1], crop[1]) - crop[1] + 1, ()).item())
        ref, ref_mask = full_resize_then_crop(image, mask, scale, (top, left), crop, (0.0,) * 3)
        assert (out - ref).abs().max() <= TOL and torch.equal(out_mask, ref_mask.long())


def test_labels_above_255_survive_scaling_and_prescale():
    """int64 masks (more than 256 classes) used to fail: F.interpolate has no int64 kernel for a
    one-channel mask ("upsample_nearest2d_channels_last" not implemented for 'Long')."""
    g = torch.Generator().manual_seed(5)
    image, _ = noise(20, 26, g)
    mask = torch.randint(0, 400, (20, 26), generator=g)
    for t in (TrainTransform((16, 16), (1.5, 1.5)), TrainTransform((32, 40), (0.6, 0.6))):
        out_image, out_mask = t(image, mask)
        assert out_mask.dtype == torch.int64
        assert set(out_mask.unique().tolist()) <= set(mask.unique().tolist()) | {255}
    _, prescaled = Prescale(EvalTransform(), 0.5)(image, mask)
    assert prescaled.shape == (10, 13) and torch.equal(prescaled, mask[1::2, 1::2])  # centres
