"""COCO-Stuff 164k and COCO instance->semantic masks on tiny fake copies in the official layouts:
class lists, the 0..181 -> 0..170 mapping, crowd -> 255, overlaps, the mask cache, a download
against a local HTTP server, and clear errors on bad data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from fakes_zoo import (
    COCOSTUFF_VALUES,
    assert_aligned,
    make_fake_coco,
    make_fake_cocostuff,
    pack,
    serve,
)
from PIL import Image

from seglight.data import COCO, DATASETS, COCOStuff
from seglight.data.coco import THING_IDS
from seglight.data.download import file_digest
from seglight.errors import DataError


def make(cls, root, **kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 2)
    return cls(root=str(root), **kwargs)


# ------------------------------------------------------------------------------ COCO-Stuff
def test_cocostuff_classes_and_mapping():
    assert DATASETS["COCOStuff"] is COCOStuff
    names = COCOStuff.class_names
    assert len(names) == len(set(names)) == len(COCOStuff.palette) == 171
    assert names[:3] == ("person", "bicycle", "car") and names[79] == "toothbrush"
    assert names[80] == "banner" and names[-1] == "wood"
    for unused in ("street sign", "hat", "shoe", "eye glasses", "plate", "window", "hair brush"):
        assert unused not in names
    lut = COCOStuff.label_map
    # value = COCO-Stuff id - 1: person 0 -> 0, street sign 11 (unused) -> 255, stop sign 12 -> 11
    assert (lut[0], lut[11], lut[12], lut[90], lut[91], lut[181], lut[255]) == (
        0, 255, 11, 255, 80, 170, 255,
    )  # fmt: skip
    assert sorted(set(lut[:182].tolist()) - {255}) == list(range(171))


def test_cocostuff_layout_mapping_and_alignment(tmp_path):
    root = make_fake_cocostuff(tmp_path / "cocostuff")
    dm = make(COCOStuff, root, crop_size=(32, 32))
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 3, "val": 2}
    image, mask = dm.datasets["val"].pairs[0]
    assert image.parts[-3:] == ("images", "val2017", "000000000004.jpg")
    assert mask.parts[-3:] == ("annotations", "val2017", "000000000004.png")
    raw = np.array(Image.open(mask))
    sample = dm.datasets["val"][0]
    assert torch.equal(sample["mask"], torch.from_numpy(COCOStuff.label_map[raw]).long())
    assert sample["mask"][torch.from_numpy(raw == 255)].eq(255).all()
    assert sample["mask"][torch.from_numpy(raw == 11)].eq(255).all()  # unused id
    assert sample["mask"][torch.from_numpy(raw == 181)].eq(170).all()
    torch.manual_seed(0)
    for scale, min_agree in (((1.0, 1.0), 0.99), ((0.75, 1.5), 0.8)):
        dm = make(COCOStuff, root, crop_size=(36, 36), scale_range=scale, color_jitter=0.0)
        dm.setup("fit")
        for k in range(6):
            sample = dm.datasets["train"][k % 3]
            assert_aligned(sample, COCOStuff.label_map, COCOSTUFF_VALUES, min_agree)


def test_cocostuff_errors(tmp_path):
    with pytest.raises(DataError, match=r"COCO-Stuff not found at .*nowhere.*images/"):
        make(COCOStuff, tmp_path / "nowhere").setup("fit")
    root = make_fake_cocostuff(tmp_path / "cocostuff")
    path = root / "annotations" / "train2017" / "000000000002.png"
    Image.new("RGB", (48, 40)).save(path)
    with pytest.raises(DataError, match=r"000000000002.png' is a RGB image"):
        make(COCOStuff, root).setup("fit")
    path.unlink()
    with pytest.raises(DataError, match=r"have no mask .*000000000002.jpg"):
        make(COCOStuff, root).setup("fit")


def test_cocostuff_download_counts_the_label_maps(tmp_path, monkeypatch):
    src = make_fake_cocostuff(tmp_path / "src")
    www = tmp_path / "www"
    for split in ("train", "val"):
        pack(src / "images", [f"{split}2017"], www / f"{split}2017.zip")
    stuff = pack(src / "annotations", ["train2017", "val2017"], www / "stuffthingmaps.zip")
    with serve(www) as url:
        archives = {
            "train": (f"{url}/train2017.zip", None, "images"),
            "val": (f"{url}/val2017.zip", None, "images"),
            "stuffthingmaps": (f"{url}/{stuff.name}", None, "annotations"),
        }
        monkeypatch.setattr(COCOStuff, "archives", archives)
        monkeypatch.setattr(COCOStuff, "split_sizes", {"train": 3, "val": 2})
        dm = make(COCOStuff, tmp_path / "data", download=True)
        dm.prepare_data()
        dm.setup("fit")
        assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 3, "val": 2}
        # an incomplete stuffthingmaps archive is caught by counting (no published checksum)
        monkeypatch.setattr(COCOStuff, "split_sizes", {"train": 118287, "val": 5000})
        with pytest.raises(DataError, match=r"train2017: expected 118287 label maps.*found 3"):
            make(COCOStuff, tmp_path / "data2", download=True).prepare_data()


# ------------------------------------------------------------------------------ COCO instances
@pytest.fixture
def fake_coco(tmp_path):
    root = tmp_path / "coco"
    return root, make_fake_coco(root)


def category_lut() -> np.ndarray:
    """COCO category id -> contiguous class (1..80), background 0, crowd 255."""
    lut = np.full(256, 255, np.int64)
    lut[0] = 0
    lut[list(THING_IDS)] = np.arange(1, 81)
    return lut


def test_coco_classes():
    assert DATASETS["COCO"] is COCO
    assert len(COCO.class_names) == len(COCO.palette) == 81
    assert COCO.class_names[:3] == ("background", "person", "bicycle")
    assert COCO.class_names[-1] == "toothbrush" and "street sign" not in COCO.class_names


def test_coco_semantic_masks(fake_coco, tmp_path):
    root, expected = fake_coco
    before = sorted(root.rglob("*"))
    dm = make(COCO, root, crop_size=(32, 32))
    dm.prepare_data()  # builds the masks once
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 3, "val": 2}
    assert sorted(root.rglob("*")) == before  # the cache is not written next to the data
    cache = dm.datasets["val"].pairs[0][1].parent
    assert cache.is_relative_to(os.environ["SEGLIGHT_CACHE"])
    lut = category_lut()
    for split in ("train", "val"):
        for k, (image, _) in enumerate(dm.datasets[split].pairs):
            sample = dm.datasets[split].load(k)[1]
            assert np.array_equal(sample.numpy(), lut[expected[split][image.stem]]), image.name
    mask = dm.datasets["val"].load(0)[1].numpy()
    names = COCO.class_names
    assert names[mask[8, 8]] == "dog"  # the small dog inside the person: smaller wins
    assert names[mask[3, 3]] == "person" and mask[0, 0] == 0
    assert names[mask[10, 40]] == "toothbrush"  # from a polygon
    assert mask[27, 2] == 255  # crowd
    assert names[mask[32, 12]] == "car"  # an object inside a crowd region keeps its label
    assert (dm.datasets["val"].load(1)[1] == 0).all()  # image without annotations: background


def test_coco_alignment_under_augmentation(fake_coco):
    root, _ = fake_coco
    raw_values = [0, *THING_IDS, 255]
    torch.manual_seed(0)
    for scale, min_agree in (((1.0, 1.0), 0.99), ((0.75, 1.5), 0.8)):
        dm = make(COCO, root, crop_size=(36, 36), scale_range=scale, color_jitter=0.0)
        dm.setup("fit")
        for k in range(4):
            assert_aligned(dm.datasets["train"][k % 2], category_lut(), raw_values, min_agree)


def test_coco_cache_is_reused_and_rebuilt_when_the_json_changes(fake_coco, tmp_path):
    root, _ = fake_coco
    cache = tmp_path / "masks"
    dm = make(COCO, root, cache_dir=str(cache))
    dm.setup("validate")
    built = (cache / "semantic_val2017" / "000000000139.png").stat().st_mtime_ns
    make(COCO, root, cache_dir=str(cache)).setup("validate")
    assert (cache / "semantic_val2017" / "000000000139.png").stat().st_mtime_ns == built
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 18]  # no dog
    path.write_text(json.dumps(data))
    dm = make(COCO, root, cache_dir=str(cache))
    dm.setup("validate")
    assert COCO.class_names[dm.datasets["val"].load(0)[1][8, 8]] == "person"


def test_coco_errors(fake_coco, tmp_path):
    root, _ = fake_coco
    with pytest.raises(DataError, match=r"COCO not found at .*nowhere.*instances_"):
        make(COCO, tmp_path / "nowhere").setup("fit")
    (root / "val2017" / "000000000285.jpg").unlink()  # an incomplete download
    with pytest.raises(
        DataError, match=r"1 image\(s\) of .*instances_val2017.json.*000000000285.jpg"
    ):
        make(COCO, root).setup("validate")
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    data["categories"] = data["categories"][:-1]
    path.write_text(json.dumps(data))
    with pytest.raises(
        DataError, match=r"instances_train2017.json' does not have COCO's 80.*\[90\]"
    ):
        make(COCO, root).setup("fit")
    path.write_text('{"images": [')
    with pytest.raises(DataError, match=r"cannot read COCO annotations .*instances_train2017.json"):
        make(COCO, root).setup("fit")


def test_coco_download_fetches_only_what_is_missing(fake_coco, tmp_path, monkeypatch):
    root, _ = fake_coco
    www = tmp_path / "www"
    archive = pack(root, ["annotations"], www / "annotations_trainval2017.zip")
    for p in sorted((root / "annotations").iterdir()):
        p.unlink()
    (root / "annotations").rmdir()
    with serve(www) as url:
        # train2017.zip and val2017.zip are not on the server: asking for them would fail
        archives = {
            "train": (f"{url}/train2017.zip", None, ""),
            "val": (f"{url}/val2017.zip", None, ""),
            "annotations": (f"{url}/{archive.name}", f"sha256:{file_digest(archive)}", ""),
        }
        monkeypatch.setattr(COCO, "archives", archives)
        dm = make(COCO, root, download=True)
        dm.prepare_data()
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 3, "val": 2}
