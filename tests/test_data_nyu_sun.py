"""NYUDv2 and SUN RGB-D on tiny fake copies in the official layouts: the v7.3 .mat file (HDF5,
MATLAB's transposed axes), splits.mat, classMapping40.mat / labels40.mat, and the pre-extracted
SUN RGB-D folders with their numbering."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_download import make_tar, server  # noqa: F401  (server: a local HTTP server fixture)

from seglight.data import SUNRGBD, NYUDv2, nyudv2, sunrgbd
from seglight.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize
from seglight.errors import DataError

# colour of "label value v" (0 = unlabelled): far apart, so JPEG noise cannot confuse them
COLOURS = np.array([(i * 37 % 256, i * 89 % 256, i * 151 % 256) for i in range(64)], np.uint8)


def blocky(rng, n: int, size: tuple[int, int], high: int, block: int = 4) -> np.ndarray:
    """n label maps [n, H, W] of block x block squares of values in [0, high)."""
    h, w = size
    small = rng.integers(0, high, size=(n, -(-h // block), -(-w // block)))
    return small.repeat(block, 1).repeat(block, 2)[:, :h, :w]


def decoded_classes(sample: dict) -> torch.Tensor:
    """Per pixel, the label value whose colour is nearest to the (denormalised) image colour."""
    image = denormalize(sample["image"], IMAGENET_MEAN, IMAGENET_STD).permute(1, 2, 0).int()
    dist = (image[:, :, None, :] - torch.from_numpy(COLOURS).int()).abs().sum(-1)
    return dist.argmin(-1)


def assert_aligned(sample: dict, min_agreement: float = 1.0) -> None:
    """Image colours encode the raw label: check the mask says the same, pixel for pixel
    (label value v <-> class v - 1, 0 <-> ignore)."""
    mask = sample["mask"]
    expected = torch.where(mask == 255, 0, mask + 1)
    agreement = (decoded_classes(sample) == expected).float().mean().item()
    assert agreement >= min_agreement, f"image and mask agree on only {agreement:.1%} of pixels"


# ------------------------------------------------------------------------------- NYUDv2
def make_fake_nyu(root, n=6, size=(12, 16), train=(1, 3, 4, 6), test=(2, 5), labels40=False):
    """The official NYUDv2 files: a MATLAB v7.3 (HDF5 with a 512-byte header) labelled set with
    MATLAB's reversed axes, splits.mat (1-based), and classMapping40.mat or labels40.mat."""
    h5py = pytest.importorskip("h5py")
    sio = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    raw = blocky(rng, n, size, 895).astype(np.uint16)  # the 894 NYU labels, 0 = unlabelled
    raw[:, :4, :4] = 0
    map_class = rng.integers(1, 41, size=894)
    label40 = np.concatenate([[0], map_class])[raw]  # [n, H, W] in 0..40
    images = COLOURS[label40]  # [n, H, W, 3]
    path = root / "nyu_depth_v2_labeled.mat"
    with h5py.File(path, "w", userblock_size=512) as f:
        f["images"] = images.transpose(0, 3, 2, 1)  # MATLAB H x W x 3 x N, seen reversed
        f["labels"] = raw.transpose(0, 2, 1)  # H x W x N
        f["depths"] = rng.random((n, size[1], size[0])).astype(np.float32)
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan 1 2012 HDF5 schema")
    sio.savemat(root / "splits.mat", {
        "trainNdxs": np.array(train, float)[:, None], "testNdxs": np.array(test, float)[:, None],
    })  # fmt: skip
    if labels40:
        sio.savemat(
            root / "labels40.mat", {"labels40": label40.transpose(1, 2, 0).astype(np.uint8)}
        )
    else:
        names = np.array([f"class{i}" for i in range(1, 41)], dtype=object)
        sio.savemat(root / "classMapping40.mat", {
            "mapClass": map_class[None, :].astype(float), "className": names[None, :],
        })  # fmt: skip
    return root, label40


def nyu(root, **kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 2)
    return NYUDv2(root=str(root), **kwargs)


