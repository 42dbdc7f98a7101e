"""What the researcher sees: the progress bar, silenced noise, the model summary, compare's table
at 120 columns and its plots (every text inside the figure), and the start-up cost of the light
commands. The end-of-fit summary, the W&B records and failed starts are tested with real runs in
test_wandb_compare.py and test_cli.py."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO

from seglight.commands.compare import (
    compare_table,
    curves_figure,
    load_runs,
    per_class_figure,
)
from seglight.plots import confusion_figure

CAMVID = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
          "Pedestrian", "Bicyclist"]  # fmt: skip
ENCODERS = ["resnet18", "resnet34", "resnet50", "mobilenetv3_large_100", "efficientnet_b0"]


# ----------------------------------------------------------------------------- progress bar
def _trainer(metrics: dict, epoch: int, fn: str = "fit") -> SimpleNamespace:
    return SimpleNamespace(
        callback_metrics={k: torch.tensor(v) for k, v in metrics.items()},
        progress_bar_metrics={},
        loggers=[SimpleNamespace(version="run-1a2b3c")],  # Lightning shows it as v_num
        sanity_checking=False,
        state=SimpleNamespace(fn=fn),
        current_epoch=epoch,
        global_step=10 * (epoch + 1),
    )


def test_progress_bar_shows_val_miou_and_the_best_without_v_num():
    from seglight.callbacks import RichProgressBar

    bar = RichProgressBar()
    shown = bar.get_metrics(_trainer({"train/loss_step": 1.5}, 0), None)
    assert shown == {"loss": "1.5"}  # no v_num, no validation yet
    for epoch, miou in enumerate([0.40, 0.55, 0.50]):
        trainer = _trainer({"train/loss_step": 1.0, "val/mIoU": miou}, epoch)
        bar.on_validation_end(trainer, None)
    shown = bar.get_metrics(trainer, None)
    assert shown["val/mIoU"] == "0.500" and shown["best"] == "0.550 ep1"
    assert "v_num" not in shown


def test_progress_bar_has_no_last_epoch_without_an_epoch_limit():
    from seglight.callbacks import RichProgressBar

    bar = RichProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)  # --trainer.max_epochs -1 (max_steps decides)
    assert bar._get_train_description(0).strip() == "Epoch 0"  # not Lightning's "Epoch 0/-2"
    bar._trainer = SimpleNamespace(max_epochs=20)
    assert bar._get_train_description(3).strip() == "Epoch 3/19"


def _fixmatch_fit(root: Path, run_dir: Path, **bar_options) -> None:
    """A few FixMatch steps on fake CamVid (2 labelled images), validated every 2 steps, with
    seglight's progress bar and metrics.json."""
    import lightning as L

    from seglight.callbacks import MetricsSummary, RichProgressBar
    from seglight.data import CamVid, SemiSupervised
    from seglight.methods import FixMatch

    L.seed_everything(0)
    tiny = {"class_path": "UNet", "init_args": {"encoder": "original", "base_channels": 4}}
    model = FixMatch(num_classes=11, network=tiny, threshold=0.0)
    data = SemiSupervised(
        CamVid(root=str(root), crop_size=(32, 32), batch_size=1, num_workers=0), labeled=2
    )
    trainer = L.Trainer(
        max_steps=4, max_epochs=-1, val_check_interval=2, check_val_every_n_epoch=None,
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
        limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=str(run_dir),
        callbacks=[RichProgressBar(**bar_options), MetricsSummary()],
    )  # fmt: skip
    trainer.fit(model, data)


@pytest.fixture(scope="module")
def redirected_fixmatch(tmp_path_factory):
    """A FixMatch fit with stdout redirected to a file, as under nohup or SLURM: (stdout, run)."""
    from conftest import make_fake_camvid

    work = tmp_path_factory.mktemp("redirected")
    root = make_fake_camvid(work / "camvid", {"train": 6, "val": 2, "test": 2}, (32, 32))
    log = work / "log.txt"
    with open(log, "w") as out:
        saved, sys.stdout = sys.stdout, out
        try:
            _fixmatch_fit(root, work / "run", plain_every_n_steps=1)
        finally:
            sys.stdout = saved
    return log.read_text(), work / "run"


