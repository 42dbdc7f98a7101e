"""Colour mask <-> index conversion, one-hot encoding, the colour map and the decoded-mask cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from seglight.data.utils import (
    build_cache,
    decode_colour_masks,
    index_to_rgb,
    label_colormap,
    one_hot,
    read_colour_mask,
    rgb_to_index,
    shift_labels,
)
from seglight.errors import ConfigError, DataError

PALETTE = [(0, 0, 0), (128, 64, 128), (64, 0, 128), (255, 255, 255)]


def test_rgb_to_index_is_exact_and_inverts_index_to_rgb():
    rng = np.random.default_rng(0)
    index = rng.integers(0, 4, size=(7, 9)).astype(np.uint8)
    rgb = index_to_rgb(index, PALETTE)
    assert rgb.shape == (7, 9, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == PALETTE[index[0, 0]]
    out = rgb_to_index(rgb, PALETTE)
    assert out.dtype == np.uint8 and np.array_equal(out, index)
    # a colour one unit away from a palette entry is not that entry
    rgb[2, 3] = (128, 64, 129)
    with pytest.raises(DataError, match=r"1 pixels .* \(128, 64, 129\) x 1 px"):
        rgb_to_index(rgb, PALETTE, where="a.png")


def test_rgb_to_index_names_each_unknown_colour_and_its_count():
    rgb = index_to_rgb(np.zeros((4, 5), np.uint8), PALETTE)
    rgb[0, :3] = (1, 2, 3)
    rgb[3, 4] = (9, 9, 9)
    with pytest.raises(DataError) as e:
        rgb_to_index(rgb, PALETTE, where="mask 'x.png'")
    assert "mask 'x.png'" in str(e.value) and "4 pixels" in str(e.value)
    assert "(1, 2, 3) x 3 px" in str(e.value) and "(9, 9, 9) x 1 px" in str(e.value)
    # not strict: unknown colours become the ignore index, the rest is unchanged
    out = rgb_to_index(rgb, PALETTE, ignore_index=255, strict=False)
    assert (out[0, :3] == 255).all() and out[3, 4] == 255 and (out[1:3] == 0).all()


def test_rgb_to_index_accepts_rgba_and_refuses_bad_input():
    rgba = np.dstack([index_to_rgb(np.full((2, 2), 2), PALETTE), np.full((2, 2), 7, np.uint8)])
    assert (rgb_to_index(rgba, PALETTE) == 2).all()
    with pytest.raises(DataError, match=r"expected a colour mask \[H, W, 3\]"):
        rgb_to_index(np.zeros((4, 4), np.uint8), PALETTE)
    with pytest.raises(ConfigError, match="repeated colours"):
        rgb_to_index(np.zeros((2, 2, 3), np.uint8), [(0, 0, 0), (0, 0, 0)])
    with pytest.raises(ConfigError, match="palette"):
        rgb_to_index(np.zeros((2, 2, 3), np.uint8), [(0, 0)])


def test_index_to_rgb_paints_ignore_and_out_of_range_with_the_ignore_colour():
    mask = torch.tensor([[0, 3, 255], [4, 1, 2]])
    rgb = index_to_rgb(mask, PALETTE, ignore_color=(9, 8, 7))
    assert tuple(rgb[0, 2]) == (9, 8, 7) and tuple(rgb[1, 0]) == (9, 8, 7)
    assert tuple(rgb[0, 1]) == (255, 255, 255) and tuple(rgb[1, 1]) == (128, 64, 128)


def test_one_hot_zeroes_ignored_pixels():
    mask = torch.tensor([[[0, 2], [255, 1]]])  # [1, 2, 2]
    out = one_hot(mask, 3)
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.float32
    expected = torch.tensor(
        [[[[1, 0], [0, 0]], [[0, 0], [0, 1]], [[0, 1], [0, 0]]]], dtype=torch.float32
    )
    assert torch.equal(out, expected)
    assert out.sum(1)[0, 1, 0] == 0  # the ignored pixel
    with pytest.raises(DataError, match=r"values \[3\] are outside \[0, 3\)"):
        one_hot(torch.tensor([[[0, 3]]]), 3)


def test_label_colormap_and_shift_labels():
    colours = label_colormap(40)
    assert len(set(colours)) == 40 and (0, 0, 0) not in colours
    assert colours[:3] == ((128, 0, 0), (0, 128, 0), (128, 128, 0))  # VOC's colours 1, 2, 3
    lut = shift_labels(37)
    assert lut[0] == 255 and lut[1] == 0 and lut[37] == 36 and lut[38] == 38


def test_read_colour_mask_refuses_index_masks(tmp_path):
    Image.fromarray(np.zeros((3, 3), np.uint8), mode="L").save(tmp_path / "m.png")
    with pytest.raises(DataError, match=r"m.png' is a single-channel L image; expected an RGB"):
        read_colour_mask(tmp_path / "m.png")


def test_decode_colour_masks_caches_and_notices_changes(tmp_path):
    index = np.array([[0, 1, 2], [3, 3, 1]], np.uint8)
    mask = tmp_path / "a_L.png"
    Image.fromarray(index_to_rgb(index, PALETTE)).save(mask)
    lut = np.arange(256, dtype=np.uint8)
    lut[3] = 255  # the white colour means "ignore"
    cache = tmp_path / "cache"
    pairs = decode_colour_masks([(tmp_path / "a.jpg", mask)], PALETTE, cache, lut)
    assert pairs == [(tmp_path / "a.jpg", cache / "a_L.png")]
    assert np.array_equal(np.array(Image.open(pairs[0][1])), lut[index])
    stamp = pairs[0][1].stat().st_mtime_ns
    decode_colour_masks([(tmp_path / "a.jpg", mask)], PALETTE, cache, lut)  # reused
    assert pairs[0][1].stat().st_mtime_ns == stamp
    Image.fromarray(index_to_rgb(np.zeros((2, 3), np.uint8), PALETTE)).save(mask)
    decode_colour_masks([(tmp_path / "a.jpg", mask)], PALETTE, cache, lut)  # rebuilt
    assert (np.array(Image.open(pairs[0][1])) == 0).all()
    # a bad colour names the file, and nothing half-built is left at the cache's place
    bad = index_to_rgb(index, PALETTE)
    bad[0, 0] = (5, 5, 5)
    Image.fromarray(bad).save(mask)
    with pytest.raises(DataError, match=r"(?s)1 of 1 colour masks .*a_L.png.*\(5, 5, 5\) x 1 px"):
        decode_colour_masks([(tmp_path / "a.jpg", mask)], PALETTE, cache, lut)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_L.png", "cache"]


def test_build_cache_reports_every_failing_job(tmp_path):
    def fail(name):
        def make():
            raise DataError(f"{name} is broken")

        return make

    jobs = [("ok", lambda: np.zeros((2, 2), np.uint8)), ("x", fail("x")), ("y", fail("y"))]
    with pytest.raises(DataError, match=r"2 of 3 things could not be decoded:\n  x is broken\n  y"):
        build_cache(tmp_path / "c", "d1", jobs, "things")
    assert not (tmp_path / "c").exists()
    assert build_cache(tmp_path / "c", "d1", jobs[:1], "things") == tmp_path / "c"
    assert (tmp_path / "c" / "ok.png").is_file()
