"""The real command line, in subprocesses, on tiny fake CamVid-layout data: fit then test, resume
from last.ckpt, predict, and clear errors on bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_fake_camvid, run_cli
from PIL import Image

UNET = str(REPO / "experiments" / "unet.yaml")


def tiny(root: Path, *extra: str) -> list[str]:
    """experiments/unet.yaml (+ defaults.yaml) on tiny data: small crops, resnet18, 1 worker."""
    return [
        "--config", UNET,
        "--data.root", str(root),
        "--data.crop_size", "[16, 16]",
        "--data.batch_size", "2",
        "--data.num_workers", "0",
        "--model.encoder", "resnet18",
        "--model.warmup_steps", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 2-epoch training run shared by the tests below: (work dir, data root, process)."""
    work = tmp_path_factory.mktemp("work")
    root = make_fake_camvid(work / "camvid")
    proc = run_cli(
        ["fit", *tiny(root, "--trainer.max_epochs", "2")], cwd=work, env={"WANDB_MODE": "disabled"}
    )
    return work, root, proc


def test_fit_writes_run_dir_with_checkpoints_config_and_metrics(trained):
    work, _, proc = trained
    run = work / "runs" / "unet" / "version_0"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    # the best epoch's checkpoint, named by epoch and val/mIoU (which of the two epochs of this
    # tiny run scores best is chance: 6 steps from a classifier that starts near zero)
    best = [n for n in ckpts if re.fullmatch(r"epoch00[01]-miou[01]\.\d{4}\.ckpt", n)]
    assert "last.ckpt" in ckpts and len(best) == 1, ckpts
    config = (run / "config.yaml").read_text()
    assert "encoder: resnet18" in config and "class_path: seglight.data.CamVid" in config
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == "UNet" and metrics["data"] == "CamVid" and metrics["epoch"] == 1
    assert 0.0 <= metrics["val"]["mIoU"] <= 1.0
    assert set(metrics["val"]) >= {"mIoU", "acc", "mAcc", "IoU/Sky", "IoU/Bicyclist"}
    walls = [h["wall_s"] for h in metrics["history"]]  # time to accuracy
    assert len(walls) == 2 and 0 < walls[0] < walls[1], walls
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # the data's classes were linked into the model, never typed in the config
    assert ckpt["hyper_parameters"]["num_classes"] == 11
    assert ckpt["hyper_parameters"]["class_names"][3] == "Road"


def test_test_prints_per_class_table_and_matches_an_independent_count(trained):
    work, root, _ = trained
    ckpt = work / "runs" / "unet" / "version_0" / "checkpoints" / "last.ckpt"
    out_dir = work / "eval"
    proc = run_cli(
        ["test", *tiny(root, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(out_dir))],
        cwd=work,
    )
    assert (
        "test per-class IoU" in proc.stdout and "Bicyclist" in proc.stdout and "mIoU" in proc.stdout
    )
    assert "Test metric" not in proc.stdout  # one table: not Lightning's raw one too
    (evaluation,) = json.loads((out_dir / "metrics.json").read_text())["evaluations"]
    assert evaluation["stage"] == "test" and evaluation["checkpoint"] == str(ckpt)
    reported = evaluation["metrics"]

    # independent computation: run the checkpoint ourselves and count with numpy
    from seglight.data import CamVid
    from seglight.models import UNet

    model = UNet.load_from_checkpoint(ckpt, map_location="cpu").eval()
    dm = CamVid(root=str(root), num_workers=0, batch_size=1)
    dm.setup("test")
    confmat = np.zeros((11, 11), np.int64)
    with torch.no_grad():
        for i in range(len(dm.datasets["test"])):
            sample = dm.datasets["test"][i]
            pred = model(sample["image"][None])[0].argmax(0).numpy().ravel()
            target = sample["mask"].numpy().ravel()
            keep = target != 255
            np.add.at(confmat, (target[keep], pred[keep]), 1)
    tp = np.diag(confmat)
    union = confmat.sum(0) + confmat.sum(1) - tp
    present = union > 0
    iou = tp[present] / union[present]
    assert reported["mIoU"] == pytest.approx(iou.mean(), abs=1e-6)
    assert reported["acc"] == pytest.approx(tp.sum() / confmat.sum(), abs=1e-6)
    names = model.class_names
    for c in np.flatnonzero(present):
        assert reported[f"IoU/{names[c]}"] == pytest.approx(tp[c] / union[c], abs=1e-6)


