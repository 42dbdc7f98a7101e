"""CamVid layout parsing on a tiny fake copy, the Synthetic data, and clear errors on bad data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_fake_camvid
from PIL import Image

from seglight.data import CamVid, Synthetic
from seglight.data.base import collate, verify_pairs
from seglight.errors import DataError


def camvid(root, **kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 2)
    return CamVid(root=str(root), **kwargs)


def test_camvid_layout(fake_camvid):
    dm = camvid(fake_camvid, crop_size=(16, 16))
    assert dm.num_classes == 11 and dm.class_names[0] == "Sky" and dm.class_names[-1] == "Bicyclist"
    assert len(dm.palette) == 11 and dm.ignore_index == 255
    dm.setup("fit")
    dm.setup("test")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 6, "val": 5, "test": 3}
    # .jpg (train, test) and .png (val) images matched to .png labels by stem
    assert dm.datasets["train"].pairs[0][0].suffix == ".jpg"
    assert dm.datasets["val"].pairs[0][0].suffix == ".png"
    assert all(i.stem == m.stem for i, m in dm.datasets["val"].pairs)

    sample = dm.datasets["val"][0]
    raw = np.array(Image.open(dm.datasets["val"].pairs[0][1]))
    assert sample["image"].shape == (3, 24, 32) and sample["image"].dtype == torch.float32
    assert sample["mask"].dtype == torch.int64
    # void 11 -> 255, every other label unchanged
    assert torch.equal(sample["mask"], torch.from_numpy(np.where(raw == 11, 255, raw)).long())

    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["mask"].shape == (2, 16, 16)
    assert len(batch["name"]) == 2
    assert set(batch["mask"].unique().tolist()) <= set(range(11)) | {255}


def test_missing_folder_is_a_clear_error(tmp_path):
    dm = camvid(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"CamVid not found at .*nowhere.*--data.root"):
        dm.setup("fit")


def test_image_without_mask(fake_camvid):
    (fake_camvid / "trainannot" / "0001TP_train_0002.png").unlink()
    with pytest.raises(
        DataError, match=r"1 image\(s\) in .*train' have no mask.*0001TP_train_0002.jpg"
    ):
        camvid(fake_camvid).setup("fit")


def test_bad_mask_values_name_the_file_and_values(fake_camvid):
    path = fake_camvid / "valannot" / "0001TP_val_0001.png"
    mask = np.array(Image.open(path))
    mask[0, :3] = [12, 40, 40]
    Image.fromarray(mask).save(path)
    with pytest.raises(
        DataError, match=r"0001TP_val_0001.png' has values \[12, 40\] outside \[0, 11\)"
    ):
        camvid(fake_camvid).setup("fit")
    # ... also when the pre-check is off: the loader refuses the sample
    dm = camvid(fake_camvid, check_masks=False)
    dm.setup("fit")
    with pytest.raises(DataError, match="0001TP_val_0001.png"):
        dm.datasets["val"][1]


def test_mask_of_another_size(fake_camvid):
    path = fake_camvid / "trainannot" / "0001TP_train_0000.png"
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(path)
    with pytest.raises(
        DataError, match=r"0001TP_train_0000.png' is 20x32 but its image .* is 24x32"
    ):
        camvid(fake_camvid).setup("fit")


def test_colour_mask_where_indices_expected(fake_camvid):
    path = fake_camvid / "testannot" / "0001TP_test_0000.png"
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(path)
    with pytest.raises(
        DataError, match=r"0001TP_test_0000.png' is a RGB image; expected single-channel"
    ):
        camvid(fake_camvid).setup("test")


def test_verification_is_cached_and_invalidated_by_changes(fake_camvid):
    dm = camvid(fake_camvid)
    dm.setup("validate")
    pairs = dm.datasets["val"].pairs
    verify_pairs(pairs, 11, 255, dm.label_map)  # cached: passes
    mask = np.array(Image.open(pairs[0][1]))
    mask[0, 0] = 99
    Image.fromarray(mask).save(pairs[0][1])  # new mtime/size -> checked again
    with pytest.raises(DataError, match="values \\[99\\]"):
        verify_pairs(pairs, 11, 255, dm.label_map)


def test_duplicate_stems_are_refused(fake_camvid):
    Image.new("RGB", (32, 24)).save(fake_camvid / "test" / "0001TP_test_0000.png")
    with pytest.raises(DataError, match="two files named '0001TP_test_0000'"):
        camvid(fake_camvid).setup("test")


def test_collate_pads_different_sizes_with_ignore():
    a = {"image": torch.ones(3, 4, 5), "mask": torch.zeros(4, 5, dtype=torch.long), "name": "a"}
    b = {"image": torch.ones(3, 6, 3), "mask": torch.ones(6, 3, dtype=torch.long), "name": "b"}
    batch = collate([a, b])
    assert batch["image"].shape == (2, 3, 6, 5) and batch["mask"].shape == (2, 6, 5)
    assert (batch["mask"][0, 4:] == 255).all() and (batch["mask"][1, :, 3:] == 255).all()
    assert batch["name"] == ["a", "b"]


def test_synthetic_is_deterministic_and_valid():
    dm = Synthetic(num_train=4, num_val=3, num_test=2, image_size=(40, 56), batch_size=2)
    dm.setup("fit")
    a, b = dm.datasets["val"][1], dm.datasets["val"][1]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert a["image"].shape == (3, 40, 56)
    masks = torch.stack([dm.datasets["val"][i]["mask"] for i in range(3)])
    assert set(masks.unique().tolist()) <= set(range(dm.num_classes)) and len(masks.unique()) > 1
    # different splits hold different samples
    assert not torch.equal(dm.datasets["train"].transform(*_raw(dm, "train"))[1], a["mask"])


def _raw(dm, split):
    from seglight.data.synthetic import SPLIT_SEEDS, make_shapes

    return make_shapes(dm.image_size, SPLIT_SEEDS[split] + 1)


def test_bad_options():
    with pytest.raises(DataError, match="crop_size must be"):
        CamVid(crop_size=(16,))
    with pytest.raises(DataError, match="batch_size must be >= 1"):
        Synthetic(batch_size=0)


def test_fake_camvid_helper_layout(tmp_path):
    root = make_fake_camvid(tmp_path / "c", {"train": 1, "val": 1, "test": 1})
    assert sorted(p.name for p in root.iterdir()) == [
        "test",
        "testannot",
        "train",
        "trainannot",
        "val",
        "valannot",
    ]


def test_image_scale_rescales_every_split(fake_camvid):
    dm = camvid(fake_camvid, image_scale=0.5, crop_size=None)
    dm.setup("fit")
    val, train = dm.datasets["val"][0], dm.datasets["train"][0]
    assert val["image"].shape == (3, 12, 16) and val["mask"].shape == (12, 16)
    assert train["image"].shape == (3, 12, 16) and train["mask"].shape == (12, 16)
    # nearest-exact keeps labels (void still mapped to 255) and their layout
    raw = camvid(fake_camvid, crop_size=None)
    raw.setup("validate")
    assert torch.equal(val["mask"], raw.datasets["val"][0]["mask"][1::2, 1::2])
    with pytest.raises(DataError, match="image_scale must be in"):
        camvid(fake_camvid, image_scale=0)


def test_png_masks_decode_like_pil_grey_palette_and_16_bit(tmp_path):
    """torchvision decodes 8-bit grey and palette PNG masks (indices, not colours) exactly as
    PIL does; 16-bit and colour masks keep PIL's path and its errors."""
    import numpy as np
    from PIL import Image

    from seglight.data.base import read_mask
    from seglight.errors import DataError

    values = (np.arange(37 * 29).reshape(37, 29) * 7 % 256).astype(np.uint8)
    Image.fromarray(values, "L").save(tmp_path / "grey.png")
    palette = Image.fromarray(values % 12, "P")
    palette.putpalette([(i * 53) % 256 for i in range(768)])
    palette.save(tmp_path / "palette.png")
    Image.fromarray(values.astype(np.uint16) * 200).save(tmp_path / "wide.png")
    Image.fromarray(np.stack([values] * 3, -1), "RGB").save(tmp_path / "colour.png")
    lut = np.arange(256, dtype=np.uint8)[::-1].copy()
    for name in ("grey.png", "palette.png", "wide.png"):
        with Image.open(tmp_path / name) as im:
            expected = np.array(im)
        got = read_mask(tmp_path / name)
        assert got.dtype == expected.dtype and np.array_equal(got, expected), name
    assert np.array_equal(read_mask(tmp_path / "grey.png", lut), lut[values])
    with pytest.raises(DataError, match="colour-coded"):
        read_mask(tmp_path / "colour.png")
