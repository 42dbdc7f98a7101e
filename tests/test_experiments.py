"""Every experiments/*.yaml parses and runs one fast_dev_run batch on tiny data (through the same
CLI entry point as `python -m seglight`, in-process). A new experiment file is covered without
editing this test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_fake_camvid
from fakes_zoo import (
    make_fake_ade20k,
    make_fake_cityscapes,
    make_fake_coco,
    make_fake_sbd,
    make_fake_voc,
)

from seglight.cli import run

VOC_TRAIN = ["2007_000032", "2007_000039", "2008_000008"]
EXPERIMENTS = sorted(
    p for p in (REPO / "experiments").glob("**/*.yaml") if p.name != "defaults.yaml"
)
#: overlays: configs given after others (their header says which), tested in that composition
OVERLAYS = {
    "cpu/camvid_quarter.yaml": ["semi/supervised.yaml"],
    "cpu/mask2former_small.yaml": ["semi/supervised.yaml", "cpu/camvid_quarter.yaml"],
}


def composition(path: Path) -> list[Path]:
    """The configs an experiment is given with, in order: itself, or an overlay after its bases."""
    key = path.relative_to(REPO / "experiments").as_posix()
    return [REPO / "experiments" / base for base in OVERLAYS.get(key, [])] + [path]


def test_every_partial_config_is_a_known_overlay():
    """A config without a model or data class runs only after others: OVERLAYS must say which,
    or test_experiment_runs_one_batch would run it alone and fail."""
    for path in EXPERIMENTS:
        defaults = path.parent / "defaults.yaml"
        config = yaml.safe_load(defaults.read_text()) or {} if defaults.is_file() else {}
        config.update(yaml.safe_load(path.read_text()) or {})
        partial = not all(
            isinstance(config.get(k), str) or "class_path" in (config.get(k) or {})
            for k in ("model", "data")
        )
        key = path.relative_to(REPO / "experiments").as_posix()
        assert partial == (key in OVERLAYS), (
            f"{key}: partial={partial}, OVERLAYS lists it: {key in OVERLAYS}"
        )


def data_class(path: Path) -> str:
    """The data class of an experiment (its own `data:`, else its bases', else its folder's
    defaults.yaml's); "SemiSupervised/X" for semi-supervised data wrapping dataset X."""
    bases = composition(path)[:-1]
    for source in (
        path,
        *reversed(bases),
        path.parent / "defaults.yaml",
        *(b.parent / "defaults.yaml" for b in bases),
    ):
        config = yaml.safe_load(source.read_text()) if source.is_file() else None
        data = (config or {}).get("data")
        if data:
            name = data["class_path"] if isinstance(data, dict) else data
            if name.endswith("SemiSupervised"):
                return f"{name}/{data['init_args']['dataset']['class_path']}"
            return name
    raise AssertionError(f"{path}: no data class")


def without_downloads(path: Path, tmp_path: Path) -> Path:
    """The experiment as tests run it: pretrained weights named in it (the literature's
    protocols) are turned off in a copy of experiments/, as no test downloads."""
    if "encoder_weights: imagenet" not in path.read_text():
        return path
    copy = tmp_path / "experiments"
    shutil.copytree(REPO / "experiments", copy)
    target = copy / path.relative_to(REPO / "experiments")
    target.write_text(
        target.read_text().replace("encoder_weights: imagenet", "encoder_weights: null")
    )
    return target


@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory) -> Path:
    """VOC + SBD (semi_voc/ trains on train_aug) and a pair of UniMatch-style lists."""
    root = make_fake_voc(tmp_path_factory.mktemp("data") / "voc", VOC_TRAIN, ["2007_000033"])
    make_fake_sbd(root, ["2008_000002"], ["2011_000003"])
    (root / "labeled.txt").write_text(f"JPEGImages/{VOC_TRAIN[0]}.jpg x/{VOC_TRAIN[0]}.png\n")
    unlabelled = [*VOC_TRAIN[1:], "2008_000002", "2011_000003"]
    (root / "unlabeled.txt").write_text(
        "\n".join(f"JPEGImages/{n}.jpg x/{n}.png" for n in unlabelled)
    )
    return root


@pytest.fixture(scope="module")
def tiny_camvid(tmp_path_factory) -> Path:
    return make_fake_camvid(
        tmp_path_factory.mktemp("data") / "camvid", {"train": 2, "val": 2, "test": 2}, size=(72, 96)
    )


# experiments at a paper's own setting use the paper's dataset: a tiny fake in its real layout
FAKE_DATA = {
    "ADE20K": lambda root: make_fake_ade20k(root, 2, 2, size=(72, 96)),
    "Cityscapes": lambda root: make_fake_cityscapes(
        root, {"train": {"aachen": 2}, "val": {"lindau": 2}}, size=(72, 96)
    ),
}


# the literature's protocol (semi_voc/: DeepLabv3+ ResNet-101, CPS with two) is slow on a CPU
PARAMS = [
    pytest.param(p, marks=pytest.mark.slow) if p.parent.name == "semi_voc" else p
    for p in EXPERIMENTS
]


@pytest.mark.parametrize(
    "path",
    PARAMS,
    ids=[p.relative_to(REPO / "experiments").with_suffix("").as_posix() for p in EXPERIMENTS],
)
def test_experiment_runs_one_batch(path, tiny_camvid, tiny_voc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = data_class(path)
    configs = [str(without_downloads(p, tmp_path)) for p in composition(path)]
    args = [
        "fit",
        *(x for c in configs for x in ("--config", c)),
        "--trainer.fast_dev_run",
        "true",
        "--trainer.accelerator",
        "cpu",
    ]
    args += ["--data.num_workers", "0", "--data.batch_size", "2"]
    if data.endswith("CamVid"):  # the semi/ configs wrap it: SemiSupervised/CamVid
        args += ["--data.root", str(tiny_camvid), "--data.crop_size", "[64, 64]"]
    if data.endswith("VOC"):  # semi_voc/: the literature's protocol
        args += ["--data.root", str(tiny_voc), "--data.crop_size", "[32, 32]"]
        args += ["--data.labeled_split", str(tiny_voc / "labeled.txt")]
        args += ["--data.unlabeled_split", str(tiny_voc / "unlabeled.txt")]
    for name, make in FAKE_DATA.items():
        if data.endswith(name):
            root = make(tmp_path / name.lower())
            args += ["--data.root", str(root), "--data.crop_size", "[64, 64]"]
            # a few fake images cannot show every class of ADE20K or Cityscapes
            args += ["--data.allow_empty_classes", "true"]
    if data.endswith("Synthetic"):
        args += ["--data.num_train", "4", "--data.num_val", "2"]
    if data.endswith("COCOInstances"):
        make_fake_coco(tmp_path / "coco")
        args += ["--data.root", str(tmp_path / "coco"), "--data.allow_empty_classes", "true"]
    if data.endswith("CityscapesInstances"):
        args += ["--data.root", str(make_fake_cityscapes(tmp_path / "cityscapes"))]
        args += ["--data.allow_empty_classes", "true"]
    model = yaml.safe_load(path.read_text()).get("model")
    if isinstance(model, dict) and "min_size" in model.get("init_args", {}):
        # a detector: its own resizing and its RoI counts shrunk to the tiny data
        rois = {"rpn_post_nms_top_n_train": 100, "rpn_post_nms_top_n_test": 50,
                "box_batch_size_per_image": 32}  # fmt: skip
        args += ["--model.min_size", "64", "--model.max_size", "96",
                 "--model.detections_per_img", "10", "--model.detector_options", json.dumps(rois)]  # fmt: skip
    cli = run(args)
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
