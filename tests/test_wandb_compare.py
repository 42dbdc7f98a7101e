"""What an offline W&B run holds for comparing runs, read back from its files without network:
the flattened config, group / job type / tags, the per-class IoU table and the confusion-matrix
image at the end of validation and test."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from PIL import Image

from seglight.commands.sweep import smoke_args
from seglight.utils import git_revision

QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")
CLASSES = ["background", "disc", "square", "triangle", "ring"]


def offline_env(tmp_path: Path) -> dict[str, str]:
    """W&B as for a user with no account: no mode set, no key, no ~/.netrc."""
    return {
        "WANDB_MODE": "",
        "WANDB_API_KEY": "",
        "HOME": str(tmp_path / "home"),
        "NETRC": str(tmp_path / "none"),
    }


def wandb_records(offline_run: Path) -> list:
    """The records of an offline run's run-*.wandb file: a LevelDB-style log (32 KiB blocks of
    chunks with a 7-byte header: CRC, length, type) of wandb_internal_pb2.Record messages, after
    W&B's own 7-byte file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(offline_run.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, parts, records = 32768, 7, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
        elif kind == 0 and length == 0:
            parts = []
    return records


def run_info(records: list) -> dict:
    """{"group", "job_type", "tags", "name"} from the last run record, "config" {key: value}
    from the config records, "history": list of {key: value} (values decoded from JSON)."""
    info: dict = {"config": {}, "history": []}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            info.update(
                group=r.run.run_group,
                job_type=r.run.job_type,
                tags=set(r.run.tags),
                name=r.run.display_name,
            )
        elif kind == "config":
            info["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            info["history"].append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            )
    return info


def offline_run_dirs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.fixture(scope="module")
def offline_fit(tmp_path_factory):
    """A 2-epoch tiny fit (2 steps per epoch), then a test of its checkpoint, logged offline."""
    work = tmp_path_factory.mktemp("wandb")
    args = [
        "--config", QUICKSTART, *smoke_args(), "--trainer.max_steps", "4",
        "--model.base_channels", "4", "--model.loss", "{ce: 1.0, dice: 0.5}",
    ]  # fmt: skip
    fit = run_cli(
        # both spellings of a logger option work
        ["fit", *args, "--trainer.logger.group", "ablation1"]
        + ["--trainer.logger.init_args.job_type", "train"],
        cwd=work,
        env=offline_env(work),
    )
    run_dir = work / "runs" / "quickstart" / "version_0"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    test = run_cli(["test", *args, "--ckpt_path", str(ckpt)], cwd=work, env=offline_env(work))
    return run_dir, fit, test


def test_config_group_job_type_and_tags(offline_fit):
    run_dir, fit, _ = offline_fit
    assert "W&B: no credentials" in fit.stdout + fit.stderr  # offline, and said so
    info = run_info(wandb_records(offline_run_dirs(run_dir)[0]))
    assert info["group"] == "ablation1" and info["job_type"] == "train"
    assert {"UNet", "Synthetic"} <= info["tags"]  # architecture and dataset
    config = info["config"]
    assert config["model"] == "UNet" and config["data"] == "Synthetic"
    assert config["model.encoder"] == "original" and config["model.base_channels"] == 4
    assert config["model.loss"] == "{ce: 1.0, dice: 0.5}"
    assert config["data.image_size"] == [32, 32] and config["trainer.max_steps"] == 4
    assert config["trainer.callbacks.ModelCheckpoint.monitor"] == "val/mIoU"
    assert config["trainer.logger.group"] == "ablation1"
    if git_revision():
        assert config["git.commit"] == git_revision()["commit"]


def _tables(offline_run: Path, key: str) -> list[tuple[int, dict]]:
    """(step, table JSON) of each W&B table logged under `key`, in order."""
    rows = run_info(wandb_records(offline_run))["history"]
    return [
        (
            row["trainer/global_step"],
            json.loads((offline_run / "files" / row[f"{key}/path"]).read_text()),
        )
        for row in rows
        if f"{key}/path" in row
    ]


def test_per_class_iou_table_and_confusion_matrix_after_validation(offline_fit):
    run_dir, _, _ = offline_fit
    offline = offline_run_dirs(run_dir)[0]
    tables = _tables(offline, "val/per_class")
    # epoch 0 (every_n_epochs=5 logs epoch 0) and the last validation, at the end of fit
    assert [step for step, _ in tables] == [2, 4]
    last = tables[-1][1]
    assert last["columns"] == ["class", "IoU", "acc", "pixels", "predicted"]
    assert [row[0] for row in last["data"]] == CLASSES
    # the same counts as the logged val metrics (read before the model resets them)
    summary = json.loads((run_dir / "metrics.json").read_text())
    for name, iou, *_ in last["data"]:
        expected = summary["val"][f"IoU/{name}"]
        assert iou == pytest.approx(expected, abs=1e-6) if expected is not None else iou is None
    pixels = sum(row[3] for row in last["data"])
    assert pixels == 4 * 32 * 32  # one validation batch of 4 images, no ignored pixels
    images = sorted((offline / "files" / "media" / "images" / "val").glob("confusion_matrix_*.png"))
    assert len(images) == 2
    with Image.open(images[0]) as image, Image.open(run_dir / "confusion_val.png") as saved:
        assert image.width > 200 and saved.width > 200


def test_per_class_table_after_test(offline_fit):
    run_dir, _, test = offline_fit
    assert "test per-class IoU" in test.stdout
    runs = offline_run_dirs(run_dir)
    assert len(runs) == 2, "the test logged a second W&B run in the same run directory"
    tables = _tables(runs[1], "test/per_class")
    assert len(tables) == 1
    summary = json.loads((run_dir / "metrics.json").read_text())
    for name, iou, *_ in tables[0][1]["data"]:
        expected = summary["test"][f"IoU/{name}"]
        assert iou == pytest.approx(expected, abs=1e-6) if expected is not None else iou is None
    assert (run_dir / "confusion_test.png").is_file()
    assert list((runs[1] / "files" / "media" / "images" / "test").glob("confusion_matrix_*.png"))