def test_resume_from_last_checkpoint(trained):
    work, root, _ = trained
    run = work / "runs" / "unet" / "version_0"
    before = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    proc = run_cli(
        ["fit", *tiny(root, "--ckpt_path", "last", "--trainer.max_epochs", "3")], cwd=work
    )
    assert "resolved to runs/unet/version_0/checkpoints/last.ckpt" in proc.stderr
    after = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # continued the same run in the same directory: one more epoch of steps, the count carried on
    steps_per_epoch = before["global_step"] // 2
    assert after["global_step"] == before["global_step"] + steps_per_epoch
    assert json.loads((run / "metrics.json").read_text())["epoch"] == 2
    assert not (work / "runs" / "unet" / "version_1").exists()


def test_predict_writes_palette_masks(trained):
    work, root, _ = trained
    ckpt = work / "runs" / "unet" / "version_0" / "checkpoints" / "last.ckpt"
    out_dir = work / "pred"
    predict = [
        "predict",
        *tiny(root, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(out_dir)),
    ]
    proc = run_cli(predict, cwd=work)
    first = out_dir / "predictions_1"  # numbered as its config, config_predict_1.yaml
    written = sorted(first.glob("*.png"))
    n = len(list((root / "test").iterdir()))
    # it says where and how many, and in which format
    assert f"wrote {n} masks to {first}/ (palette PNG" in proc.stdout
    assert f"wrote {n} overlays to {first / 'overlays'}/ (JPEG" in proc.stdout
    assert len(list((first / "overlays").glob("*.jpg"))) == n
    assert [p.stem for p in written] == sorted(p.stem for p in (root / "test").iterdir())
    with Image.open(written[0]) as im:
        assert im.mode == "P" and im.size == (32, 24)
        assert set(np.unique(np.array(im))) <= set(range(11))
        assert im.getpalette()[3 * 3 : 3 * 4] == [128, 64, 128]  # Road's colour
    with Image.open(first / "overlays" / f"{written[0].stem}.jpg") as im:
        assert im.width == 2 * 32 and im.height > 24 + 10  # the image twice, the legend below
    before = {p.name: p.read_bytes() for p in written}
    # a second predict, at half the resolution: its own folder, masks at the images' own size
    proc = run_cli([*predict, "--data.image_scale", "0.5"], cwd=work)
    # evaluated with other data options than it was trained with: said, with the fix
    assert "was trained with data.image_scale 1.0 (this predict: 0.5)" in proc.stderr
    assert "add --data.image_scale 1.0" in proc.stderr
    second = sorted((out_dir / "predictions_2").glob("*.png"))
    assert len(second) == n and (out_dir / "config_predict_2.yaml").is_file()
    with Image.open(second[0]) as im:
        assert im.size == (32, 24)  # not the loader's 16x12
    assert {p.name: p.read_bytes() for p in first.glob("*.png")} == before  # kept


