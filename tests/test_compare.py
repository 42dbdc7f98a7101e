"""`seglight compare` and seglight.commands.compare on hand-written run directories (config.yaml +
metrics.json, as fit writes them), flatten_config, and the metrics.json fields that compare reads
(history, throughput, activation memory) measured by a real tiny training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from seglight.callbacks import MetricsSummary
from seglight.commands.compare import (
    choose_source,
    compare_table,
    differing_keys,
    load_runs,
    plot_curves,
    report,
    table_rows,
)
from seglight.config import flatten_config
from seglight.errors import ConfigError, DataError
from seglight.plots import class_scores, plot_confusion

CLASSES = ["Sky", "Road", "Pole"]


def config(encoder: str, crop: list[int], run_dir: str, loss="ce") -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2,
            "default_root_dir": run_dir,  # differs between any two runs: not a column
            "callbacks": [
                {"class_path": "seglight.callbacks.ModelCheckpoint", "init_args": {"mode": "max"}}
            ],
        },
        "model": {
            "class_path": "seglight.models.UNet",
            "init_args": {"encoder": encoder, "lr": 0.001, "loss": loss},
        },
        "data": {"class_path": "seglight.data.CamVid", "init_args": {"crop_size": crop}},
    }


def metrics(miou: float, ious: list[float | None], test: bool = True, history=True) -> dict:
    scores = {"mIoU": miou, "acc": 0.9, "mAcc": miou + 0.1, "loss": 0.5}
    scores.update({f"IoU/{c}": v for c, v in zip(CLASSES, ious, strict=True)})
    out = {
        "model": "UNet",
        "data": "CamVid",
        "params": 2_500_000,
        "val": scores,
        "best_val": {**scores, "epoch": 1},
        "epoch": 1,
        "step": 20,
        "class_names": CLASSES,
        "throughput": {"train_images_per_s": 12.5, "train_images": 100, "train_seconds": 8.0},
        "memory": {"activations_mb": 42.0, "batch_size": 4},
    }
    if history:
        out["history"] = [
            {"epoch": 0, "step": 10, "mIoU": miou / 2, "acc": 0.5, "mAcc": 0.4, "loss": 1.0},
            {"epoch": 1, "step": 20, "mIoU": miou, "acc": 0.9, "mAcc": 0.5, "loss": 0.5},
        ]
    if test:
        out["test"] = {**scores, "mIoU": miou - 0.01}
    return out


def make_run(root: Path, name: str, cfg: dict, summary: dict | None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if summary is not None:
        (run / "metrics.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    """Three UNet runs: encoders r18/r34 and two crop sizes; version_10 sorts after version_2."""
    base = tmp_path / "runs" / "unet"
    make_run(base, "version_2", config("resnet18", [256, 256], "a"), metrics(0.5, [0.9, 0.6, 0.0]))
    make_run(base, "version_10", config("resnet34", [256, 256], "b"), metrics(0.6, [0.9, 0.8, 0.1]))
    make_run(
        base, "version_3", config("resnet34", [360, 480], "c"), metrics(0.7, [0.95, 0.85, None])
    )
    return tmp_path / "runs"


def test_load_runs_expands_globs_and_folders_in_natural_order(runs_dir):
    runs = load_runs([str(runs_dir / "unet" / "version_*")])
    assert [r.path.name for r in runs] == ["version_2", "version_3", "version_10"]
    assert [r.path.name for r in load_runs([runs_dir])] == ["version_2", "version_3", "version_10"]
    # a run named twice is loaded once
    assert len(load_runs([runs_dir / "unet" / "version_2", str(runs_dir / "*" / "version_2")])) == 1
    run = runs[0]
    assert run.name == "unet/version_2"
    assert run.config["model"] == "UNet" and run.config["model.encoder"] == "resnet18"
    assert run.per_class("val") == {"Sky": 0.9, "Road": 0.6, "Pole": 0.0}  # the dataset's order
    assert run.throughput == 12.5 and run.params == 2_500_000 and len(run.history) == 2


def test_bad_paths_and_files_are_clear_errors(tmp_path, runs_dir):
    with pytest.raises(ConfigError, match="no such run directory"):
        load_runs([tmp_path / "nope"])
    with pytest.raises(ConfigError, match="nothing matches"):
        load_runs([str(tmp_path / "nope*")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a run directory"):
        load_runs([tmp_path / "empty"])
    broken = make_run(tmp_path, "broken", config("r18", [1, 1], "x"), None)
    (broken / "metrics.json").write_text("{not json")
    with pytest.raises(DataError, match="broken/metrics.json"):
        load_runs([broken])


def test_table_shows_the_keys_that_differ_and_the_results(runs_dir):
    runs = load_runs([runs_dir])
    assert differing_keys(runs) == ["model.encoder", "data.crop_size"]
    assert choose_source(runs) == "test"
    columns, rows = table_rows(runs)
    assert columns[:3] == ["run", "encoder", "crop_size"]
    row = dict(zip(columns, rows[0], strict=True))
    assert row["encoder"] == "resnet18" and row["crop_size"] == "[256, 256]"
    assert row["mIoU %"] == "49.00"  # test mIoU (0.5 - 0.01)
    assert row["params (M)"] == "2.500" and row["train img/s"] == "12.5" and row["act. MB"] == "42"
    assert "peak CUDA MB" not in columns  # measured on no run
    _, rows = table_rows(runs, source="best_val")
    assert rows[0][columns.index("mIoU %")] == "50.00"
    table = compare_table(runs)
    assert table.row_count == 3 and "metrics: test" in str(table.title)


def test_auto_source_falls_back_when_a_run_has_no_test(tmp_path, runs_dir):
    make_run(
        runs_dir / "unet",
        "version_11",
        config("resnet50", [256, 256], "d"),
        metrics(0.4, [0.1, 0.2, 0.3], test=False, history=False),
    )
    runs = load_runs([runs_dir])
    assert choose_source(runs) == "best_val"
    # an older metrics.json (no history, throughput, memory or class order) still compares
    old = make_run(
        tmp_path, "old", config("resnet18", [8, 8], "e"), {"val": {"mIoU": 0.3, "IoU/Sky": 0.3}}
    )
    mixed = load_runs([old, runs_dir / "unet" / "version_2"])
    columns, rows = table_rows(mixed, "val")
    assert (
        rows[0][columns.index("train img/s")] == "-" and rows[0][columns.index("mIoU %")] == "30.00"
    )
    plot_curves(mixed, tmp_path / "curves.png")  # the old run is drawn as one point


def test_a_tested_run_keeps_its_test_score_beside_an_untested_one(tmp_path, runs_dir, capsys):
    """A quickstart run (no test) beside a tested U-Net run: every metric either has is shown,
    empty where a run lacks it."""
    make_run(
        runs_dir / "quickstart",
        "version_0",
        config("original", [64, 64], "q"),
        metrics(0.3, [0.1, 0.2, 0.3], test=False),
    )
    runs = load_runs([runs_dir / "quickstart" / "version_0", runs_dir / "unet" / "version_2"])
    columns, rows = table_rows(runs)
    quickstart, unet = (dict(zip(columns, row, strict=True)) for row in rows)
    assert quickstart["mIoU %"] == "30.00" and unet["mIoU %"] == "50.00"  # best_val: both have it
    assert quickstart["test mIoU %"] == "-" and unet["test mIoU %"] == "49.00"
    assert "metrics: best_val; test mIoU where a run has it" in str(compare_table(runs).title)
    files = report(runs, out=tmp_path / "out")
    rows = list(csv.DictReader(files["csv"].open()))
    assert [r["test_mIoU"] for r in rows] == ["", "0.49"]
    assert "test mIoU %" in files["markdown"].read_text()
    # one source asked for: that one only
    assert "test mIoU %" not in table_rows(runs, "best_val")[0]


def test_legends_do_not_repeat_a_sweep_name_and_one_point_starts_at_step_0(tmp_path):
    from seglight.commands.compare import curves_figure, labels

    for i, weights in enumerate([None, "median_frequency"]):
        cfg = config("resnet18", [8, 8], f"r{i}")
        cfg["model"]["init_args"]["class_weights"] = weights
        run = make_run(tmp_path, f"v{i}", cfg, metrics(0.4, [0.1, 0.2, 0.3], history=False))
        name = f"class_weights={'null' if weights is None else weights}"
        (run / "sweep.json").write_text(json.dumps({"name": name}))
    runs = load_runs([tmp_path / "v0", tmp_path / "v1"])
    assert labels(runs) == ["class_weights=null", "class_weights=median_frequency"]
    fig = curves_figure(runs)  # one validation each, at step 20
    left, right = fig.axes[0].get_xlim()
    assert left == 0 and right > 20


def test_report_writes_csv_markdown_and_plots(runs_dir, tmp_path):
    runs = load_runs([runs_dir])
    files = report(runs, out=tmp_path / "out")
    rows = list(csv.DictReader(files["csv"].open()))
    assert [r["model.encoder"] for r in rows] == ["resnet18", "resnet34", "resnet34"]
    assert float(rows[0]["mIoU"]) == pytest.approx(0.49) and rows[0]["source"] == "test"
    assert json.loads(rows[1]["data.crop_size"]) == [360, 480]  # version_3, before version_10
    assert rows[1]["IoU/Pole"] == "" and float(rows[2]["IoU/Pole"]) == pytest.approx(0.1)
    markdown = files["markdown"].read_text()
    assert "| run | encoder | crop_size | mIoU % |" in markdown and "| 59.00 |" in markdown
    for key in ("per_class", "curves"):
        with Image.open(files[key]) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_compare_command(runs_dir, tmp_path, capsys):
    from seglight.cli import main

    main(["compare", str(runs_dir / "*" / "version_*"), "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert "encoder" in out and "crop_size" in out and "69.00" in out
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == [
        "miou_curves.png",
        "per_class_iou.png",
        "runs.csv",
        "runs.md",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "no such run directory" in capsys.readouterr().err


def test_flatten_config_gives_usable_keys():
    flat = flatten_config(
        {
            "model": {
                "class_path": "seglight.models.UNet",
                "init_args": {
                    "loss": {"ce": 1.0, "dice": 0.5},
                    "loss_options": {"focal": {"gamma": 2}},
                    "inference": {"mode": "slide", "flip": True, "scales": [0.5, 1.0]},
                    "class_weights": None,
                },
            },
            "data": {"class_path": "CamVid", "init_args": {"crop_size": [360, 480]}},
            "trainer": {
                "callbacks": [
                    {"class_path": "x.ModelCheckpoint", "init_args": {"monitor": "val/mIoU"}},
                    {"class_path": "x.ModelCheckpoint", "init_args": {"monitor": "val/loss"}},
                    {"class_path": "x.RichProgressBar"},
                ]
            },
        }
    )
    assert flat["model"] == "UNet" and flat["data"] == "CamVid"
    assert flat["model.loss"] == "{ce: 1.0, dice: 0.5}"  # one key, whatever the loss's form
    assert flat["model.loss_options.focal"] == "{gamma: 2}"
    assert flat["model.inference.mode"] == "slide" and flat["model.inference.flip"] is True
    assert flat["model.inference.scales"] == [0.5, 1.0] and flat["data.crop_size"] == [360, 480]
    assert flat["model.class_weights"] is None
    assert flat["trainer.callbacks"] == "ModelCheckpoint, ModelCheckpoint, RichProgressBar"
    assert flat["trainer.callbacks.ModelCheckpoint.monitor"] == "val/mIoU"
    assert flat["trainer.callbacks.ModelCheckpoint.1.monitor"] == "val/loss"
    assert all(isinstance(v, (str, int, float, bool, list, type(None))) for v in flat.values())


def test_class_scores_and_confusion_image(tmp_path):
    confmat = torch.tensor([[8, 2, 0], [1, 9, 0], [0, 0, 0]])  # class 2 absent
    scores = class_scores(confmat)
    assert scores["IoU"][0] == pytest.approx(8 / 11) and scores["IoU"][1] == pytest.approx(9 / 12)
    assert np.isnan(scores["IoU"][2]) and np.isnan(scores["acc"][2])
    assert scores["acc"][0] == pytest.approx(0.8) and list(scores["pixels"]) == [10, 10, 0]
    image = plot_confusion(confmat, CLASSES, tmp_path / "cm.png", title="t")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    with Image.open(tmp_path / "cm.png") as saved:
        assert saved.width > 200
    # more classes, a bigger picture (the names stay readable)
    assert plot_confusion(torch.eye(12), [f"class{i}" for i in range(12)]).shape[0] > image.shape[0]


# ----------------------------------------------------------------------------- metrics.json fields
class _Shapes(L.LightningDataModule):
    def __init__(self, batch_size: int):
        super().__init__()
        from seglight.data import Synthetic

        self.inner = Synthetic(
            num_train=8, num_val=4, image_size=(32, 32), batch_size=batch_size, num_workers=0
        )

    def train_dataloader(self):
        self.inner.setup("fit")
        return self.inner.train_dataloader()

    def val_dataloader(self):
        self.inner.setup("fit")
        return self.inner.val_dataloader()


def fit_tiny(tmp_path: Path, batch_size: int, max_steps: int) -> dict:
    from seglight.models import UNet

    model = UNet(num_classes=5, encoder="original", base_channels=4)
    trainer = L.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[MetricsSummary()],
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=_Shapes(batch_size))
    return json.loads((tmp_path / "metrics.json").read_text())


def test_metrics_summary_records_history_throughput_and_activation_memory(tmp_path):
    four = fit_tiny(tmp_path / "a", batch_size=4, max_steps=4)  # 2 epochs of 2 batches
    assert [h["step"] for h in four["history"]] == [2, 4]
    assert [h["epoch"] for h in four["history"]] == [0, 1]
    assert four["history"][-1]["mIoU"] == four["val"]["mIoU"]
    # the first batch of each epoch is not timed: 1 timed batch of 4 images per epoch
    assert four["throughput"]["train_images"] == 8 and four["throughput"]["train_images_per_s"] > 0
    assert four["class_names"] == ["0", "1", "2", "3", "4"]
    assert four["memory"]["batch_size"] == 4 and four["memory"]["activations_mb"] > 0
    # activations grow with the batch: about twice as many for twice the images
    two = fit_tiny(tmp_path / "b", batch_size=2, max_steps=1)
    ratio = four["memory"]["activations_mb"] / two["memory"]["activations_mb"]
    assert 1.8 < ratio < 2.2, ratio
    # a fit that max_steps stops mid-epoch validates its final weights too
    three = fit_tiny(tmp_path / "c", batch_size=4, max_steps=3)
    assert [h["step"] for h in three["history"]] == [2, 3] and three["step"] == 3
    assert "loss" in three["val"]  # the validation loss of a model that has one
    # no hook is left behind in this process: autograd saves as usual afterwards
    x = torch.ones(3, requires_grad=True)
    (x * x).sum().backward()
    assert torch.equal(x.grad, 2 * torch.ones(3))
