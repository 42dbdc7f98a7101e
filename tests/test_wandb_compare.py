"""What an offline W&B run holds for comparing runs, read back from its files without network:
the flattened config, group / job type / tags, the per-class IoU table and the confusion-matrix
image at the end of validation and test."""

from __future__ import annotations

import json
import re
import shlex
import struct
from pathlib import Path

import pytest
import yaml
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
    """{"id", "group", "job_type", "tags", "name"} from the last run record, "config" {key: value}
    from the config records, "summary" {key: value} from the summary records, "history": list
    of {key: value} (values decoded from JSON)."""
    info: dict = {"config": {}, "history": [], "summary": {}}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            info.update(
                id=r.run.run_id,
                group=r.run.run_group,
                job_type=r.run.job_type,
                tags=set(r.run.tags),
                name=r.run.display_name,
            )
        elif kind == "summary":
            info["summary"].update(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in r.summary.update
                }
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
    # the test command printed at the end of fit, as a user would copy it
    command = next(line for line in fit.stderr.splitlines() if line.strip().startswith("test it"))
    test_args = shlex.split(command.split("test it", 1)[1])
    assert test_args[:2] == ["seglight", "test"], command
    test = run_cli(test_args[1:], cwd=work, env=offline_env(work))
    return run_dir, fit, test


def test_fit_ends_with_a_summary(offline_fit):
    run_dir, fit, test = offline_fit
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = metrics["best_val"]
    lines = fit.stderr[fit.stderr.index("seglight: fit finished") :].splitlines()
    assert lines[0].startswith("seglight: fit finished (2 epochs, 4 steps)")
    field = dict(re.fullmatch(r"  (\S.*?)  +(\S.*)", line).groups() for line in lines[1:6])
    assert field["best val/mIoU"] == f"{best['mIoU']:.4f} at epoch {best['epoch']}"
    ckpt = field["checkpoint"]
    assert (work_path(run_dir, ckpt)).is_file()
    assert f"epoch{best['epoch']:03d}" in ckpt  # the best checkpoint, not last.ckpt
    assert field["run directory"].startswith("runs/quickstart/version_0 ")
    offline = offline_run_dirs(run_dir)[0]
    assert field["W&B run"].startswith("offline; upload with `wandb sync ")
    assert field["W&B run"].endswith(f"{offline.name}`")
    assert field["test it"].startswith("seglight test --config ")
    assert field["test it"].endswith(f"--ckpt_path {ckpt}")
    # the command works (the fixture ran it) and scores that checkpoint
    assert f"Loaded model weights from the checkpoint at {ckpt}" in test.stdout + test.stderr


def work_path(run_dir: Path, relative: str) -> Path:
    return run_dir.parents[2] / relative  # paths are printed relative to the working directory


def test_logged_config_has_each_option_once_and_no_display_settings(offline_fit):
    run_dir, _, _ = offline_fit
    info = run_info(wandb_records(offline_run_dirs(run_dir)[0]))
    config = info["config"]
    assert info["name"] == "quickstart/version_0"
    # Lightning's own hparams logging would add `lr`, `encoder`, ... beside model.lr, model.encoder
    assert "lr" not in config and "encoder" not in config and config["model.lr"] == 0.01
    assert config["data.num_classes"] == len(CLASSES)
    shown = [
        k
        for k in config
        if "ProgressBar" in k or "ModelSummary." in k or k.startswith("trainer.logger")
    ]
    assert not shown, shown
    assert "trainer.default_root_dir" not in config
    # nor what cannot change a result: checkpoint keeping, predict's and debugging options
    unchanging = ("trainer.limit_predict_batches", "trainer.profiler", "data.num_workers",
                  "trainer.callbacks.ModelCheckpoint.save_top_k", "trainer.detect_anomaly")  # fmt: skip
    assert not [k for k in unchanging if k in config]
    assert config["trainer.callbacks"] == "ModelCheckpoint"  # not the display callbacks
    assert len(config) < 80, len(config)  # 183 at first, then 89 (plus W&B's own `_wandb`)


def newest_test(summary: dict) -> dict:
    """The metrics of the newest `test` evaluation in a run's metrics.json."""
    return [e for e in summary["evaluations"] if e["stage"] == "test"][-1]["metrics"]


def test_test_logs_into_the_training_run(offline_fit):
    """W&B's runs table shows a run's train and test mIoU side by side: the test resumes the
    training's run by id (offline: `wandb sync` uploads both parts into that one run)."""
    run_dir, _, _ = offline_fit
    fit_part, test_part = (run_info(wandb_records(r)) for r in offline_run_dirs(run_dir))
    assert fit_part["id"] and test_part["id"] == fit_part["id"]
    assert "best/val/mIoU" in fit_part["summary"] and "val/mIoU" in fit_part["summary"]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert test_part["summary"]["test/mIoU"] == pytest.approx(
        newest_test(summary)["mIoU"], abs=1e-6
    )
    assert test_part["summary"]["test/ckpt_path"].endswith(".ckpt")
    assert test_part["config"] == {}, "the test does not overwrite the training's config"
    assert not test_part["tags"], "nor its tags"
    # the test's metrics are plotted at the step of the checkpoint tested, not at 0
    step = [e for e in summary["evaluations"] if e["stage"] == "test"][-1]["checkpoint_step"]
    logged = [row for row in test_part["history"] if "test/mIoU" in row]
    assert step and [row["trainer/global_step"] for row in logged] == [step]
    # the training's config.yaml is kept; the test's lies beside it
    assert "verbose" not in yaml.safe_load((run_dir / "config.yaml").read_text())  # test's option
    assert (run_dir / "config_test_1.yaml").is_file()


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
    assert config["trainer.callbacks.ModelCheckpoint.monitor"] == "auto"  # the model's: val/mIoU
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
    assert len(runs) == 2, "the test logged a second part of the W&B run in the run directory"
    tables = _tables(runs[1], "test/per_class")
    assert len(tables) == 1
    summary = json.loads((run_dir / "metrics.json").read_text())
    for name, iou, *_ in tables[0][1]["data"]:
        expected = newest_test(summary)[f"IoU/{name}"]
        assert iou == pytest.approx(expected, abs=1e-6) if expected is not None else iou is None
    # beside the test's config, the training's image kept (an evaluation never replaces it)
    assert (run_dir / "confusion_test_1.png").is_file() and (
        run_dir / "config_test_1.yaml"
    ).is_file()
    assert (run_dir / "confusion_val.png").is_file()
    # the title says which checkpoint (its epoch) and its score, not "step 0"
    best = summary["best_val"]["epoch"]  # the fixture tests the best checkpoint
    title = f"UNet test, epoch {best}: mIoU {100 * newest_test(summary)['mIoU']:.1f}%"
    rows = run_info(wandb_records(runs[1]))["history"]
    assert any(title in json.dumps(row) for row in rows), [r for r in rows if "confusion" in str(r)]
    assert list((runs[1] / "files" / "media" / "images" / "test").glob("confusion_matrix_*.png"))
