"""Cityscapes on a tiny fake copy in the official layout: labelIds -> trainIds, the test split
without labels, extraction of the manually downloaded zips, and clear errors on bad data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes_zoo import CITYSCAPES_VALUES, assert_aligned, make_fake_cityscapes, pack
from PIL import Image

from seglight.data import DATASETS, Cityscapes
from seglight.data.cityscapes import TRAIN_IDS
from seglight.errors import DataError


def cityscapes(root, **kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 2)
    return Cityscapes(root=str(root), **kwargs)


@pytest.fixture
def fake_cityscapes(tmp_path):
    return make_fake_cityscapes(tmp_path / "cityscapes")


def test_classes_and_the_official_train_id_table():
    assert DATASETS["Cityscapes"] is Cityscapes
    assert len(Cityscapes.class_names) == len(Cityscapes.palette) == 19
    assert Cityscapes.class_names[0] == "road" and Cityscapes.class_names[18] == "bicycle"
    assert Cityscapes.palette[0] == (128, 64, 128) and Cityscapes.palette[13] == (0, 0, 142)
    lut = Cityscapes.label_map
    assert lut[7] == 0 and lut[8] == 1 and lut[26] == 13 and lut[33] == 18
    # void and the non-evaluated classes (parking 9, guard rail 14, caravan 29, ...) are ignored
    assert all(lut[i] == 255 for i in (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34, 255))
    assert sorted(lut[list(TRAIN_IDS)]) == list(range(19))


def test_layout_and_label_mapping(fake_cityscapes):
    dm = cityscapes(fake_cityscapes, crop_size=(16, 32))
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 3, "val": 2}
    image, mask = dm.datasets["train"].pairs[0]
    assert image.name == "aachen_000000_000019_leftImg8bit.png"
    assert mask.name == "aachen_000000_000019_gtFine_labelIds.png"
    sample = dm.datasets["val"][0]
    raw = np.array(Image.open(dm.datasets["val"].pairs[0][1]))
    expected = np.vectorize(lambda v: TRAIN_IDS.get(int(v), 255))(raw)
    assert torch.equal(sample["mask"], torch.from_numpy(expected).long())
    assert sample["mask"][torch.from_numpy(raw == 7)].eq(0).all()
    assert sample["mask"][torch.from_numpy(raw == 0)].eq(255).all()
    # validation at full resolution, training crops
    assert sample["image"].shape == (3, 32, 64)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 32)


def test_image_and_mask_stay_aligned_under_augmentation(fake_cityscapes):
    torch.manual_seed(0)
    for scale, min_agree in (((1.0, 1.0), 0.99), ((0.75, 1.5), 0.8)):
        dm = cityscapes(fake_cityscapes, crop_size=(24, 40), scale_range=scale, color_jitter=0.0)
        dm.setup("fit")
        for k in range(6):
            sample = dm.datasets["train"][k % 3]
            assert_aligned(sample, Cityscapes.label_map, CITYSCAPES_VALUES, min_agree)


def test_test_split_is_predict_only(fake_cityscapes):
    dm = cityscapes(fake_cityscapes)
    dm.setup("predict")
    sample = dm.datasets["test"][0]
    assert sample["name"] == "bonn_000000_000019_leftImg8bit" and (sample["mask"] == 255).all()
    with pytest.raises(DataError, match="test labels are not public.*validate"):
        cityscapes(fake_cityscapes).setup("test")


def test_wrong_root_explains_registration(tmp_path):
    with pytest.raises(DataError, match=r"(?s)not found at .*nowhere.*leftImg8bit/.*register"):
        cityscapes(tmp_path / "nowhere").setup("fit")


def test_missing_label_file_is_named(fake_cityscapes):
    (fake_cityscapes / "gtFine/train/bochum/bochum_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(
        DataError, match=r"(?s)1 Cityscapes train.*bochum_000000_000019_gtFine_labelIds"
    ):
        cityscapes(fake_cityscapes).setup("fit")


def test_colour_label_file_is_refused(fake_cityscapes):
    path = fake_cityscapes / "gtFine/val/lindau/lindau_000001_000019_gtFine_labelIds.png"
    Image.new("RGB", (64, 32), (128, 64, 128)).save(path)
    with pytest.raises(
        DataError, match=r"lindau_000001_000019_gtFine_labelIds.png' is a RGB image"
    ):
        cityscapes(fake_cityscapes).setup("validate")


def test_download_without_zips_says_where_to_get_them(tmp_path):
    dm = cityscapes(tmp_path / "cs", download=True)
    pattern = r"(?s)cannot be downloaded.*cityscapes-dataset.com/register.*leftImg8bit_trainvaltest"
    with pytest.raises(DataError, match=pattern):
        dm.prepare_data()


def test_download_extracts_the_zips_you_put_in_root(tmp_path, monkeypatch):
    src = make_fake_cityscapes(tmp_path / "src")
    (src / "license.txt").write_text("terms")
    root = tmp_path / "cs"
    pack(src, ["leftImg8bit", "license.txt"], root / "leftImg8bit_trainvaltest.zip")
    pack(src, ["gtFine", "license.txt"], root / "gtFine_trainvaltest.zip")
    monkeypatch.setattr(Cityscapes, "split_sizes", {"train": 3, "val": 2, "test": 1})
    dm = cityscapes(root, download=True)
    dm.prepare_data()
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 3, "val": 2}
    # an incomplete package (fewer images than the release has) is reported
    monkeypatch.setattr(Cityscapes, "split_sizes", {"train": 2975, "val": 500, "test": 1525})
    for d in ("leftImg8bit", "gtFine"):
        for p in sorted((root / d).rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    with pytest.raises(DataError, match=r"leftImg8bit/train: expected 2975 images, found 3"):
        cityscapes(root, download=True).prepare_data()