def test_redirected_fit_prints_a_plain_line_for_each_validation(redirected_fixmatch):
    text, _ = redirected_fixmatch
    lines = text.splitlines()
    assert "\x1b" not in text and "━" not in text  # no bar, no terminal codes
    val = [line for line in lines if "val/mIoU" in line]
    # one per validation (steps 2 and 4), each with the epoch, step, mIoU, best, speed and time
    assert [re.search(r"step (\d+)", line)[1] for line in val] == ["2", "4"], lines
    for line in val:
        assert re.match(
            r"epoch \d+  step \d+  val/mIoU \d\.\d{4}  best \d\.\d{4} \(epoch \d+\)", line
        )
        assert re.search(r"[\d.]+ img/s  elapsed \d+:\d\d:\d\d$", line), line
        # the method's loss parts and confident fraction, not only the averaged loss
        assert re.search(
            r"train loss [\d.]+ \(sup [\d.]+, unsup [\d.e-]+, confident [\d.]+\)", line
        )
    # and a line for each training step between them (plain_every_n_steps=1): the one step's
    train = [line for line in lines if "val/mIoU" not in line]
    assert [re.search(r"step (\d+)", line)[1] for line in train] == ["1", "3"], lines
    assert all(re.search(r"step \d+  train loss [\d.]+ \(sup ", line) for line in train)
    assert all("/-" not in line for line in lines)  # max_epochs -1: no "0/-2"


def test_semi_runs_record_their_loss_parts_in_the_history(redirected_fixmatch):
    _, run = redirected_fixmatch
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [2, 4]
    for point in history:
        train = point["train"]  # the means of every train/* value over the steps since the last
        assert {"loss", "loss_sup", "loss_unsup", "confident"} <= set(train), train
        assert train["confident"] == 1.0  # threshold 0: every pseudo-label counts
        # FixMatch logs the parts' shares of its loss: their means add up to the loss's mean
        assert train["loss"] == pytest.approx(train["loss_sup"] + train["loss_unsup"])


def test_train_means_continue_across_a_checkpoint():
    from seglight.callbacks._common import TrainMeans

    def step(means: TrainMeans, loss: float, confident: float) -> None:
        logged = {"train/loss_step": torch.tensor(loss), "train/confident": torch.tensor(confident)}
        logged["train/loss"] = logged["train/loss_step"]  # Lightning's two names, one tensor
        means.update(SimpleNamespace(callback_metrics=logged))

    straight, before = TrainMeans(), TrainMeans()
    for means in (straight, before):
        step(means, 1.0, 0.0)
    resumed = TrainMeans()
    resumed.load_state_dict(before.state_dict())  # a mid-epoch checkpoint, then a resume
    for means in (straight, resumed):
        step(means, 2.0, 0.5)
    assert straight.pop() == resumed.pop() == {"loss": 1.5, "confident": 0.25}


def test_the_bar_shows_the_loss_parts_in_a_terminal():
    from seglight.callbacks import RichProgressBar

    bar = RichProgressBar()
    values = {"train/loss_step": 1.21, "train/loss": 1.21, "train/loss_sup": 2.43,
              "train/loss_unsup": 0.0, "train/confident": 0.0}  # fmt: skip
    shown = bar.get_metrics(_trainer(values, 0), None)
    assert shown == {"loss": "1.21", "sup": "2.43", "unsup": "0", "confident": "0"}


