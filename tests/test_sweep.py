"""`seglight sweep`: the grid, its dry run and W&B sweep file, and real tiny sweeps (a failing run
does not stop the others; each run has its own directory, name, W&B group and tags)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import REPO, run_cli
from test_wandb_compare import offline_env, offline_run_dirs, run_info, wandb_records

from seglight.commands.sweep import (
    cli_value,
    grid,
    parse_grid,
    run_sweep,
    smoke_args,
    variant_args,
    variant_name,
    wandb_sweep_config,
)
from seglight.errors import ConfigError, SeglightError

QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")
TINY = ["--config", QUICKSTART, *smoke_args(), "--model.base_channels", "4"]


def test_parse_grid_reads_yaml_lists():
    axes = parse_grid(
        [
            "model.init_args.encoder=[resnet18, resnet34]",
            "--data.init_args.crop_size=[[256,256],[360,480]]",
            "model.loss=[ce, {ce: 1.0, dice: 0.5}]",
            "model.lr=0.01",  # one value: fixed for every run
        ]
    )
    assert axes == {
        "model.init_args.encoder": ["resnet18", "resnet34"],
        "data.init_args.crop_size": [[256, 256], [360, 480]],
        "model.loss": ["ce", {"ce": 1.0, "dice": 0.5}],
        "model.lr": [0.01],
    }
    for bad, message in (
        ("model.lr", "expected KEY="),
        ("model.lr=", "expected KEY="),
        ("model.lr=[1, 2", "not valid YAML"),
        ("model.lr=[]", "no values"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_grid([bad])
    with pytest.raises(ConfigError, match="twice"):
        parse_grid(["a=[1]", "a=[2]"])


def test_grid_names_and_arguments():
    variants = grid({"model.init_args.encoder": ["r18", "r34"], "data.crop_size": [[2, 3], [4, 5]]})
    assert variants[0] == {"model.init_args.encoder": "r18", "data.crop_size": [2, 3]}
    assert variants[1] == {"model.init_args.encoder": "r18", "data.crop_size": [4, 5]}
    assert len(variants) == 4
    assert variant_name(variants[3]) == "encoder=r34,crop_size=4x5"
    assert variant_args(variants[3]) == [
        "--model.init_args.encoder", "r34", "--data.crop_size", "[4, 5]",
    ]  # fmt: skip
    # two keys with the same last part keep enough of their path to differ
    assert variant_name({"model.lr": 1, "data.lr": 2}) == "model.lr=1,data.lr=2"
    # every value reads back as itself (the CLI reads values as YAML)
    for value in (0.1, 1e-3, None, True, [256, 256], {"ce": 1.0, "dice": 0.5}, [[1, 2], [3]]):
        assert yaml.safe_load(cli_value(value)) == value


def test_dry_run_prints_the_runs_and_runs_nothing(tmp_path, capsys, monkeypatch):
    from seglight.cli import main

    monkeypatch.chdir(tmp_path)
    main(
        ["sweep", *TINY, "--grid", "model.base_channels=[2,4]", "--grid", "model.lr=[0.1,0.01]"]
        + ["--group", "g1", "--dry-run"]
    )
    out = capsys.readouterr().out
    assert "4 runs" in out and "g1" in out
    for name in ("base_channels=2,lr=0.1", "base_channels=4,lr=0.01"):
        assert name in out
    assert "--model.base_channels 4 --model.lr 0.01" in out.replace("\n", " ").replace("│", "")
    assert not (tmp_path / "runs").exists()


def test_bad_sweep_commands_are_clear_errors(tmp_path, capsys, monkeypatch):
    from seglight.cli import main

    monkeypatch.chdir(tmp_path)
    for argv, message in (
        (["sweep", *TINY], "at least one --grid"),
        (["sweep", "--grid", "model.lr=[1]"], "--config"),
        (["sweep", *TINY, "--grid", "model.lr=[1", "--dry-run"], "not valid YAML"),
        (["sweep", "--config", "nope.yaml", "--grid", "a=[1]"], "no such file"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_wandb_sweep_file_runs_the_same_fits(tmp_path, capsys, monkeypatch):
    from seglight.cli import main

    monkeypatch.chdir(tmp_path)
    grids = ["--grid", "model.init_args.base_channels=[2,4]"]
    grids += [
        "--grid",
        "data.init_args.image_size=[[32,32],[48,40]]",
        "--grid",
        "model.norm=[true]",
    ]
    main(["sweep", *TINY, *grids, "--wandb-sweep", "sweep.yaml"])
    assert "wandb sweep sweep.yaml" in capsys.readouterr().out
    config = yaml.safe_load((tmp_path / "sweep.yaml").read_text())
    assert config["method"] == "grid" and config["metric"] == {
        "name": "val/mIoU",
        "goal": "maximize",
    }
    assert config["parameters"]["data.init_args.image_size"] == {"values": [[32, 32], [48, 40]]}
    command = config["command"]
    assert command[:5] == ["${env}", "${interpreter}", "-m", "seglight", "fit"]
    assert command[5:-1] == TINY and command[-1] == "${args}"
    assert not (tmp_path / "runs").exists()
    assert config == wandb_sweep_config(TINY, parse_grid(grids[1::2]))

    # what W&B's agent passes for one grid point is read back by our CLI as the same values
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    point = {"model.init_args.base_channels": 2, "data.init_args.image_size": [48, 40]}
    point["model.norm"] = True
    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})["args"]
    assert "--data.init_args.image_size=[48, 40]" in args and "--model.norm=True" in args
    with pytest.raises(SystemExit):
        main(["fit", *TINY, *args, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["base_channels"] == 2
    assert printed["model"]["init_args"]["norm"] is True
    assert printed["data"]["init_args"]["image_size"] == [48, 40]


def test_in_process_sweep_keeps_going_after_a_failed_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    variants = [{"model.init_args.optimizer": "adamw"}, {"model.init_args.optimizer": "nope"}]
    runs = run_sweep(TINY, variants, group="g2", in_process=True, experiment="study")
    assert [r.status for r in runs] == ["done", "failed"]
    assert [r.run_dir.name for r in runs] == ["version_0", "version_1"]
    assert runs[0].run_dir.resolve().parent == tmp_path.resolve() / "runs" / "study"
    assert "nope" in runs[1].error
    record = json.loads((runs[1].run_dir / "sweep.json").read_text())
    assert record["status"] == "failed" and record["group"] == "g2"
    assert record["name"] == "optimizer=nope"
    assert json.loads((runs[0].run_dir / "metrics.json").read_text())["val"]["mIoU"] >= 0
    info = run_info(wandb_records(offline_run_dirs(runs[0].run_dir)[0]))
    assert info["group"] == "g2" and info["name"] == "optimizer=adamw"
    assert {"sweep", "optimizer=adamw", "UNet", "Synthetic"} <= info["tags"]
    assert "WANDB_RUN_GROUP" not in __import__("os").environ  # restored after each run
    with pytest.raises(SeglightError, match="optimizer=nope"):
        run_sweep(TINY, variants[1:], in_process=True, keep_going=False, experiment="study")


@pytest.mark.slow  # three Python processes: about 45 s on 2 busy cores
def test_sweep_command_runs_each_fit_in_its_own_process(tmp_path):
    proc = run_cli(
        ["sweep", *TINY, "--grid", "model.init_args.base_channels=[2,3]", "--group", "g3"]
        + ["--out", "res"],
        cwd=tmp_path,
    )
    base = tmp_path / "runs" / "quickstart"
    assert sorted(p.name for p in base.iterdir()) == ["version_0", "version_1"]
    names = [
        json.loads((base / v / "sweep.json").read_text())["name"]
        for v in ("version_0", "version_1")
    ]
    assert names == ["base_channels=2", "base_channels=3"]
    for version in ("version_0", "version_1"):
        assert json.loads((base / version / "sweep.json").read_text())["status"] == "done"
        assert (base / version / "checkpoints" / "last.ckpt").is_file()
    assert "base_channels=3" in proc.stdout and "mIoU %" in proc.stdout  # the comparison
    assert (tmp_path / "res" / "runs.csv").is_file()


def test_notebook_helpers_point_at_the_experiments_and_camvid(tmp_path, monkeypatch):
    from conftest import make_fake_camvid

    from seglight.commands.sweep import camvid_root, experiment

    assert experiment("unet") == str(REPO / "experiments" / "unet.yaml")
    with pytest.raises(ConfigError, match="known: .*unet"):
        experiment("nope")
    monkeypatch.setenv("SEGLIGHT_CAMVID", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="SEGLIGHT_CAMVID"):
        camvid_root()
    root = make_fake_camvid(tmp_path / "camvid", {"train": 1})
    monkeypatch.setenv("SEGLIGHT_CAMVID", str(root))
    assert camvid_root() == str(root)
