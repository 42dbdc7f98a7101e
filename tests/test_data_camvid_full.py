"""CamVidFull: the full CamVid release (32-class colour masks) grouped into the 11 SegNet classes,
on a tiny fake copy of the release's layout; the split rule checked on the real SegNet split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CAMVID
from PIL import Image
from test_download import make_zip, server  # noqa: F401  (server: a local HTTP server fixture)

from seglight.data import CamVid, CamVidFull
from seglight.data import camvid_full as camvid_full_module
from seglight.data.camvid_full import CLASSES_32, PALETTE_32, grouping_lut, segnet_split
from seglight.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize
from seglight.errors import DataError

# frames of every sequence, on both sides of each split boundary
FRAMES = {
    "0001TP_008520": "train", "0001TP_008550": "test", "0006R0_f00930": "train",
    "0016E5_07957": "train", "0016E5_07959": "val", "0016E5_08159": "val",
    "0016E5_08161": "train", "Seq05VD_f00000": "test",
}  # fmt: skip


def make_fake_release(root, size=(12, 16)):
    """701_StillsRaw_full/<stem>.png, LabeledApproved_full/<stem>_L.png (32-class colours) and
    label_colors.txt, as on the CamVid page. Image colour i*8 encodes the 32-class index i."""
    rng = np.random.default_rng(3)
    (root / "701_StillsRaw_full").mkdir(parents=True)
    (root / "LabeledApproved_full").mkdir()
    lines = [f"{r} {g} {b}\t{name}" for name, (r, g, b), _ in CLASSES_32]
    (root / "label_colors.txt").write_text("\n".join(lines) + "\n")
    classes32 = {}
    for stem in FRAMES:
        index = rng.integers(0, 32, size=(size[0] // 4, size[1] // 4)).repeat(4, 0).repeat(4, 1)
        Image.fromarray(np.repeat(index[..., None] * 8, 3, -1).astype(np.uint8)).save(
            root / "701_StillsRaw_full" / f"{stem}.png"
        )
        colours = np.array(PALETTE_32, np.uint8)[index]
        Image.fromarray(colours).save(root / "LabeledApproved_full" / f"{stem}_L.png")
        classes32[stem] = index
    return root, classes32


def camvid_full(root, **kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 2)
    return CamVidFull(root=str(root), **kwargs)


def test_grouping_follows_segnet():
    lut = grouping_lut()
    group = {name: lut[i] for i, (name, _, _) in enumerate(CLASSES_32)}
    names = CamVid.class_names
    assert names[group["SUVPickupTruck"]] == "Car" and names[group["Child"]] == "Pedestrian"
    assert names[group["LaneMkgsDriv"]] == "Road" and names[group["RoadShoulder"]] == "Pavement"
    assert names[group["MotorcycleScooter"]] == "Bicyclist" and names[group["Wall"]] == "Building"
    assert group["Void"] == 255 and len(PALETTE_32) == len(set(PALETTE_32)) == 32
    assert sorted(set(lut[:32].tolist()) - {255}) == list(range(11))  # every class is fed


def test_camvid_full_splits_and_grouped_masks(tmp_path):
    root, classes32 = make_fake_release(tmp_path / "camvid")
    dm = camvid_full(root, crop_size=(8, 8))
    assert dm.class_names == CamVid.class_names and dm.palette == CamVid.palette
    dm.setup("fit")
    dm.setup("test")
    names = {s: sorted(p[0].stem for p in d.pairs) for s, d in dm.datasets.items()}
    assert names == {
        s: sorted(k for k, v in FRAMES.items() if v == s) for s in ("train", "val", "test")
    }
    lut = grouping_lut()
    for sample in (dm.datasets["test"][i] for i in range(2)):
        index32 = classes32[sample["name"]]
        assert torch.equal(sample["mask"], torch.from_numpy(lut[index32]).long())
    batch = next(iter(dm.train_dataloader()))
    assert batch["mask"].shape == (2, 8, 8)


def test_camvid_full_alignment_survives_augmentation(tmp_path):
    root, _ = make_fake_release(tmp_path / "camvid")
    dm = camvid_full(root, crop_size=(8, 8), scale_range=(1.0, 1.0), color_jitter=0.0)
    dm.setup("fit")
    lut = torch.from_numpy(grouping_lut()).long()
    torch.manual_seed(0)
    for i in range(4):
        sample = dm.datasets["train"][i]
        index32 = (denormalize(sample["image"], IMAGENET_MEAN, IMAGENET_STD)[0].long() + 4) // 8
        assert torch.equal(lut[index32], sample["mask"])


def test_camvid_full_errors(tmp_path):
    with pytest.raises(DataError, match=r"CamVid full release not found .*701_StillsRaw_full"):
        camvid_full(tmp_path / "nowhere").setup("fit")
    root, _ = make_fake_release(tmp_path / "camvid")
    mask_path = root / "LabeledApproved_full" / "0006R0_f00930_L.png"
    mask = np.array(Image.open(mask_path))
    mask[0, :2] = (10, 20, 30)
    Image.fromarray(mask).save(mask_path)
    with pytest.raises(DataError, match=r"(?s)0006R0_f00930_L.png'.*\(10, 20, 30\) x 2 px"):
        camvid_full(root).setup("fit")
    dm = camvid_full(root, strict_colours=False)  # unknown colours -> ignored
    dm.setup("fit")
    sample = next(
        s for s in map(dm.datasets["train"].__getitem__, range(4)) if s["name"] == "0006R0_f00930"
    )
    assert (sample["mask"][0, :2] == 255).all()
    (root / "label_colors.txt").write_text("64 128 64\tAnimal\n1 2 3\tMoon\n")
    with pytest.raises(DataError, match=r"label_colors.txt:2: 'Moon' \(1, 2, 3\) is not a class"):
        camvid_full(root).setup("fit")
    (root / "label_colors.txt").unlink()
    Image.new("RGB", (16, 12)).save(root / "701_StillsRaw_full" / "holiday.png")
    Image.new("RGB", (16, 12)).save(root / "LabeledApproved_full" / "holiday_L.png")
    with pytest.raises(DataError, match=r"1 image\(s\) .* are not CamVid frames .*holiday.png"):
        camvid_full(root).setup("fit")


@pytest.mark.skipif(not CAMVID.is_dir(), reason="real CamVid not available")
def test_split_rule_reproduces_the_segnet_split_files():
    counts = {}
    for split in ("train", "val", "test"):
        stems = [p.stem for p in (CAMVID / split).iterdir()]
        assert all(segnet_split(s) == split for s in stems), split
        counts[split] = len(stems)
    assert counts == {"train": 367, "val": 101, "test": 233}


def test_camvid_full_download_from_a_local_server(tmp_path, server, monkeypatch):  # noqa: F811
    src, _ = make_fake_release(tmp_path / "src")
    urls = {}
    for name in ("701_StillsRaw_full", "LabeledApproved_full"):
        prefix = f"{name}/" if name == "701_StillsRaw_full" else ""  # nested or flat: both
        files = {prefix + p.name: p.read_bytes() for p in (src / name).iterdir()}
        archive = make_zip(tmp_path / f"{name}.zip", files)
        urls[name] = server.add(archive.name, archive.read_bytes())
    text = (src / "label_colors.txt").read_bytes()
    urls["label_colors.txt"] = server.add("label_colors.txt", text)
    monkeypatch.setattr(camvid_full_module, "DOWNLOADS", urls)
    monkeypatch.setattr(camvid_full_module, "NUM_IMAGES", len(FRAMES))
    dm = camvid_full(tmp_path / "downloaded", download=True)
    dm.prepare_data()
    assert (tmp_path / "downloaded" / "label_colors.txt").read_bytes() == text
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (4, 2)