# ----------------------------------------------------------------------------- noise
def test_known_noise_is_silenced_and_the_rest_kept(monkeypatch):
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 0)  # as in a plain run, whatever ran before

    from seglight.utils import silence_known_noise

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    # a handler on Lightning's own logger: pytest's caplog sits on the root logger, which Lightning
    # cuts off (propagate=False) when it is imported before any handler exists
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    records = Records()
    logger.addHandler(records)
    level = logger.level
    logger.setLevel(logging.INFO)  # `bench` quiets Lightning's INFO in-process (tests run it)
    try:
        silence_known_noise()
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try litlogger")
        rank_zero_info("Trainer already configured with model summary callbacks: [...]")
        rank_zero_info("GPU available: False, used: False")
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert records.messages == ["GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        silence_known_noise()  # after simplefilter: the filter goes first again
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use", FutureWarning, 2)
        warnings.warn("something else is deprecated", FutureWarning, 2)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_wandb_logger_passes_no_anonymous_setting_and_is_quiet(monkeypatch, tmp_path):
    from seglight.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path))
    # W&B warns "The anonymous setting has no effect" whenever the key is passed, even as None
    assert "anonymous" not in logger._wandb_init
    assert logger._wandb_init["settings"] == {"quiet": True}  # no 40-line summary per run


def test_model_summary_leaves_out_unmeasured_flops(capsys):
    from seglight.callbacks import RichModelSummary

    data = [(" ", ["0", "1"]), ("Name", ["net", "head"]), ("Type", ["UNet", "Conv2d"]),
            ("Params", ["1.0 K", "45"]), ("Mode", ["train", "train"]), ("FLOPs", ["0", "0"])]  # fmt: skip
    RichModelSummary.summarize(data, 1045, 1045, 0.004, {"train": 2, "eval": 0}, 0)
    out = capsys.readouterr().out
    assert "net" in out and "Conv2d" in out and "1.0 K" in out
    assert "FLOPs" not in out


# ----------------------------------------------------------------------------- compare
def make_runs(root: Path, n: int, keys: int = 6) -> list:
    """`n` run directories whose configs differ in `keys` settings (1..6), CamVid classes."""
    rng = np.random.default_rng(0)
    for i in range(n):
        init = {"encoder": ENCODERS[i % 5], "lr": [0.001, 0.0005, 0.002][i % 3]}
        init.update({"loss": ["ce", "dice", "focal", "lovasz", {"ce": 1.0, "dice": 0.5}][i % 5]})
        init["class_weights"] = "median_frequency" if i % 4 == 0 else None
        data = {"crop_size": [[256, 256], [360, 480]][i % 2], "scale_range": [0.5, 2.0 - i / 10]}
        config = {
            "trainer": {"max_epochs": 10, "default_root_dir": f"runs/unet/version_{i}"},
            "model": {"class_path": "seglight.models.UNet", "init_args": init},
            "data": {"class_path": "seglight.data.CamVid", "init_args": data},
        }
        if keys < 6:  # only the first `keys` settings differ
            for k in list(init)[keys:]:
                init[k] = "same"
            data.update(crop_size=[1, 1], scale_range=[1, 1])
        ious = rng.uniform(0.1, 0.95, len(CAMVID))
        scores = {"mIoU": float(ious.mean()), "acc": 0.9, "mAcc": 0.7}
        scores.update({f"IoU/{c}": float(v) for c, v in zip(CAMVID, ious, strict=True)})
        history = [{"step": 50 * (e + 1), "mIoU": ious.mean() * (e + 1) / 10} for e in range(10)]
        metrics = {"test": scores, "val": scores, "class_names": CAMVID, "history": history,
                   "params": 24_000_000 + i, "throughput": {"train_images_per_s": 20.0 + i}}  # fmt: skip
        run = root / "runs" / "unet" / f"version_{i}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        (run / "metrics.json").write_text(json.dumps(metrics))
    return load_runs([root / "runs"])


def _render(table, width: int = 120) -> str:
    from rich.console import Console

    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(table)
    return console.file.getvalue()


