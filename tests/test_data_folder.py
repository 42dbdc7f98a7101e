"""The Folder dataset (users' own data) on tiny fake folders: classes.yaml, index and colour masks,
list-file and seeded random splits, and the errors users meet first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_data_nyu_sun import COLOURS, blocky, decoded_classes

from seglight.data import Folder
from seglight.data.utils import index_to_rgb
from seglight.errors import ConfigError, DataError

CLASSES = ["background", "road", "car"]
PALETTE = [[0, 0, 0], [128, 64, 128], [64, 0, 128]]


def make_folder(root, n=8, mask_format="index", spec=None, size=(16, 20)):
    """root/classes.yaml, images/img_<i>.png (colour = COLOURS[class + 1], ignore = COLOURS[0])
    and masks/img_<i>.png: class indices with 255 = ignore, or colours (white = ignore)."""
    rng = np.random.default_rng(2)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    spec = spec or {"classes": CLASSES, "palette": PALETTE, "ignore_colors": [[255, 255, 255]]}
    (root / "classes.yaml").write_text(yaml.safe_dump(spec))
    masks = {}
    for i in range(n):
        mask = blocky(rng, 1, size, 3)[0].astype(np.uint8)
        mask[:4, :4] = 255
        image = COLOURS[np.where(mask == 255, 0, mask + 1)]
        Image.fromarray(image).save(root / "images" / f"img_{i}.png")
        if mask_format == "index":
            Image.fromarray(mask, mode="L").save(root / "masks" / f"img_{i}.png")
        else:
            colours = index_to_rgb(mask, PALETTE, ignore_color=(255, 255, 255))
            Image.fromarray(colours).save(root / "masks" / f"img_{i}.png")
        masks[f"img_{i}"] = mask
    return root, masks


def folder(root, **kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 2)
    return Folder(root=str(root), **kwargs)


def assert_aligned(sample):
    expected = torch.where(sample["mask"] == 255, 0, sample["mask"] + 1)
    assert torch.equal(decoded_classes(sample), expected)


@pytest.mark.parametrize("mask_format", ["index", "rgb"])
def test_folder_reads_classes_and_masks(tmp_path, mask_format):
    root, masks = make_folder(tmp_path / "d", mask_format=mask_format)
    dm = folder(root, mask_format=mask_format, val_fraction=0.25, crop_size=(8, 8))
    assert dm.class_names == tuple(CLASSES) and dm.num_classes == 3
    assert dm.palette == tuple(tuple(c) for c in PALETTE) and dm.ignore_index == 255
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (6, 2)
    assert dm.splits == ("train", "val")  # test_fraction 0: no test split
    for sample in (dm.datasets["val"][0], dm.datasets["val"][1]):
        assert torch.equal(sample["mask"], torch.from_numpy(masks[sample["name"]]).long())
        assert_aligned(sample)
    batch = next(iter(dm.train_dataloader()))
    assert batch["mask"].shape == (2, 8, 8)
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 255}


def test_folder_alignment_survives_augmentation(tmp_path):
    root, _ = make_folder(tmp_path / "d", mask_format="rgb")
    dm = folder(root, mask_format="rgb", crop_size=(8, 8), scale_range=(1.0, 1.0), color_jitter=0.0)
    dm.setup("fit")
    torch.manual_seed(0)
    for i in range(6):
        assert_aligned(dm.datasets["train"][i])


def test_folder_list_file_splits(tmp_path):
    root, _ = make_folder(tmp_path / "d")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("img_0\nimg_1.png\n\n# a comment\nimg_2  # why\n")
    (root / "splits" / "val.txt").write_text("img_3\n")
    (root / "splits" / "test.txt").write_text("img_4\nimg_5\n")
    dm = folder(root)
    assert dm.splits == ("train", "val", "test")
    dm.setup("fit")
    dm.setup("test")
    names = {s: [p[0].stem for p in d.pairs] for s, d in dm.datasets.items()}
    assert names == {
        "train": ["img_0", "img_1", "img_2"],
        "val": ["img_3"],
        "test": ["img_4", "img_5"],
    }
    (root / "splits" / "val.txt").write_text("img_3\nimg_99\n")
    with pytest.raises(DataError, match=r"val.txt: 1 name\(s\) have no image .*img_99"):
        folder(root).setup("fit")


def test_folder_random_split_is_seeded_disjoint_and_complete(tmp_path):
    root, masks = make_folder(tmp_path / "d", n=12)

    def split(seed):
        dm = folder(root, val_fraction=0.25, test_fraction=0.25, seed=seed)
        dm.setup("fit")
        dm.setup("test")
        return {s: {p[0].stem for p in d.pairs} for s, d in dm.datasets.items()}

    a = split(0)
    assert {s: len(v) for s, v in a.items()} == {"train": 6, "val": 3, "test": 3}
    assert a["train"] | a["val"] | a["test"] == set(masks) and not a["val"] & a["test"]
    assert split(0) == a and split(1) != a
    with pytest.raises(ConfigError, match="leave no training images"):
        folder(root, val_fraction=0.5, test_fraction=0.5)


def test_folder_raw_ignore_value_is_mapped_to_255(tmp_path):
    root, masks = make_folder(tmp_path / "d", spec={"classes": CLASSES, "ignore_index": 7})
    for stem, mask in masks.items():  # store void as 7 instead of 255
        Image.fromarray(np.where(mask == 255, 7, mask).astype(np.uint8)).save(
            root / "masks" / f"{stem}.png"
        )
    dm = folder(root)
    dm.setup("validate")
    sample = dm.datasets["val"][0]
    assert torch.equal(sample["mask"], torch.from_numpy(masks[sample["name"]]).long())


def test_folder_errors_name_the_problem(tmp_path):
    root, _ = make_folder(tmp_path / "rgb", mask_format="rgb")
    with pytest.raises(
        DataError, match=r"img_0.png' is a colour \(mode RGB\) image but mask_format is index"
    ):
        folder(root)
    root, _ = make_folder(tmp_path / "index")
    with pytest.raises(
        DataError, match=r"img_\d.png' is a single-channel L image; expected an RGB"
    ):
        folder(root, mask_format="rgb").setup("fit")
    (root / "classes.yaml").unlink()
    with pytest.raises(ConfigError, match=r"classes.yaml' not found: a Folder dataset needs"):
        folder(root)
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": CLASSES}))
    with pytest.raises(ConfigError, match="mask_format rgb needs a palette"):
        folder(root, mask_format="rgb")
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": CLASSES, "palette": PALETTE[:2]}))
    with pytest.raises(ConfigError, match=r"one \[r, g, b\] \(0..255\) per class \(3\)"):
        folder(root)
    with pytest.raises(ConfigError, match="mask_format must be one of"):
        folder(tmp_path / "index", mask_format="colour")


def test_folder_unknown_colour_names_file_colour_and_pixels(tmp_path):
    root, _ = make_folder(tmp_path / "d", mask_format="rgb")
    mask = np.array(Image.open(root / "masks" / "img_3.png"))
    mask[10:12, 10:13] = (1, 2, 3)
    Image.fromarray(mask).save(root / "masks" / "img_3.png")
    with pytest.raises(DataError, match=r"(?s)img_3.png'.*6 pixels .*\(1, 2, 3\) x 6 px"):
        folder(root, mask_format="rgb").setup("fit")