def test_fit_without_a_logger(tmp_path):
    """`--trainer.logger false` with the defaults file's callbacks (a learning-rate monitor
    among them): the run trains and keeps its records (it stopped with a MisconfigurationException)."""
    root = make_fake_camvid(tmp_path / "camvid")
    run_dir = tmp_path / "run"
    run_cli(
        ["fit", *tiny(root, "--trainer.max_epochs", "1", "--trainer.logger", "false",
                      "--trainer.default_root_dir", str(run_dir))],
        cwd=tmp_path,
    )  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epoch"] == 0 and 0.0 <= metrics["val"]["mIoU"] <= 1.0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_resume_without_a_previous_run_is_a_clear_error(tmp_path):
    root = make_fake_camvid(tmp_path / "camvid", {"train": 2, "val": 1, "test": 1})
    proc = run_cli(["fit", *tiny(root, "--ckpt_path", "last")], cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "--ckpt_path last: no checkpoint found under runs/unet" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "UNett"], "unknown architecture 'UNett' (model: in the command line)"),
        (["--data", "CamVidd"], "Did you mean CamVid"),
        (["--data.root", "/no/such/folder"], "CamVid not found at '/no/such/folder'"),
        (
            ["--model.num_classes", "12"],
            "model num_classes=12 disagrees with the data: CamVid has 11 classes",
        ),
        (["--model.encoder", "resnet999"], "unknown timm encoder 'resnet999'"),
    ],
)
def test_bad_input_gives_a_short_clear_error(tmp_path, args, message):
    root = make_fake_camvid(tmp_path / "camvid", {"train": 2, "val": 1, "test": 1})
    base = tiny(root)
    if args[0] == "--data.root":
        base = [a if a != str(root) else args[1] for a in base]
        args = []
    # W&B offline (as without an account): a failed start must not leave an offline run either
    proc = run_cli(["fit", *base, *args], cwd=tmp_path, check=False, env={"WANDB_MODE": "offline"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_no_run_left(tmp_path)


def test_evaluating_with_other_data_options_than_the_training_is_noticed():
    from seglight.config import evaluation_differences

    def data(**options):
        init = {"root": "/a", "crop_size": [360, 480], "image_scale": 1.0, "batch_size": 8}
        return {"data": {"class_path": "seglight.data.CamVid", "init_args": {**init, **options}}}

    trained = data(image_scale=0.25)
    assert evaluation_differences(trained, data()) == {"data.image_scale": (0.25, 1.0)}
    # where the files are, the loader and the training's augmentation do not matter
    same = data(image_scale=0.25, root="/b", crop_size=(64, 64), batch_size=1)
    assert evaluation_differences(trained, same) == {}


@pytest.mark.parametrize(
    "option, value, answer",
    [
        ("--model.learning_rate", "0.1", "UNet has no option 'learning_rate'. Did you mean --model.lr?"),
        # an abbreviation is refused, not taken as max_epochs
        ("--trainer.max_epoch", "3", "--trainer.max_epoch (abbreviations are not taken). Did you mean --trainer.max_epochs?"),
        ("--trainer.max_epochs", "abc", "--trainer.max_epochs abc: expected int or None"),
    ],
)  # fmt: skip
def test_a_mistyped_option_is_answered_in_a_line_naming_the_close_names(
    option, value, answer, capsys
):
    from seglight.cli import main

    quickstart = str(REPO / "experiments" / "quickstart.yaml")
    with pytest.raises(SystemExit) as exit_:
        # --print_config: were the option taken, the test would end at once, not train
        main(["fit", "--config", quickstart, option, value, "--print_config"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and answer in err
    assert len(err.strip().splitlines()) == 1, err  # no usage, no NestedArg dump
    assert not Path("runs").exists()


def assert_no_run_left(work: Path) -> None:
    """A failed start leaves no runs/<experiment>/version_N and no W&B run to sync."""
    assert not (work / "runs").exists() or not any((work / "runs").iterdir()), sorted(
        str(p) for p in (work / "runs").rglob("*")
    )
    assert not list(work.rglob("*run-*")), "a W&B run was started"


def test_bad_mask_fails_before_training(tmp_path):
    root = make_fake_camvid(tmp_path / "camvid", {"train": 2, "val": 1, "test": 1})
    bad = root / "trainannot" / "0001TP_train_0001.png"
    mask = np.array(Image.open(bad))
    mask[5, 5] = 77
    Image.fromarray(mask).save(bad)
    proc = run_cli(["fit", *tiny(root)], cwd=tmp_path, check=False, env={"WANDB_MODE": "offline"})
    assert proc.returncode == 2
    assert "0001TP_train_0001.png' has values [77]" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_no_run_left(tmp_path)


def test_missing_config_file(tmp_path):
    proc = run_cli(["fit", "--config", "experiments/nope.yaml"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--config experiments/nope.yaml: no such file" in proc.stderr


def test_help_shows_each_architectures_options():
    proc = run_cli(["fit", "--help"], cwd=REPO)
    assert "UNet: U-Net" in proc.stdout and "--model.encoder = 'original'" in proc.stdout
    assert "--model.base_channels = 64" in proc.stdout and "--data.root" in proc.stdout


def test_models_and_datasets_commands():
    assert "31.04M" in run_cli(["models"], cwd=REPO).stdout
    out = run_cli(["datasets"], cwd=REPO).stdout
    assert "CamVid" in out and "Synthetic" in out
    # a wrapper of any dataset says so, instead of a made-up default root of its own
    semi = out[out.index("SemiSupervised  ") :].split("\n\n")[0]
    assert "root     the wrapped dataset's" in semi and "data/semisupervised" not in semi
    assert "classes  the wrapped dataset's" in semi
