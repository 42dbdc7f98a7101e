"""What stops a run at its start, in one line and before anything is written: data with one
class, semi-supervised settings that leave nothing unlabelled or name other images, instance
folders without instances, broken image files."""

from __future__ import annotations

from pathlib import Path

import pytest

import seglight.methods  # noqa: F401 - the methods register in MODELS
from seglight.cli import main
from seglight.errors import ConfigError
from seglight.models.base import MODELS

TRAINER = ["--trainer.logger", "false", "--trainer.max_steps", "2", "--threads", "1",
           "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false"]  # fmt: skip
QUICK = ["--model", "UNet", "--model.encoder", "original", "--model.base_channels", "4", *TRAINER]


def cli_error(capsys, argv: list[str]) -> str:
    """The one-line error `seglight ARGV` stops with (exit status 2)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def assert_nothing_written(cwd: Path) -> None:
    """No run directory, and no runs/ folder either (the test's working directory is new)."""
    assert not (Path(cwd) / "runs").exists(), sorted((Path(cwd) / "runs").rglob("*"))


# ---------------------------------------------------------------------------- one-class data
def test_one_class_folder_stops_at_the_start_naming_the_fix(tmp_path, capsys):
    from test_resume_epoch_end import make_binary_folder

    root = make_binary_folder(tmp_path / "cells", n=6)
    (root / "classes.yaml").write_text("classes: [cell]\n")
    error = cli_error(capsys, ["fit", *QUICK, "--data", "Folder", "--data.root", str(root)])
    assert "classes.yaml" in error and "classes: [background, cell]" in error, error
    assert_nothing_written(Path.cwd())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_refuses_one_class(name):
    with pytest.raises(ConfigError, match=r"num_classes=1 \(\['cell'\]\).*\[background, cell\]"):
        MODELS[name](num_classes=1, class_names=["cell"])


# ---------------------------------------------------------------------------- semi-supervised
def semi_config(path: Path, root: Path, **data: object) -> Path:
    options = "".join(f"\n    {k}: {v}" for k, v in data.items())
    path.write_text(f"""\
model:
  class_path: FixMatch
  init_args: {{network: {{class_path: UNet, init_args: {{encoder: original, base_channels: 4}}}}}}
data:
  class_path: SemiSupervised
  init_args:
    dataset: {{class_path: Folder, init_args: {{root: {root}, mask_format: binary}}}}
    batch_size: 2
    num_workers: 0
    crop_size: [16, 24]{options}
""")  # fmt: skip
    return path


@pytest.mark.parametrize("labeled", ["1.0", "5"])  # 5 of 5 training images
def test_a_method_with_nothing_unlabelled_stops_before_anything_is_written(
    tmp_path, capsys, labeled
):
    from test_resume_epoch_end import make_binary_folder

    root = make_binary_folder(tmp_path / "data", n=6)
    config = semi_config(tmp_path / "semi.yaml", root, labeled=labeled)
    error = cli_error(capsys, ["fit", *TRAINER, "--config", str(config)])
    assert "FixMatch trains on labelled and unlabelled images" in error
    assert f"labeled={labeled}" in error and "labels all 5 training images" in error, error
    assert_nothing_written(Path.cwd())


def test_image_labels_naming_images_of_another_dataset_are_refused(tmp_path):
    import json

    from test_resume_epoch_end import make_binary_folder

    from seglight.data import Folder, SemiSupervised
    from seglight.errors import DataError

    root = make_binary_folder(tmp_path / "data", n=6)
    table = {f"img{i:02d}": ["membrane"] for i in range(6)}
    table |= {"0001TP_006690": ["background"], "0001TP_006720": ["membrane"]}
    (root / "image_labels.json").write_text(json.dumps(table))
    dm = SemiSupervised(
        Folder(root=str(root), mask_format="binary"), labeled=2, image_labels="image_labels.json",
        num_workers=0,
    )  # fmt: skip
    with pytest.raises(DataError, match=r"2 of its 8 entries name no image of Folder "
                       r"\('0001TP_006690', '0001TP_006720'\): is it another dataset's file"):  # fmt: skip
        dm.setup("fit")


# ---------------------------------------------------------------------------- broken images
def cut_off(path: Path) -> None:
    """Keep the first half of a file: its header parses, its pixels do not decode."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_a_cut_off_image_stops_fit_before_the_first_step(tmp_path, capsys, fmt):
    from PIL import Image
    from test_resume_epoch_end import make_binary_folder

    root = make_binary_folder(tmp_path / "data", n=8, size=(48, 64))
    broken = root / "images" / f"img03.{fmt}"
    if fmt == "jpg":  # JPEG images (the masks stay PNG)
        for png in sorted((root / "images").glob("*.png")):
            Image.open(png).save(png.with_suffix(".jpg"), quality=95)
            png.unlink()
    cut_off(broken)
    argv = [
        "fit",
        *QUICK,
        "--data",
        "Folder",
        "--data.root",
        str(root),
        "--data.mask_format",
        "binary",
        "--data.num_workers",
        "0",
        "--data.val_fraction",
        "0.0001",
    ]  # fmt: skip  (every image in train)
    error = cli_error(capsys, argv)
    assert f"image {str(broken)!r} is cut off" in error, error
    assert_nothing_written(Path.cwd())


def test_cut_off_unlabelled_images_are_found_too(tmp_path):
    from test_resume_epoch_end import make_binary_folder

    from seglight.data import Folder, SemiSupervised
    from seglight.errors import DataError

    root = make_binary_folder(tmp_path / "data", n=8)
    dm = SemiSupervised(
        Folder(root=str(root), mask_format="binary"), labeled_split=str(tmp_path / "l.txt"),
        num_workers=0,
    )  # fmt: skip
    (tmp_path / "l.txt").write_text("img00\nimg01\n")
    train = [p for p in sorted((root / "images").iterdir()) if p.stem not in ("img00", "img01")]
    cut_off(train[-1])  # an unlabelled image (its mask is never opened)
    with pytest.raises(DataError, match=rf"unlabelled train images are invalid: image "
                       rf"'{train[-1]}' is cut off"):  # fmt: skip
        dm.setup("fit")


def test_data_appended_after_a_jpeg_is_not_a_cut_off_file(tmp_path):
    """Phones append data after a JPEG's end marker (a motion photo's video): still whole."""
    import numpy as np
    from PIL import Image

    from seglight.data.base import truncation

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "motion.jpg").write_bytes(data + b"\0" * 4096 + b"ftypmp42 video" * 500)
    assert truncation(tmp_path / "a.jpg") is None and truncation(tmp_path / "motion.jpg") is None
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert "no end marker" in truncation(tmp_path / "cut.jpg")
