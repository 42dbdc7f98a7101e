"""Resuming from a checkpoint written at an epoch's end is exact on real files with random crops,
when training is bounded by `max_steps` (ending mid-epoch): from the straight run's epoch-0
checkpoint, and after a kill -9 right after that checkpoint was written (`--ckpt_path last`),
the fit ends with the straight run's weights bit for bit; for a plain model and for FixMatch.

The data is a Folder of 0/255 binary masks (`mask_format binary`, the membranes case); the runs
are the real CLI in subprocesses, on a quickstart-like U-Net of 4 base channels."""

from __future__ import annotations

import os
import shutil
import signal
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli
from PIL import Image
from test_resume import KILLERS

QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")


def make_binary_folder(root: Path, n: int = 12, size: tuple[int, int] = (24, 32)) -> Path:
    """A Folder dataset of `n` images with 0/255 masks (a vertical and a horizontal stripe)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text("classes: [background, membrane]\n")
    for i in range(n):
        mask = np.zeros(size, np.uint8)
        col, row = rng.integers(0, size[1] - 4), rng.integers(0, size[0] - 3)
        mask[:, col : col + 4] = 255
        mask[row : row + 3] = 255
        grey = (mask // 2 + rng.integers(0, 60, size)).astype(np.uint8)
        Image.fromarray(np.stack([grey] * 3, -1)).save(root / "images" / f"img{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"img{i:02d}.png")
    return root


def config(path: Path, semi: bool, callbacks: str = "") -> Path:
    """The membranes setup, tiny: crops 16x24, batch 2, no workers, U-Net (base 4), max_steps
    ending mid-epoch; every epoch's checkpoint kept; `callbacks` added after ModelCheckpoint."""
    unet = "{class_path: UNet, init_args: {encoder: original, base_channels: 4}}"
    if semi:  # 4 labelled and 7 unlabelled images: 3 steps an epoch; the labelled loader cycles
        model = f"class_path: FixMatch\ninit_args: {{network: {unet}, lr: 0.01}}"
        data = textwrap.dedent("""\
            class_path: SemiSupervised
            init_args:
              dataset: {class_path: Folder, init_args: {root: ROOT, mask_format: binary}}
              labeled: 4
              batch_size: 2
              num_workers: 0
              crop_size: [16, 24]
            """)
        max_steps = 8
    else:  # 11 training images: 5 steps an epoch
        model = "class_path: UNet\ninit_args: {encoder: original, base_channels: 4, lr: 0.01}"
        data = textwrap.dedent("""\
            class_path: Folder
            init_args: {root: ROOT, mask_format: binary, crop_size: [16, 24], batch_size: 2,
                        num_workers: 0}
            """)
        max_steps = 12
    text = f"""\
model:
{textwrap.indent(model, "  ")}
data:
{textwrap.indent(data.replace("ROOT", str(path.parent / "data")), "  ")}
trainer:
  max_steps: {max_steps}
  accelerator: cpu
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: seglight.callbacks.ModelCheckpoint
      init_args: {{monitor: val/mIoU, mode: max, save_last: true, save_top_k: -1,
                  filename: "epoch{{epoch:03d}}", auto_insert_metric_name: false}}
{textwrap.indent(callbacks, "    ")}"""
    path.write_text(text)
    return path


def fit(tmp_path: Path, cfg: Path, run_dir: Path, *extra: str, check: bool = True):
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}", "OMP_NUM_THREADS": "1"}
    args = ["fit", "--config", QUICKSTART, "--config", str(cfg),
            "--trainer.default_root_dir", str(run_dir), *extra]  # fmt: skip
    return run_cli(args, cwd=tmp_path, env=env, check=check)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] > 0
    return ckpt["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ: {differ[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("semi", [False, True], ids=["unet", "fixmatch"])
def test_resume_from_an_epoch_end_checkpoint_is_exact(tmp_path, semi):
    make_binary_folder(tmp_path / "data")
    (tmp_path / "killers.py").write_text(KILLERS)
    cfg = config(tmp_path / "run.yaml", semi)
    straight = tmp_path / "straight"
    fit(tmp_path, cfg, straight)
    assert torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2

    # from the straight run's epoch-0 checkpoint (written at the epoch's end), in another folder
    resumed = tmp_path / "resumed"
    epoch0 = tmp_path / "epoch000.ckpt"
    shutil.copy(straight / "checkpoints" / "epoch000.ckpt", epoch0)
    fit(tmp_path, cfg, resumed, "--ckpt_path", str(epoch0))
    assert_same_weights(straight, resumed)

    # kill -9 right after epoch 0's checkpoints were written, then --ckpt_path last
    killed = tmp_path / "killed"
    kill_cfg = config(
        tmp_path / "kill.yaml",
        semi,
        "- {class_path: killers.KillAtEpochStart, init_args: {epoch: 1}}",
    )
    proc = fit(tmp_path, kill_cfg, killed, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    fit(tmp_path, cfg, killed, "--ckpt_path", "last")
    assert_same_weights(straight, killed)


def test_resume_from_an_epoch_end_checkpoint_is_exact_in_process(tmp_path):
    """The fast form: the plain model, in this process, straight and from epoch 0's checkpoint."""
    from seglight.cli import run as cli_run

    make_binary_folder(tmp_path / "data")
    cfg = config(tmp_path / "run.yaml", semi=False)
    args = ["fit", "--config", QUICKSTART, "--config", str(cfg), "--trainer.logger", "false",
            "--threads", "1"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli_run([*args, "--trainer.default_root_dir", str(straight)])
    epoch0 = tmp_path / "epoch000.ckpt"
    shutil.copy(straight / "checkpoints" / "epoch000.ckpt", epoch0)
    cli_run([*args, "--trainer.default_root_dir", str(resumed), "--ckpt_path", str(epoch0)])
    assert_same_weights(straight, resumed)


def test_extending_a_run_that_stopped_at_max_steps_mid_epoch_is_exact(tmp_path):
    """last.ckpt of a run stopped by max_steps mid-epoch (written at that epoch's cut-short end),
    resumed with a larger max_steps, ends as a straight run to that many steps (constant LR:
    the schedule would depend on max_steps)."""
    from seglight.cli import run as cli_run

    make_binary_folder(tmp_path / "data")
    cfg = config(tmp_path / "run.yaml", semi=False)
    args = ["fit", "--config", QUICKSTART, "--config", str(cfg), "--trainer.logger", "false",
            "--threads", "1", "--model.scheduler", "constant", "--model.warmup_steps", "0"]  # fmt: skip
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    cli_run([*args, "--trainer.max_steps", "12", "--trainer.default_root_dir", str(straight)])
    cli_run([*args, "--trainer.max_steps", "7", "--trainer.default_root_dir", str(extended)])
    cli_run([*args, "--trainer.max_steps", "12", "--trainer.default_root_dir", str(extended),
             "--ckpt_path", "last"])  # fmt: skip
    assert_same_weights(straight, extended)
