"""Trustworthy runs: last.ckpt always holds the latest state, a run killed with kill -9 and
resumed with --ckpt_path last ends exactly as the uninterrupted run, checkpoints are written
atomically, and a NaN loss stops training without a checkpoint of the diverged model.

The runs are the real CLI in subprocesses (ENet, the smallest network with dropout, on 16x16
crops of tiny fake CamVid data). A test callback kills its own process with SIGKILL at a
chosen training step, or limits the size of the files it may write (RLIMIT_FSIZE with SIGXFSZ's
default action: the kernel kills the process in the middle of a write)."""

from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_fake_camvid, run_cli

ENET = str(REPO / "experiments" / "enet.yaml")

#: a callback module the runs import (tmp dir on PYTHONPATH): kill -9 at a step, or during a write
KILLERS = '''
import os, resource, signal
import lightning as L

class KillAt(L.Callback):
    """SIGKILL this process after training step `step` (and the checkpoints of that step)."""
    def __init__(self, step: int):
        self.step = step
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

class KillDuringSave(L.Callback):
    """From step `step` on, any write beyond `max_bytes` kills this process (SIGXFSZ)."""
    def __init__(self, step: int, max_bytes: int):
        self.step, self.max_bytes = step, max_bytes
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_bytes, self.max_bytes))

class KillAtEpochStart(L.Callback):
    """SIGKILL at the start of epoch `epoch`: right after the previous epoch's checkpoints."""
    def __init__(self, epoch: int):
        self.epoch = epoch
    def on_train_epoch_start(self, trainer, *args):
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def enet(root: Path, run_dir: Path, *extra: str) -> list[str]:
    """ENet on tiny data, constant LR (a 2-epoch run and a 3-epoch run share their first two
    epochs), no warm-up, 0 workers, in `run_dir`."""
    return [
        "--config", ENET,
        "--data.root", str(root),
        "--data.crop_size", "[16, 16]",
        "--data.batch_size", "2",
        "--data.num_workers", "0",
        "--model.scheduler", "constant",
        "--model.lr", "0.01",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(run_dir),
        *extra,
    ]  # fmt: skip


def callbacks_config(
    path: Path, every_n_train_steps: int = 0, extra: str = "", monitor: str = "val/mIoU",
    mode: str = "max",
) -> Path:  # fmt: skip
    """A config whose callbacks are a ModelCheckpoint (last.ckpt every n steps) and `extra`."""
    path.write_text(
        textwrap.dedent(f"""\
        trainer:
          callbacks:
            - class_path: seglight.callbacks.ModelCheckpoint
              init_args:
                monitor: {monitor}
                mode: {mode}
                save_last: true
                every_n_train_steps: {every_n_train_steps}
        """)
        + textwrap.indent(extra, " " * 4)
    )
    return path


def killer(name: str, **args: int) -> str:
    init = "".join(f"\n    {k}: {v}" for k, v in args.items())
    return f"- class_path: killers.{name}\n  init_args:{init}\n"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "killers.py").write_text(KILLERS)
    return make_fake_camvid(tmp_path / "camvid", {"train": 6, "val": 2, "test": 1})


def fit(tmp_path: Path, *args: str, check: bool = True):
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}", "OMP_NUM_THREADS": "1"}
    return run_cli(["fit", *args], cwd=tmp_path, env=env, check=check)


def final_state(run_dir: Path) -> tuple[dict, dict]:
    """(metrics.json's training record, the last checkpoint's weights)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record = {k: metrics[k] for k in ("val", "best_val", "history", "epoch", "step")}
    for point in record["history"]:  # the time it took differs, everything else is exact
        point.pop("wall_s", None)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return record, ckpt["state_dict"]


def assert_same_run(a: Path, b: Path) -> None:
    (record_a, weights_a), (record_b, weights_b) = final_state(a), final_state(b)
    assert record_a == record_b  # every validation of the history, bit for bit
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_and_after_kill_mid_epoch_is_exact(tmp_path, data):
    straight = tmp_path / "straight"
    fit(tmp_path, *enet(data, straight, "--trainer.max_epochs", "3"))

    # fit 2 epochs, then resume to 3: the same as 3 straight epochs (constant LR)
    boundary = tmp_path / "boundary"
    fit(tmp_path, *enet(data, boundary, "--trainer.max_epochs", "2"))
    fit(tmp_path, *enet(data, boundary, "--trainer.max_epochs", "3", "--ckpt_path", "last"))
    assert_same_run(straight, boundary)

    # kill -9 in the middle of epoch 1 (3 steps per epoch; last.ckpt written every step), resume
    killed = tmp_path / "killed"
    config = callbacks_config(tmp_path / "kill.yaml", 1, killer("KillAt", step=5))
    proc = fit(tmp_path, *enet(data, killed, "--trainer.max_epochs", "3"), "--config", str(config),
               check=False)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # killed after step 5 ran, before its checkpoint (checkpoint callbacks run last): the resumed
    # run redoes step 5 from the state of step 4
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    config = callbacks_config(tmp_path / "resume.yaml", 1)
    fit(tmp_path, *enet(data, killed, "--trainer.max_epochs", "3", "--ckpt_path", "last"),
        "--config", str(config))  # fmt: skip
    assert_same_run(straight, killed)
