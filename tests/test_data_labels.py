"""No silent loss of labels: mask values are read exactly as declared (binary 0/255 masks, a
classes.yaml ignore value other than 255), a class with no pixels in the training split stops
`fit`, and errors from DataLoader workers print as one line naming the file."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import make_fake_camvid
from PIL import Image

from seglight.cli import run as cli_run
from seglight.data import CamVid, Folder
from seglight.errors import DataError, user_error


def make_binary_folder(root, n=4, foreground=255, classes=("background", "lesion"), **spec):
    """root/classes.yaml + images/ + masks/ of 0/`foreground` masks (the usual medical format)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": list(classes), **spec}))
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = np.zeros((16, 16), np.uint8)
        top, left = rng.integers(0, 8, 2)
        mask[top : top + 8, left : left + 8] = foreground
        image = np.stack([mask, 255 - mask, mask // 2], -1)
        Image.fromarray(image).save(root / "images" / f"m{i}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"m{i}.png")
    return root


def fitting(dm):
    """What Trainer.fit sets on the datamodule before calling its setup."""
    dm.trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    return dm


def folder(root, **kwargs):
    return Folder(root=str(root), num_workers=0, batch_size=2, val_fraction=0.25, **kwargs)


def test_binary_0_255_masks_stop_fit_naming_the_class_and_the_fix(tmp_path):
    root = make_binary_folder(tmp_path / "d")
    folder(root).setup("fit")  # reading the data outside a fit is fine
    with pytest.raises(DataError) as e:
        fitting(folder(root)).setup("fit")
    message = str(e.value)
    assert "class 1 (lesion) has no pixels" in message
    assert "only the values 0 and 255" in message and "value_map: {255: 1}" in message
    # the same from the cache of the first check (the counts are cached with it)
    with pytest.raises(DataError, match="class 1 \\(lesion\\) has no pixels"):
        fitting(folder(root)).setup("fit")


@pytest.mark.parametrize("option", [{"value_map": {255: 1}}, {"mask_format": "binary"}])
def test_value_map_and_binary_format_read_255_as_class_1(tmp_path, option):
    root = make_binary_folder(tmp_path / "d")
    dm = fitting(folder(root, **option))
    dm.setup("fit")
    masks = [dm.datasets["train"].load(i)[1] for i in range(len(dm.datasets["train"]))]
    raw = [np.array(Image.open(p)) for _, p in dm.datasets["train"].pairs]
    for mask, r in zip(masks, raw, strict=True):
        assert torch.equal(mask.long(), torch.from_numpy((r == 255).astype(np.int64)))


def test_cli_fit_stops_on_binary_masks_and_trains_with_value_map(tmp_path, monkeypatch):
    root = make_binary_folder(tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    args = [
        "fit", "--model", "UNet", "--model.encoder", "original", "--model.base_channels", "4",
        "--data", "Folder", "--data.root", str(root), "--data.num_workers", "0",
        "--data.batch_size", "2", "--data.val_fraction", "0.25",
        "--trainer.fast_dev_run", "true", "--trainer.accelerator", "cpu",
    ]  # fmt: skip
    with pytest.raises(DataError, match="class 1 \\(lesion\\) has no pixels"):
        cli_run(args)
    cli = cli_run([*args, "--data.value_map", "{255: 1}"])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1


def test_declared_ignore_value_means_exactly_that_value(tmp_path):
    """ignore_index: 7 in classes.yaml: 7 is ignored, a raw 255 is an error naming the file and
    the dataset's ignore value (not silently ignored as before)."""
    root = make_binary_folder(tmp_path / "d", foreground=1, ignore_index=7)
    bad = root / "masks" / "m0.png"
    mask = np.array(Image.open(bad))
    mask[0, 0], mask[0, 1] = 7, 255
    Image.fromarray(mask).save(bad)
    with pytest.raises(DataError) as e:
        folder(root).setup("fit")
    assert "m0.png' has values [255]" in str(e.value)
    assert "ignore value (7)" in str(e.value)
    mask[0, 1] = 7
    Image.fromarray(mask).save(bad)
    dm = fitting(folder(root))
    dm.setup("fit")
    for split in ("train", "val"):
        for i, (_, path) in enumerate(dm.datasets[split].pairs):
            if path == bad:
                loaded = dm.datasets[split].load(i)[1]
                assert loaded[0, 0] == 255 and loaded[0, 1] == 255 and loaded.max() == 255


def test_an_absent_class_in_a_tiny_subset_can_be_allowed(tmp_path):
    root = make_binary_folder(tmp_path / "d", foreground=1, classes=("bg", "fg", "rare"))
    with pytest.raises(DataError, match="class 2 \\(rare\\) has no pixels") as e:
        fitting(folder(root)).setup("fit")
    assert "value_map" not in str(e.value)  # not 0/255 masks: no binary-mask hint
    fitting(folder(root, allow_empty_classes=True)).setup("fit")


# ------------------------------------------------------------------------ errors in workers
def test_an_unreadable_image_in_a_loader_worker_is_one_line(tmp_path):
    root = make_fake_camvid(tmp_path / "camvid", {"train": 2, "val": 1, "test": 1})
    broken = sorted((root / "train").glob("*.jpg"))[0]
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # the header is intact: only decoding fails
    # (the check before training finds a cut-off file: off here, so that a worker meets it)
    dm = CamVid(root=str(root), batch_size=2, num_workers=2, crop_size=(16, 16), check_masks=False)
    dm.setup("fit")
    with pytest.raises(Exception) as e:
        next(iter(dm.train_dataloader()))
    error = user_error(e.value)
    assert isinstance(error, DataError)
    message = str(error)
    assert message.startswith(f"cannot decode image {str(broken)!r}") and "\n" not in message
    assert "Traceback" in error.worker_traceback  # kept for debugging


def test_an_image_whose_header_is_broken_is_reported_as_an_image(tmp_path):
    root = make_fake_camvid(tmp_path / "camvid", {"train": 2, "val": 1, "test": 1})
    broken = sorted((root / "train").glob("*.jpg"))[0]
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.raises(DataError) as e:
        CamVid(root=str(root), num_workers=0).setup("fit")
    assert "image/mask pairs are invalid" in str(e.value) and "masks are invalid" not in str(
        e.value
    )
    assert f"cannot read image {str(broken)!r}" in str(e.value)
