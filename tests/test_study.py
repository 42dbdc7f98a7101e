"""scripts/study.py (the resumable study runner) and scripts/render_results.py (README's study
tables and plots from results/*.csv)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_fake_camvid

from seglight.data.camvid import CamVid


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def study(tmp_path, monkeypatch):
    module = load("study")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    return module


@pytest.fixture
def render(tmp_path, monkeypatch):
    module = load("render_results")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "README", tmp_path / "README.md")
    return module


def fake_run_dir(path, mious, steps, test=None):
    """A run folder with a metrics.json as MetricsSummary writes it: one history point per
    validation at steps/len(mious) intervals."""
    every = steps // len(mious)
    history = [
        {
            "step": every * (i + 1),
            "epoch": i,
            "mIoU": m,
            "loss": 1.0 - m,
            "train": {"train/confident": 0.1 * i, "loss_sup": 0.5},
        }
        for i, m in enumerate(mious)
    ]
    summary = {"history": history}
    if test is not None:
        summary["evaluations"] = [{"stage": "test", "metrics": {"mIoU": test}}]
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(summary))
    return path


def test_summarise_reads_final_75_percent_and_test(study, tmp_path):
    # 20 validations over 4000 steps: the 15th (step 3000) is 75% of the run
    mious = [0.1 + 0.02 * i for i in range(15)] + [0.395, 0.40, 0.40, 0.401, 0.402]
    run = study.Run("semi", "fixmatch", "DDRNet", 0.125, 1, 4000, [])
    row, curves = study.summarise(
        run, fake_run_dir(tmp_path / "r", mious, 4000, 0.37), 812.4, "cmd"
    )
    assert row["val_mIoU"] == "40.20" and row["val_mIoU_75"] == "38.00"
    assert row["val_mIoU_best"] == "40.20" and row["test_mIoU"] == "37.00"
    assert row["converged"] == "False"  # 40.2 vs 38.0 at 75%: more than 1 point apart
    assert row["labeled"] == "0.125" and row["seed"] == 1 and row["wall_s"] == "812"
    # MetricsSummary's training means ("train": {...}) become train/<name> curves
    assert {c["metric"] for c in curves} == {"mIoU", "loss", "train/confident", "train/loss_sup"}
    assert len([c for c in curves if c["metric"] == "mIoU"]) == 20


def test_summarise_converged_within_one_point(study, tmp_path):
    mious = [0.3] * 14 + [0.500, 0.502, 0.503, 0.505, 0.506, 0.509]
    run = study.Run("semi", "supervised", "DDRNet", 1.0, 0, 2000, [])
    row, _ = study.summarise(run, fake_run_dir(tmp_path / "r", mious, 2000), 1.0, "cmd")
    assert row["val_mIoU_75"] == "50.00" and row["converged"] == "True"


def test_summarise_refuses_a_run_without_its_last_validation(study, tmp_path):
    run = study.Run("semi", "cps", "DDRNet", 0.125, 0, 4000, [])
    path = fake_run_dir(tmp_path / "r", [0.1, 0.2], 2000)  # stopped at step 2000 of 4000
    with pytest.raises(RuntimeError, match="no validation at the last step 4000"):
        study.summarise(run, path, 1.0, "cmd")


def test_recorded_runs_are_skipped_and_rows_appended(study, tmp_path):
    opts = study.argparse.Namespace(
        methods="supervised,fixmatch", labeled="0.125", steps=400, runs_dir=str(tmp_path)
    )
    runs = study.semi_runs(opts, [0, 1], ["--data.root", "X"])
    assert [r.name for r in runs] == [
        "supervised-l0.125-s0", "supervised-l0.125-s1", "fixmatch-l0.125-s0", "fixmatch-l0.125-s1",
    ]  # fmt: skip
    fix = runs[2].args
    assert fix[fix.index("--model.network") + 1] == "DDRNet"
    assert fix[fix.index("--trainer.val_check_interval") + 1] == "20"
    assert (
        fix[fix.index("--data.init_args.seed") + 1]
        == "0"
        == fix[fix.index("--seed_everything") + 1]
    )
    row = dict.fromkeys(study.COLUMNS, "")
    row.update(method="fixmatch", network="DDRNet", labeled="0.125", seed="0", steps="400")
    study.append_rows(study.RESULTS / "semi.csv", study.COLUMNS, [row])
    todo = list(study.iterate(runs, study.recorded("semi")))
    assert [r.name for r in todo] == [r.name for r in runs if r.name != "fixmatch-l0.125-s0"]
    with (study.RESULTS / "semi.csv").open() as f:
        assert next(csv.reader(f)) == study.COLUMNS


def test_a_run_folder_started_with_another_command_is_not_resumed(
    study, tmp_path, monkeypatch, capsys
):
    """A run's folder keeps the command it was started with; resuming it with other settings (a
    changed optimiser or budget) would record one row trained under two, so it is refused."""
    opts = study.argparse.Namespace(
        methods="supervised", labeled="0.125", steps=400, runs_dir=str(tmp_path)
    )
    (run,) = study.semi_runs(opts, [0], ["--data.root", "X"])
    folder = tmp_path / "semi" / run.name
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    (folder / study.STARTED_WITH).write_text("python -m seglight fit --model.lr 0.01\n")
    calls = []
    monkeypatch.setattr(
        study.subprocess,
        "run",
        lambda *a, **k: calls.append(a) or study.argparse.Namespace(returncode=0),
    )
    study.execute(run, tmp_path, tmp_path / "logs" / "x", dry_run=False)
    assert calls == [] and "REFUSED semi/" + run.name in capsys.readouterr().out
    assert (folder / "checkpoints" / "last.ckpt").is_file()  # nothing removed
    # the same command resumes
    (folder / study.STARTED_WITH).write_text(study.command_of(run) + "\n")
    monkeypatch.setattr(study, "summarise", lambda *a: (dict.fromkeys(study.COLUMNS, ""), []))
    (folder / "metrics.json").write_text("{}")
    study.execute(run, tmp_path, tmp_path / "logs" / "x", dry_run=False)
    assert (
        "--ckpt_path" in calls[0][0] and calls[0][0][calls[0][0].index("--ckpt_path") + 1] == "last"
    )


def test_no_method_runs_without_unlabelled_images(study, tmp_path):
    opts = study.argparse.Namespace(
        methods=None, labeled="1.0,0.125", steps=None, runs_dir=str(tmp_path)
    )
    camvid = make_fake_camvid(tmp_path / "camvid")
    runs = study.semi_runs(opts, [0], ["--data.root", str(camvid)])
    full = [r.method for r in runs if r.labeled == 1.0]
    assert full == ["supervised"]
    assert {r.steps for r in runs if r.labeled == 1.0} == {study.SEMI_STEPS[1.0]}
    assert len([r for r in runs if r.labeled == 0.125]) == len(study.SEMI_METHODS)
    # DecoupledNet learns from image-level labels of every training image, from the masks
    decoupled = next(r for r in runs if r.method == "decoupled").args
    labels = json.loads(
        Path(decoupled[decoupled.index("--data.init_args.image_labels") + 1]).read_text()
    )
    assert len(labels) == 6 and all(set(v) <= set(CamVid.class_names) for v in labels.values())


def write_semi(render, rows):
    render.RESULTS.mkdir(parents=True, exist_ok=True)
    with (render.RESULTS / "semi.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["method", "labeled", "seed", "val_mIoU", "test_mIoU",
                                    "converged", "steps"])  # fmt: skip
        writer.writeheader()
        writer.writerows(rows)


def test_paired_gain_and_its_confidence_interval(render):
    # gains 2, 3, 4: mean 3, sd 1, t(2) = 4.303 -> half-width 4.303 / sqrt(3) = 2.484
    assert render.paired_gain([2.0, 3.0, 4.0]) == "+3.0 [+0.5, +5.5]"
    assert render.paired_gain([1.5]) == "+1.5"


def test_readme_sections_are_rendered_from_the_csv(render):
    rows = []
    for seed, (sup, fix) in enumerate([(40.0, 42.0), (41.0, 44.0), (39.0, 43.0)]):
        for method, test in (("supervised", sup), ("fixmatch", fix)):
            rows.append({"method": method, "labeled": "0.125", "seed": seed, "val_mIoU": test + 1,
                         "test_mIoU": test, "converged": "True", "steps": 4000})  # fmt: skip
    write_semi(render, rows)
    render.README.write_text("intro\n<!-- results:semi -->\nstale\n<!-- /results:semi -->\nend\n")
    assert render.main(["--check"]) == 1
    assert render.main([]) == 0
    text = render.README.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("end\n")
    fixmatch = next(line for line in text.splitlines() if "FixMatch" in line)
    # test 43.0 ± 1.0; paired gains 2, 3, 4 -> +3.0 [+0.5, +5.5]; 3 of 3 converged
    assert "| 1/8 | FixMatch | 3 | 44.0 ± 1.0 | 43.0 ± 1.0 | +3.0 [+0.5, +5.5] | 3/3 |" in fixmatch
    assert render.main(["--check"]) == 0


def test_quickstart_study_pairs_thread_counts_per_seed(study, render, tmp_path):
    opts = study.argparse.Namespace(steps=None)
    runs = study.quickstart_runs(opts, [0, 1], [])
    assert [(r.name, r.threads, r.steps) for r in runs] == [
        ("threads1-s0", 1, 1600), ("threads2-s0", 2, 1600),
        ("threads1-s1", 1, 1600), ("threads2-s1", 2, 1600),
    ]  # fmt: skip
    assert study.seglight("fit", [], runs[1].threads)[-2:] == ["--threads", "2"]
    rows = [
        dict.fromkeys(study.COLUMNS, "")
        | {"method": f"threads{t}", "seed": "0", "val_mIoU_best": best, "val_mIoU": best}
        for t, best in ((1, "94.00"), (2, "92.50"))
    ]
    table = render.quickstart_table(rows)
    assert "| 0 | 94.00 | 92.50 | 1.50 | 94.00 / 92.50 |" in table
