"""Pascal VOC 2012 (+ SBD train_aug) on tiny fake copies in the official layout, its download
against a local HTTP server, and clear errors on bad data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes_zoo import VOC_VALUES, assert_aligned, make_fake_sbd, make_fake_voc, pack, serve
from PIL import Image

from seglight.data import DATASETS, VOC
from seglight.data.download import DownloadError, file_digest
from seglight.data.voc import train_aug_ids, voc_palette
from seglight.errors import ConfigError, DataError

TRAIN = ["2007_000032", "2007_000039", "2008_000008"]
VAL = ["2007_000033", "2007_000042"]
# SBD lists overlap VOC's: 2007_000039 is in VOC train (VOC's mask wins), 2007_000033 in VOC val
# (excluded), 2011_000003 is only in SBD
SBD_TRAIN = ["2007_000039", "2008_000002", "2007_000033", "2008_000003"]
SBD_VAL = ["2011_000003", "2007_000042"]
AUG = sorted({*TRAIN, "2008_000002", "2008_000003", "2011_000003"})


def voc(root, **kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 2)
    return VOC(root=str(root), **kwargs)


@pytest.fixture
def fake_voc(tmp_path):
    return make_fake_voc(tmp_path / "voc", TRAIN, VAL)


def test_classes_palette_and_registry():
    assert DATASETS["VOC"] is VOC
    assert VOC.class_names[0] == "background" and VOC.class_names[-1] == "tvmonitor"
    assert len(VOC.class_names) == len(VOC.palette) == 21
    assert VOC.palette[:4] == ((0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0))
    assert VOC.palette[20] == (0, 64, 128) and voc_palette()[255] == (224, 224, 192)


def test_splits_and_boundary_label(fake_voc):
    dm = voc(fake_voc, crop_size=(32, 32))
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 3, "val": 2}
    assert [i.stem for i, _ in dm.datasets["train"].pairs] == TRAIN  # list-file order
    sample = dm.datasets["val"][0]
    raw = np.array(Image.open(dm.datasets["val"].pairs[0][1]))
    assert Image.open(dm.datasets["val"].pairs[0][1]).mode == "P"
    assert (raw == 255).any() and sample["mask"].shape == (40, 48)
    # indices are the classes, the 255 boundary stays 255
    assert torch.equal(sample["mask"], torch.from_numpy(raw).long())
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].dtype == torch.int64
    dm2 = voc(fake_voc, train_split="trainval")
    dm2.setup("fit")
    assert len(dm2.datasets["train"]) == 5


def test_image_and_mask_stay_aligned_under_augmentation(fake_voc):
    lut = np.arange(256)
    torch.manual_seed(0)
    # crop, padding and flips: image and mask agree pixel for pixel
    dm = voc(fake_voc, crop_size=(44, 36), color_jitter=0.0, scale_range=(1.0, 1.0))
    dm.setup("fit")
    for k in range(6):
        sample = dm.datasets["train"][k % 3]
        assert_aligned(sample, lut, VOC_VALUES)
    # ... which a flip or a one-pixel shift would break
    for wrong in (sample["mask"].flip(-1), sample["mask"].roll(1, -2)):
        with pytest.raises(AssertionError, match="disagree"):
            assert_aligned({**sample, "mask": wrong}, lut, VOC_VALUES)
    # with random scaling too (region edges blend in the bilinearly resized image)
    dm = voc(fake_voc, crop_size=(36, 36), color_jitter=0.0, scale_range=(0.75, 1.5))
    dm.setup("fit")
    for k in range(6):
        assert_aligned(dm.datasets["train"][k % 3], lut, VOC_VALUES, min_agree=0.8)


def test_train_aug_from_sbd_mat_files(fake_voc, tmp_path):
    sbd_masks = make_fake_sbd(fake_voc, SBD_TRAIN, SBD_VAL)
    # one SBD image that VOC's JPEGImages lacks: read from SBD's img/
    (fake_voc / "VOCdevkit/VOC2012/JPEGImages/2011_000003.jpg").unlink()
    root = fake_voc / "VOCdevkit" / "VOC2012"
    before = sorted(fake_voc.rglob("*"))
    assert train_aug_ids(root, fake_voc / "benchmark_RELEASE" / "dataset") == AUG
    dm = voc(fake_voc, train_split="train_aug", cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()  # decodes the .mat masks once
    dm.setup("fit")
    pairs = dict((i.stem, (i, m)) for i, m in dm.datasets["train"].pairs)
    assert sorted(pairs) == AUG and len(dm.datasets["val"]) == 2
    # VOC's own mask (with boundaries) where there is one, else SBD's, decoded from the .mat
    assert pairs["2007_000039"][1] == root / "SegmentationClass" / "2007_000039.png"
    assert pairs["2008_000002"][1].parent == tmp_path / "cache" / "sbd_masks"
    assert pairs["2011_000003"][0].parts[-3:] == ("dataset", "img", "2011_000003.jpg")
    k = [i.stem for i, _ in dm.datasets["train"].pairs].index("2008_000003")
    image, mask = dm.datasets["train"].load(k)
    assert torch.equal(mask.long(), torch.from_numpy(sbd_masks["2008_000003"]).long())
    assert sorted(p for p in fake_voc.rglob("*")) == before  # nothing written next to the data


def test_train_aug_without_sbd_says_what_is_missing(fake_voc):
    with pytest.raises(DataError, match=r"missing benchmark_RELEASE/dataset/cls"):
        voc(fake_voc, train_split="train_aug").setup("fit")


def test_broken_sbd_mat_names_the_file(fake_voc, tmp_path):
    make_fake_sbd(fake_voc, SBD_TRAIN, SBD_VAL)
    bad = fake_voc / "benchmark_RELEASE/dataset/cls/2008_000002.mat"
    bad.write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(DataError, match=r"2008_000002.mat.*GTcls.Segmentation"):
        voc(fake_voc, train_split="train_aug", cache_dir=str(tmp_path / "c")).setup("fit")


def test_wrong_root_and_bad_option(tmp_path):
    with pytest.raises(DataError, match=r"VOC not found at .*nowhere.*VOCdevkit/VOC2012"):
        voc(tmp_path / "nowhere").setup("fit")
    with pytest.raises(ConfigError, match="train_split"):
        VOC(train_split="test")
    with pytest.raises(DataError, match="has no split 'test'"):
        voc(tmp_path).setup("test")


def test_incomplete_copy_names_the_missing_file(fake_voc):
    (fake_voc / "VOCdevkit/VOC2012/JPEGImages/2007_000039.jpg").unlink()
    with pytest.raises(
        DataError, match=r"(?s)1 file\(s\) listed in .*train.txt are missing.*2007_000039.jpg"
    ):
        voc(fake_voc).setup("fit")


def test_rgb_mask_and_foreign_palette_index_name_the_file(fake_voc):
    path = fake_voc / "VOCdevkit/VOC2012/SegmentationClass/2007_000042.png"
    rgb = np.array(Image.open(path).convert("RGB"))
    Image.fromarray(rgb).save(path)
    with pytest.raises(
        DataError, match=r"2007_000042.png' is a RGB image; expected single-channel"
    ):
        voc(fake_voc).setup("validate")
    # a palette index that is no VOC class (its colour is not in the class palette)
    mask = np.zeros((40, 48), np.uint8)
    mask[:4, :4] = 37
    im = Image.fromarray(mask)
    im.putpalette([c for rgb in voc_palette() for c in rgb])
    im.save(path)
    with pytest.raises(DataError, match=r"2007_000042.png' has values \[37\] outside \[0, 21\)"):
        voc(fake_voc).setup("validate")


# ------------------------------------------------------------------------------ download
def test_download_voc_and_sbd_from_a_local_server(tmp_path, monkeypatch):
    src = make_fake_voc(tmp_path / "src", TRAIN, VAL)
    make_fake_sbd(src, SBD_TRAIN, SBD_VAL, voc_images=False)
    www = tmp_path / "www"
    tar = pack(src, ["VOCdevkit"], www / "VOCtrainval_11-May-2012.tar")
    tgz = pack(src, ["benchmark_RELEASE"], www / "benchmark.tgz")
    with serve(www) as url:
        monkeypatch.setattr(
            VOC,
            "archives",
            {
                "voc": (f"{url}/{tar.name}", f"md5:{file_digest(tar, 'md5')}"),
                "sbd": (f"{url}/{tgz.name}", f"sha256:{file_digest(tgz)}"),
            },
        )
        root = tmp_path / "data" / "voc"
        dm = voc(root, download=True, train_split="train_aug", cache_dir=str(tmp_path / "c"))
        dm.prepare_data()
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": len(AUG), "val": 2}
    assert (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/trainval.txt").is_file()
    assert (root / "benchmark_RELEASE/dataset/cls/2011_000003.mat").is_file()
    dm.prepare_data()  # all there: nothing is fetched (the server is gone)


def test_download_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    src = make_fake_voc(tmp_path / "src", TRAIN, VAL)
    tar = pack(src, ["VOCdevkit"], tmp_path / "www" / "VOCtrainval_11-May-2012.tar")
    with serve(tmp_path / "www") as url:
        monkeypatch.setattr(VOC, "archives", {"voc": (f"{url}/{tar.name}", "md5:" + "0" * 32)})
        dm = voc(tmp_path / "data" / "voc", download=True)
        with pytest.raises(DownloadError, match="Checksum mismatch"):
            dm.prepare_data()
    assert not (tmp_path / "data" / "voc" / "VOCdevkit").exists()


def test_truncated_archive_is_refused(tmp_path, monkeypatch):
    src = make_fake_voc(tmp_path / "src", TRAIN, VAL)
    tar = pack(src, ["VOCdevkit"], tmp_path / "www" / "VOCtrainval_11-May-2012.tar")
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with serve(tmp_path / "www") as url:
        monkeypatch.setattr(VOC, "archives", {"voc": (f"{url}/{tar.name}", None)})
        with pytest.raises(
            DownloadError, match=r"VOCtrainval_11-May-2012.tar.*corrupt or incomplete"
        ):
            voc(tmp_path / "data", download=True).prepare_data()
    assert not (tmp_path / "data" / "VOCdevkit").exists()
