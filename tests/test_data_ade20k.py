"""ADE20K (SceneParsing 2016) on a tiny fake copy in the official layout: 150 classes, 0 ignored
and 1..150 -> 0..149, the download against a local HTTP server, and clear errors on bad data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes_zoo import assert_aligned, make_fake_ade20k, pack, serve
from PIL import Image

from seglight.data import ADE20K, DATASETS
from seglight.data.download import DownloadError, file_digest
from seglight.errors import DataError

RAW_VALUES = [0, 1, 2, 13, 77, 149, 150]


def ade(root, **kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 2)
    return ADE20K(root=str(root), **kwargs)


@pytest.fixture
def fake_ade(tmp_path):
    return make_fake_ade20k(tmp_path / "ade20k")


def test_classes():
    assert DATASETS["ADE20K"] is ADE20K
    assert len(ADE20K.class_names) == len(set(ADE20K.class_names)) == len(ADE20K.palette) == 150
    names = ADE20K.class_names
    assert (names[0], names[1], names[2], names[20], names[149]) == (
        "wall", "building", "sky", "car", "flag",
    )  # fmt: skip
    lut = ADE20K.label_map
    assert lut[0] == 255 and lut[1] == 0 and lut[150] == 149 and lut[255] == 255


def test_layout_and_reduce_zero_label(fake_ade):
    dm = ade(fake_ade, crop_size=(32, 32))
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 3, "val": 2}
    image, mask = dm.datasets["val"].pairs[1]
    assert (image.name, mask.name) == ("ADE_val_00000002.jpg", "ADE_val_00000002.png")
    raw = np.array(Image.open(mask))
    sample = dm.datasets["val"][1]
    expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
    assert torch.equal(sample["mask"], torch.from_numpy(expected))
    assert sample["mask"][torch.from_numpy(raw == 1)].eq(0).all()
    assert sample["mask"][torch.from_numpy(raw == 150)].eq(149).all()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].max() < 256


def test_image_and_mask_stay_aligned_under_augmentation(fake_ade):
    torch.manual_seed(0)
    for scale, min_agree in (((1.0, 1.0), 0.99), ((0.6, 1.4), 0.8)):
        dm = ade(fake_ade, crop_size=(40, 40), scale_range=scale, color_jitter=0.0)
        dm.setup("fit")
        for k in range(6):
            assert_aligned(dm.datasets["train"][k % 3], ADE20K.label_map, RAW_VALUES, min_agree)


def test_wrong_root(tmp_path):
    with pytest.raises(DataError, match=r"ADE20K not found at .*nowhere.*ADEChallengeData2016"):
        ade(tmp_path / "nowhere").setup("fit")
    with pytest.raises(DataError, match="has no split 'test'"):
        ade(tmp_path).setup("test")


def test_partial_copy_names_the_image_without_annotation(fake_ade):
    (fake_ade / "ADEChallengeData2016/annotations/training/ADE_train_00000003.png").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) .* have no mask.*ADE_train_00000003.jpg"):
        ade(fake_ade).setup("fit")


def test_bad_masks_name_the_file(fake_ade):
    path = fake_ade / "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png"
    Image.new("RGB", (56, 40), (120, 120, 120)).save(path)
    with pytest.raises(DataError, match=r"ADE_val_00000001.png' is a RGB image"):
        ade(fake_ade).setup("validate")
    mask = np.ones((40, 56), np.uint8)
    mask[0, 0] = 151
    Image.fromarray(mask).save(path)
    with pytest.raises(
        DataError, match=r"ADE_val_00000001.png' has values \[151\] outside \[0, 150\)"
    ):
        ade(fake_ade).setup("validate")


def test_download_from_a_local_server(tmp_path, monkeypatch):
    src = make_fake_ade20k(tmp_path / "src")
    archive = pack(src, ["ADEChallengeData2016"], tmp_path / "www" / "ADEChallengeData2016.zip")
    with serve(tmp_path / "www") as url:
        monkeypatch.setattr(ADE20K, "url", f"{url}/{archive.name}")
        monkeypatch.setattr(ADE20K, "checksum", f"sha1:{file_digest(archive, 'sha1')}")
        dm = ade(tmp_path / "data" / "ade20k", download=True)
        dm.prepare_data()
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 3, "val": 2}
    assert (dm.root / "ADEChallengeData2016" / "objectInfo150.txt").is_file()
    dm.prepare_data()  # there already: nothing fetched (the server is gone)


def test_download_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    src = make_fake_ade20k(tmp_path / "src", 1, 1)
    archive = pack(src, ["ADEChallengeData2016"], tmp_path / "www" / "ADEChallengeData2016.zip")
    with serve(tmp_path / "www") as url:
        monkeypatch.setattr(ADE20K, "url", f"{url}/{archive.name}")
        monkeypatch.setattr(ADE20K, "checksum", "sha1:" + "0" * 40)
        with pytest.raises(DownloadError, match="Checksum mismatch"):
            ade(tmp_path / "data", download=True).prepare_data()
    assert not (tmp_path / "data" / "ADEChallengeData2016").exists()