@pytest.mark.parametrize("labels40", [False, True], ids=["classMapping40", "labels40"])
def test_nyu_splits_classes_and_ignore_mapping(tmp_path, labels40):
    root, label40 = make_fake_nyu(tmp_path / "nyu", labels40=labels40)
    dm = nyu(root, crop_size=(8, 8))
    assert (
        dm.num_classes == 40 and dm.class_names[0] == "wall" and dm.class_names[-1] == "otherprop"
    )
    assert len(set(dm.palette)) == 40
    dm.setup("fit")
    dm.setup("test")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 4, "val": 2, "test": 2}
    assert [p[0].stem for p in dm.datasets["train"].pairs] == ["0001", "0003", "0004", "0006"]
    assert [p[0].stem for p in dm.datasets["test"].pairs] == ["0002", "0005"]
    for i, number in enumerate((2, 5)):
        sample = dm.datasets["test"][i]
        assert sample["image"].shape == (3, 12, 16) and sample["name"] == f"{number:04d}"
        # label 0 -> 255, 1..40 -> 0..39, in the image's orientation (H x W, not W x H)
        expected = np.where(label40[number - 1] == 0, 255, label40[number - 1] - 1)
        assert torch.equal(sample["mask"], torch.from_numpy(expected).long())
        assert_aligned(sample)


def test_nyu_image_and_mask_stay_aligned_through_augmentation_and_workers(tmp_path):
    root, _ = make_fake_nyu(tmp_path / "nyu")
    dm = nyu(root, crop_size=(8, 8), scale_range=(1.0, 1.0), color_jitter=0.0, num_workers=1)
    dm.setup("fit")
    torch.manual_seed(0)
    for _ in range(4):  # random crops and flips
        assert_aligned(dm.datasets["train"][0])
    batch = next(iter(dm.train_dataloader()))  # decoded PNGs: no h5py handle in the worker
    assert batch["image"].shape == (2, 3, 8, 8) and batch["mask"].shape == (2, 8, 8)
    for i in range(2):
        assert_aligned({"image": batch["image"][i], "mask": batch["mask"][i]})


def test_nyu_decodes_once_and_again_when_the_mat_file_changes(tmp_path):
    root, _ = make_fake_nyu(tmp_path / "nyu")
    nyu(root).setup("test")
    image_dir, _ = nyu(root)._decoded()
    stamp = (image_dir / "0002.png").stat().st_mtime_ns
    nyu(root).setup("test")
    assert (image_dir / "0002.png").stat().st_mtime_ns == stamp
    make_fake_nyu(tmp_path / "nyu", train=(1, 2), test=(3,))  # rewritten: new mtime
    dm = nyu(root)
    dm.setup("test")
    assert (image_dir / "0002.png").stat().st_mtime_ns != stamp
    assert [p[0].stem for p in dm.datasets["test"].pairs] == ["0003"]


def test_nyu_missing_files_and_bad_splits_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"NYUDv2 not found at .*missing nyu_depth_v2_labeled.mat"):
        nyu(tmp_path / "nowhere").setup("fit")
    root, _ = make_fake_nyu(tmp_path / "nyu", test=(2, 9))
    with pytest.raises(DataError, match=r"splits.mat: testNdxs holds \[9\], outside the 1..6"):
        nyu(root).setup("test")
    (root / "classMapping40.mat").unlink()
    with pytest.raises(DataError, match=r"missing classMapping40.mat \(or labels40.mat\)"):
        nyu(root).setup("test")


# ------------------------------------------------------------------------------- SUN RGB-D
def make_fake_sun(root, n_train=4, n_test=3):
    """The pre-extracted SUN RGB-D folders: train and test images numbered from 1, one label
    folder where test image k is img-k.png and train image k is img-(k + 5050).png. Images come
    in two sizes (the sensors differ); label maps hold 0..37."""
    rng = np.random.default_rng(1)
    for folder in ("SUNRGBD-train_images", "SUNRGBD-test_images", "sunrgbd_train_test_labels"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    labels = {}
    for split, n, offset in (("train", n_train, 5050), ("test", n_test, 0)):
        for k in range(1, n + 1):
            size = (16, 24) if k % 2 else (24, 32)
            label = blocky(rng, 1, size, 38, block=8)[0].astype(np.uint8)
            label[:8, :8] = 0
            folder = f"SUNRGBD-{split}_images"
            Image.fromarray(COLOURS[label]).save(
                root / folder / f"img-{k:06d}.jpg", quality=98, subsampling=0
            )
            path = root / "sunrgbd_train_test_labels" / f"img-{k + offset:06d}.png"
            Image.fromarray(label, mode="L").save(path)
            labels[(split, k)] = label
    return root, labels


def sun(root, **kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 2)
    return SUNRGBD(root=str(root), **kwargs)


def test_sun_layout_numbering_and_ignore_mapping(tmp_path):
    root, labels = make_fake_sun(tmp_path / "sun")
    dm = sun(root, crop_size=(16, 16))
    assert dm.num_classes == 37 and dm.class_names[:2] == ("wall", "floor")
    assert dm.class_names[-1] == "bag"
    dm.setup("fit")
    dm.setup("test")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 4, "val": 3, "test": 3}
    image, label = dm.datasets["train"].pairs[1]
    assert (image.name, label.name) == ("img-000002.jpg", "img-005052.png")
    for split in ("train", "test"):
        for k in (1, 2):
            ds = dm.datasets[split] if split == "test" else dm.build_dataset("train", False)
            sample = ds[k - 1]
            raw = labels[(split, k)]
            assert sample["mask"].shape == raw.shape  # sizes differ between images
            assert torch.equal(
                sample["mask"], torch.from_numpy(np.where(raw == 0, 255, raw - 1)).long()
            )
            assert_aligned(sample, min_agreement=0.98)  # JPEG images: a few edge pixels differ
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16)
    assert set(batch["mask"].unique().tolist()) <= set(range(37)) | {255}


