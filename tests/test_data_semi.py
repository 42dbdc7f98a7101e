"""SemiSupervised: the labelled subset (fraction, count, split list), its record, unlabelled masks
never opened, image-level labels, the combined batches, and clear errors on bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, make_fake_camvid
from fakes_zoo import make_fake_sbd, make_fake_voc
from PIL import Image

from seglight.data import VOC, CamVid, SemiSupervised, Synthetic
from seglight.data.base import masks_optional
from seglight.data.semi import LABELED_FILE, read_split_list
from seglight.errors import ConfigError, DataError
from seglight.models import UNet

NAMES = [f"0001TP_train_{i:04d}" for i in range(8)]


@pytest.fixture
def camvid(tmp_path) -> Path:
    return make_fake_camvid(tmp_path / "camvid", {"train": 8, "val": 2, "test": 2}, size=(24, 32))


def semi(root: Path, **kwargs) -> SemiSupervised:
    options = {"crop_size": (16, 16), "batch_size": 2, "num_workers": 0, "root": str(root)}
    return SemiSupervised(CamVid(), **{**options, **kwargs})


def train_batches(dm: SemiSupervised) -> list[dict]:
    dm.setup("fit")
    loader = dm.train_dataloader()
    iter(loader)  # CombinedLoader needs iter() before len()
    return list(loader)


def test_unlabelled_masks_are_never_opened(camvid):
    split = camvid / "labeled.txt"
    split.write_text("0001TP_train_0001\n0001TP_train_0004\n")
    for name in NAMES:  # every other mask is corrupt or gone: opening one would raise
        if name not in ("0001TP_train_0001", "0001TP_train_0004"):
            (camvid / "trainannot" / f"{name}.png").write_bytes(b"not a png")
    (camvid / "trainannot" / "0001TP_train_0007.png").unlink()
    dm = semi(camvid, labeled_split=str(split))
    batches = train_batches(dm)
    assert len(batches) == 3  # max_size_cycle: a pass over the 6 unlabelled images, 2 per batch
    for batch, _, _ in batches:
        labeled, unlabeled = batch["labeled"], batch["unlabeled"]
        assert set(labeled["name"]) <= {"0001TP_train_0001", "0001TP_train_0004"}
        assert not set(unlabeled["name"]) & {"0001TP_train_0001", "0001TP_train_0004"}
        assert (unlabeled["mask"] == 255).all()  # no label reaches a method
        assert "heldout_mask" not in unlabeled  # the monitor's masks: off by default
        assert unlabeled["valid"].dtype == torch.bool and unlabeled["valid"].shape == (2, 16, 16)
        assert (labeled["mask"] != 255).any()
        assert unlabeled["image"].shape == labeled["image"].shape == (2, 3, 16, 16)
    seen = {n for b, _, _ in batches for n in b["unlabeled"]["name"]}
    assert len(seen) == 6


def test_valid_marks_the_crop_padding(camvid):
    # crops larger than the images: the padding is not valid, the image is
    dm = semi(camvid, labeled=2, crop_size=(40, 40))
    dm.dataset.scale_range, dm.dataset.hflip = (1.0, 1.0), False
    unlabeled = train_batches(dm)[0][0]["unlabeled"]
    assert unlabeled["valid"][:, :24, :32].all() and not unlabeled["valid"][:, 24:, :].any()


def test_held_out_masks_follow_the_image_and_change_no_draw(camvid):
    """monitor_unlabeled_masks: each unlabelled sample's "heldout_mask" is its real mask scaled,
    cropped and flipped as its image (as the labelled path does with the same draws), "mask"
    stays all-ignore, the images are those of a run without it, and an image without a mask
    gets an all-ignore one."""
    (camvid / "trainannot" / "0001TP_train_0005.png").unlink()  # never labelled: no mask
    off, on = semi(camvid, labeled=2), semi(camvid, labeled=2, monitor_unlabeled_masks=True)
    for dm in (off, on):
        dm.setup("fit")
    with masks_optional():  # the wrapped split, masks and all
        full = on.dataset.build_dataset("train", train=True)
    index = {image.stem: i for i, (image, _) in enumerate(full.pairs)}
    for i in range(len(on.datasets["unlabeled"])):
        samples = []
        for dataset in (on.datasets["unlabeled"], off.datasets["unlabeled"]):
            torch.manual_seed(i)
            samples.append(dataset[i])
        sample, plain = samples
        assert torch.equal(sample["image"], plain["image"]) and "heldout_mask" not in plain
        assert torch.equal(sample["valid"], plain["valid"])
        assert (sample["mask"] == 255).all() and sample["heldout_mask"].dtype == torch.long
        if sample["name"] == "0001TP_train_0005":
            assert (sample["heldout_mask"] == 255).all()
            continue
        torch.manual_seed(i)
        labelled = full[index[sample["name"]]]
        assert torch.equal(sample["image"], labelled["image"])
        assert torch.equal(sample["heldout_mask"], labelled["mask"])
        assert (sample["heldout_mask"] != 255).any()
    batch = train_batches(on)[0][0]
    assert batch["unlabeled"]["heldout_mask"].shape == (2, 16, 16)
    assert "heldout_mask" not in batch["labeled"]
    generated = SemiSupervised(
        Synthetic(num_train=6, num_val=2, num_test=2, image_size=(16, 16), batch_size=2),
        labeled=2,
        monitor_unlabeled_masks=True,
    )
    unlabeled = train_batches(generated)[0][0]["unlabeled"]
    assert (unlabeled["mask"] == 255).all() and (unlabeled["heldout_mask"] != 255).any()


def test_labelled_choice_is_seeded_recorded_and_reusable(camvid, tmp_path):
    a, b, c = (semi(camvid, labeled=3, seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup("fit")
    assert a.labeled_names == b.labeled_names and len(a.labeled_names) == 3
    assert a.labeled_names != c.labeled_names
    # a fit writes the choice into the run directory; it is a valid labeled_split
    run_dir = tmp_path / "run"
    dm = semi(camvid, labeled=0.375, seed=5)  # 3 of 8
    model = UNet(num_classes=11, encoder="original", base_channels=4)
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
        default_root_dir=str(run_dir),
    )  # fmt: skip
    trainer.fit(model, dm)  # a plain model trains on the labelled part of the batch
    assert trainer.global_step == 1
    recorded = read_split_list(run_dir / LABELED_FILE)
    assert recorded == dm.labeled_names and len(recorded) == 3
    again = semi(camvid, labeled_split=str(run_dir / LABELED_FILE))
    again.setup("fit")
    assert again.labeled_names == recorded


def test_split_list_forms_and_counts(camvid):
    split = camvid / "list.txt"
    # the literature's list forms: bare names, or "image_path mask_path" lines
    split.write_text(
        "# comment\nJPEGImages/0001TP_train_0002.jpg Seg/0001TP_train_0002.png\n\n0001TP_train_0005\n"
    )
    dm = semi(camvid, labeled_split=str(split))
    dm.setup("fit")
    assert dm.labeled_names == ["0001TP_train_0002", "0001TP_train_0005"]
    for labeled, count in ((1, 1), (8, 8), (0.125, 1), (0.5, 4), (1.0, 8)):
        dm = semi(camvid, labeled=labeled)
        dm.setup("fit")
        assert len(dm.labeled_names) == count, labeled
        assert len(dm.datasets["unlabeled"]) == 8 - count


def test_voc_protocol_draws_unlabelled_images_from_train_aug():
    # UniMatch (github.com/LiheYoung/UniMatch) splits/pascal/<n>/unlabeled.txt: the unlabelled
    # images are the rest of the 10,582-image augmented set, not of VOC's 1,464
    config = yaml.safe_load((REPO / "experiments/semi_voc/defaults.yaml").read_text())
    args = config["data"]["init_args"]
    assert args["dataset"]["init_args"]["train_split"] == "train_aug"
    assert args["labeled_split"] == "splits/pascal/183/labeled.txt"
    assert args["unlabeled_split"] == "splits/pascal/183/unlabeled.txt"  # the same split's


def test_unimatch_lists_are_read_as_they_are(tmp_path):
    # VOC 2012 + SBD in their real layout; UniMatch's lists (splits/pascal/<n>/{labeled,
    # unlabeled}.txt) hold "JPEGImages/x.jpg SegmentationClass/x.png" lines, the last one
    # without a final newline
    root = make_fake_voc(
        tmp_path / "voc", ["2007_000032", "2007_000039", "2008_000008"], ["2007_000033"]
    )
    make_fake_sbd(root, ["2008_000002", "2008_000003"], ["2011_000003"])
    lists = tmp_path / "splits" / "pascal" / "1"
    lists.mkdir(parents=True)

    def unimatch(path: Path, names: list[str]) -> str:
        path.write_text("\n".join(f"JPEGImages/{n}.jpg SegmentationClass/{n}.png" for n in names))
        return str(path)

    unlabelled = ["2011_000003", "2007_000032", "2008_000002", "2008_000008"]  # not 2008_000003
    dm = SemiSupervised(
        VOC(train_split="train_aug", cache_dir=str(tmp_path / "cache")),
        labeled_split=unimatch(lists / "labeled.txt", ["2007_000039"]),
        unlabeled_split=unimatch(lists / "unlabeled.txt", unlabelled),
        root=str(root), crop_size=(16, 16), batch_size=2, num_workers=0,
    )  # fmt: skip
    dm.setup("fit")
    assert dm.labeled_names == ["2007_000039"]
    pool = dm.datasets["unlabeled"]
    assert [image.stem for image, _ in pool.pairs] == unlabelled  # exactly the list, last included
    assert all(mask is None for _, mask in pool.pairs)  # unlabelled: no mask is opened
    # the lists must be a pair, and name images of the train split
    bad = unimatch(lists / "overlap.txt", ["2008_000002", "2007_000039"])
    with pytest.raises(DataError, match=r"unlabeled_split .*overlap\.txt' lists 1 labelled image"):
        SemiSupervised(
            VOC(train_split="train_aug", cache_dir=str(tmp_path / "cache")),
            labeled_split=str(lists / "labeled.txt"), unlabeled_split=bad, root=str(root),
        ).setup("fit")  # fmt: skip
    with pytest.raises(
        DataError, match=r"unlabeled_split .*not in the VOC train split.*2007_000033"
    ):
        SemiSupervised(
            VOC(cache_dir=str(tmp_path / "cache")),  # train: VOC's 1,464, not train_aug
            labeled_split=str(lists / "labeled.txt"),
            unlabeled_split=unimatch(lists / "val.txt", ["2007_000032", "2007_000033"]),
            root=str(root),
        ).setup("fit")


def test_everything_else_is_the_wrapped_dataset(camvid):
    dm = semi(camvid, labeled=2)
    plain = CamVid(root=str(camvid), num_workers=0, batch_size=2)
    assert (dm.num_classes, dm.class_names, dm.palette, dm.ignore_index) == (
        plain.num_classes, plain.class_names, plain.palette, plain.ignore_index
    )  # fmt: skip
    dm.setup("validate")
    plain.setup("validate")
    ours, theirs = next(iter(dm.val_dataloader())), next(iter(plain.val_dataloader()))
    assert ours["name"] == theirs["name"]
    assert torch.equal(ours["image"], theirs["image"]) and torch.equal(ours["mask"], theirs["mask"])
    assert dm.batch_size == 2 and dm.dataset.crop_size == (16, 16)


def test_image_level_labels_from_masks_and_from_a_file(camvid):
    mask = np.zeros((24, 32), dtype=np.uint8)
    mask[:, 16:] = 3
    mask[0, 0] = 11  # void: not a class
    Image.fromarray(mask).save(camvid / "trainannot" / "0001TP_train_0000.png")
    (camvid / "labeled.txt").write_text("0001TP_train_0000\n")
    table = {name: ["Sky", "Car"] for name in NAMES[1:]}
    (camvid / "image_labels.json").write_text(json.dumps(table))
    dm = semi(camvid, labeled_split=str(camvid / "labeled.txt"), image_labels="image_labels.json")
    dm.setup("fit")
    labelled = dm.datasets["train"][0]["image_labels"]
    assert labelled.tolist() == [1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]  # Sky (0) and Road (3)
    unlabelled = dm.datasets["unlabeled"][0]["image_labels"]
    assert unlabelled.nonzero().flatten().tolist() == [0, 8]  # Sky, Car
    batch = train_batches(dm)[0][0]
    assert batch["labeled"]["image_labels"].shape == (1, 11)
    assert batch["unlabeled"]["image_labels"].shape == (2, 11)


def test_generated_data_works_too():
    dm = SemiSupervised(
        Synthetic(num_train=6, num_val=2, num_test=2, image_size=(16, 16), batch_size=2),
        labeled=2,
    )
    batch = train_batches(dm)[0][0]
    assert (batch["unlabeled"]["mask"] == 255).all()
    assert batch["labeled"]["image_labels"].shape == (2, 5)
    assert len(dm.labeled_names) == 2


# ----------------------------------------------------------------------------- bad input
def test_bad_labelled_amounts_are_clear(camvid):
    for bad in (1.5, 0.0, -0.1, 0, -3):
        with pytest.raises(ConfigError, match=rf"labeled={bad!r} must be a fraction in \(0, 1\]"):
            semi(camvid, labeled=bad)
    with pytest.raises(ConfigError, match="exactly one of labeled"):
        semi(camvid)
    with pytest.raises(DataError, match="labeled=9 but the CamVid train split has 8 images"):
        semi(camvid, labeled=9).setup("fit")


def test_split_list_naming_a_missing_image_is_clear(camvid):
    split = camvid / "bad.txt"
    split.write_text("0001TP_train_0001\nno_such_image\n")
    with pytest.raises(DataError, match=r"bad\.txt.*1 listed image\(s\) not in .*'no_such_image'"):
        semi(camvid, labeled_split=str(split)).setup("fit")
    with pytest.raises(ConfigError, match="labeled_split: cannot read .*nothing.txt"):
        semi(camvid, labeled_split=str(camvid / "nothing.txt")).setup("fit")


def test_a_class_missing_from_the_labelled_images_is_named(camvid):
    mask = np.zeros((24, 32), dtype=np.uint8)
    mask[:, 10:] = 1
    Image.fromarray(mask).save(camvid / "trainannot" / "0001TP_train_0003.png")
    (camvid / "one.txt").write_text("0001TP_train_0003\n")
    with pytest.warns(UserWarning, match="no pixel of class.*'Pole'.*'Bicyclist'"):
        semi(camvid, labeled_split=str(camvid / "one.txt")).setup("fit")
    with warnings.catch_warnings():  # all classes present: no warning
        warnings.simplefilter("error", UserWarning)  # ours; not libraries' deprecations
        semi(camvid, labeled=8).setup("fit")


def test_image_labels_with_unknown_classes_or_gaps_are_clear(camvid):
    (camvid / "labels.json").write_text(json.dumps({n: ["Sky", "Spaceship"] for n in NAMES}))
    with pytest.raises(DataError, match=r"labels\.json.*unknown class 'Spaceship'"):
        semi(camvid, labeled=2, image_labels=str(camvid / "labels.json")).setup("fit")
    (camvid / "labels.json").write_text(json.dumps({NAMES[0]: ["Sky"]}))
    with pytest.raises(DataError, match=r"labels\.json' has no entry for \d unlabelled image"):
        semi(camvid, labeled=1, image_labels=str(camvid / "labels.json")).setup("fit")