@pytest.mark.parametrize("n, keys", [(3, 1), (5, 6), (10, 6)])
def test_compare_table_fits_120_columns_without_cutting_names(tmp_path, n, keys):
    runs = make_runs(tmp_path, n, keys)
    out = _render(compare_table(runs))
    assert max(map(len, out.splitlines())) <= 120
    assert "…" not in out, out  # rich's ellipsis: something was cut
    for run in runs:
        assert run.name in out
    if keys == 1:  # few settings: one column each
        assert "encoder" in out.splitlines()[2] and "settings" not in out
    else:  # many: one wrapped column of key=value pairs
        assert "settings" in out
        assert "encoder=mobilenetv3_large_100" in out and "loss={ce:1.0,dice:0.5}" in out
    for run in runs:
        assert f"{100 * run.scores('test')['mIoU']:.2f}" in out


def _outside(fig) -> list[str]:
    """The texts (and the tight bounding box) of a drawn figure that reach outside it."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    bad = []
    # tick labels exist beyond the axes' limits too, undrawn: only those within them count
    ticks, drawn = set(), set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks():
                ticks.add(id(tick.label1))
                if low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                    drawn.add(id(tick.label1))
    for text in fig.findobj(Text):
        if not text.get_visible() or not text.get_text().strip():
            continue
        if id(text) in ticks and id(text) not in drawn:
            continue
        ext = text.get_window_extent(renderer)
        if ext.x0 < box.x0 - 1 or ext.y0 < box.y0 - 1 or ext.x1 > box.x1 + 1 or ext.y1 > box.y1 + 1:
            bad.append(text.get_text())
    tight = fig.get_tightbbox(renderer)  # every artist, in inches
    width, height = fig.get_size_inches()
    if tight.x0 < -0.01 or tight.y0 < -0.01 or tight.x1 > width + 0.01 or tight.y1 > height + 0.01:
        bad.append(f"tight bbox {tight.bounds} beyond {width}x{height}")
    return bad


@pytest.mark.parametrize("n", [1, 5, 10])
def test_compare_plots_keep_every_text_inside_and_name_runs_as_the_table(tmp_path, n):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    runs = make_runs(tmp_path, n)
    for make in (per_class_figure, curves_figure):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "constrained_layout not applied ... collapsed"
            fig = make(runs)
            FigureCanvasAgg(fig)
            assert _outside(fig) == [], make.__name__
            legend = fig.legends[0] if fig.legends else fig.axes[0].get_legend()
            names = [t.get_text() for t in legend.get_texts()]
        # the legend names the runs as the table's first column does
        assert [name.split(":")[0] for name in names] == [run.name for run in runs]
        ax = fig.axes[0]
        # the plot keeps most of the figure: the legend goes below, it does not squeeze the axes
        assert ax.get_position().height > 0.45 and ax.get_position().width > 0.6


def test_confusion_matrix_keeps_every_text_inside():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    names = [*CAMVID, "a class with a long name"]
    confmat = np.random.default_rng(0).integers(0, 100, (len(names), len(names)))
    fig = confusion_figure(confmat, names, title="UNet test, epoch 17: mIoU 61.3%")
    FigureCanvasAgg(fig)
    assert _outside(fig) == []


# ----------------------------------------------------------------------------- start-up
def _imported(command: list[str], cwd: Path) -> set[str]:
    code = (
        "import sys; from seglight.cli import run; run(sys.argv[1:]); "
        "print('IMPORTED', ' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *command], capture_output=True, text=True, check=True, cwd=cwd
    ).stdout
    return set(out.rsplit("IMPORTED", 1)[1].split())


def test_light_commands_import_only_what_they_need(tmp_path):
    runs = make_runs(tmp_path, 2)
    modules = _imported(["compare", str(runs[0].path), str(runs[1].path)], tmp_path)
    assert not {"torch", "lightning", "timm", "wandb", "matplotlib"} & modules
    modules = _imported(["datasets", "Synthetic"], REPO)
    assert "seglight.data" in modules
    assert not {"timm", "seglight.models", "wandb"} & modules  # not the model zoo
