"""A run folder is self-contained: moved or copied, `--ckpt_path best` finds the best checkpoint
in that folder's checkpoints/, never the file of the run it was copied from, and a fit resumed
there keeps the run's best score and checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from conftest import REPO
from test_resume_epoch_end import make_binary_folder

from seglight.cli import run as cli_run
from seglight.commands.train import find_checkpoint

QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")


def tiny_fit(tmp_path: Path, run_dir: Path) -> list[str]:
    """Fit an epoch of a tiny U-Net on a binary Folder with a test split; returns the options
    shared with the evaluations."""
    root = make_binary_folder(tmp_path / "data", n=8)
    (tmp_path / "run.yaml").write_text(
        f"""\
model: {{class_path: UNet, init_args: {{encoder: original, base_channels: 4}}}}
data:
  class_path: Folder
  init_args: {{root: {root}, mask_format: binary, val_fraction: 0.2, test_fraction: 0.2,
              crop_size: [16, 24], batch_size: 2, num_workers: 0}}
trainer: {{max_epochs: 1, accelerator: cpu, logger: false, enable_progress_bar: false,
          enable_model_summary: false}}
threads: 1
"""
    )
    args = ["--config", QUICKSTART, "--config", str(tmp_path / "run.yaml")]
    cli_run(["fit", *args, "--trainer.default_root_dir", str(run_dir)])
    return args


def test_ckpt_path_best_in_a_moved_or_copied_run_folder(tmp_path):
    original = tmp_path / "runs" / "original"
    args = tiny_fit(tmp_path, original)
    best = find_checkpoint(original, "best", run_dir=True)
    assert best.parent == original / "checkpoints" and best.name != "last.ckpt"

    # a copy resolves to its own file, never the original's
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    assert find_checkpoint(copy, "best", run_dir=True) == copy / "checkpoints" / best.name

    # a moved folder: `test --ckpt_path best` tests its own best checkpoint, and records it there
    moved = tmp_path / "moved"
    shutil.move(original, moved)
    cli_run(["test", *args, "--trainer.default_root_dir", str(moved), "--ckpt_path", "best"])
    evaluation = json.loads((moved / "metrics.json").read_text())["evaluations"][-1]
    assert evaluation["stage"] == "test"
    assert Path(evaluation["checkpoint"]) == moved / "checkpoints" / best.name
    assert torch.load(moved / "checkpoints" / best.name, weights_only=True)["global_step"] > 0

    # fit resumed in the moved folder keeps its best score and files: one best (top-1) stays
    cli = cli_run(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last",
                   "--trainer.default_root_dir", str(moved)])  # fmt: skip
    callback = cli.trainer.checkpoint_callback
    kept = sorted(p.name for p in (moved / "checkpoints").glob("epoch*.ckpt"))
    assert len(kept) == 1 and Path(callback.best_model_path) == moved / "checkpoints" / kept[0]