def test_sun_image_and_mask_stay_aligned_through_augmentation(tmp_path):
    root, _ = make_fake_sun(tmp_path / "sun")
    dm = sun(root, crop_size=(16, 16), scale_range=(1.0, 1.0), color_jitter=0.0)
    dm.setup("fit")
    torch.manual_seed(0)
    for i in range(4):
        assert_aligned(dm.datasets["train"][i], min_agreement=0.98)


def test_sun_missing_label_and_folder_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"SUN RGB-D not found .*SUNRGBD-train_images"):
        sun(tmp_path / "nowhere").setup("fit")
    root, _ = make_fake_sun(tmp_path / "sun")
    (root / "sunrgbd_train_test_labels" / "img-005053.png").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) .* img-000003.jpg -> img-005053.png"):
        sun(root).setup("fit")
    # a label value above 37 is reported with its file
    Image.fromarray(np.full((16, 24), 40, np.uint8)).save(
        root / "sunrgbd_train_test_labels" / "img-000001.png"
    )
    with pytest.raises(DataError, match=r"img-000001.png' has values \[40\]"):
        sun(root).setup("test")


# ------------------------------------------------------------------------------- downloads
def test_nyu_download_from_a_local_server(tmp_path, server, monkeypatch):  # noqa: F811
    src, _ = make_fake_nyu(tmp_path / "src")
    names = (nyudv2.MAT, nyudv2.SPLITS, nyudv2.MAPPING)
    monkeypatch.setattr(nyudv2, "URLS", {n: server.add(n, (src / n).read_bytes()) for n in names})
    dm = nyu(tmp_path / "downloaded", download=True)
    with pytest.raises(DataError, match=r"hold \{'images': 6, 'trainNdxs': 4, 'testNdxs': 2\}"):
        dm.prepare_data()  # not the 1,449 images of the real file
    assert not any((tmp_path / "downloaded").iterdir())  # not left to be trusted next time
    monkeypatch.setattr(nyudv2, "SIZES", {"images": 6, "trainNdxs": 4, "testNdxs": 2})
    dm.prepare_data()
    assert sorted(p.name for p in (tmp_path / "downloaded").iterdir()) == sorted(names)
    dm.setup("test")
    assert len(dm.datasets["test"]) == 2
    assert_aligned(dm.datasets["test"][1])


def test_sun_download_from_a_local_server(tmp_path, server, monkeypatch):  # noqa: F811
    src, _ = make_fake_sun(tmp_path / "src")
    urls = {}
    for folder in (sunrgbd.TRAIN_IMAGES, sunrgbd.TEST_IMAGES, sunrgbd.LABELS):
        prefix = f"{folder}/" if folder == sunrgbd.TRAIN_IMAGES else ""  # nested or flat: both
        files = {prefix + p.name: p.read_bytes() for p in (src / folder).iterdir()}
        archive = make_tar(tmp_path / f"{folder}.tgz", files)
        urls[folder] = server.add(archive.name, archive.read_bytes())
    monkeypatch.setattr(sunrgbd, "URLS", urls)
    sizes = {sunrgbd.TRAIN_IMAGES: 4, sunrgbd.TEST_IMAGES: 3, sunrgbd.LABELS: 10335}
    monkeypatch.setattr(sunrgbd, "SIZES", sizes)
    dm = sun(tmp_path / "downloaded", download=True)
    with pytest.raises(DataError, match=r"expected 10335 img-\*.\* files, found 7"):
        dm.prepare_data()  # an incomplete archive is refused, and not moved into place
    assert not (tmp_path / "downloaded" / sunrgbd.LABELS).exists()
    assert not (tmp_path / "downloaded" / f"{sunrgbd.LABELS}.tgz").exists()
    monkeypatch.setattr(sunrgbd, "SIZES", {**sizes, sunrgbd.LABELS: 7})
    dm.prepare_data()
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 4, "val": 3}
