"""Multi-node runs: two simulated nodes on this machine (torchrun --nnodes 2, one CPU process
each, gloo on 127.0.0.1). Each process parses the command line on its own; rank 0 alone
reserves runs/<experiment>/version_N and every rank uses it (seglight.commands.train)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO, make_fake_camvid, run_cli
from test_ddp import assert_same_metrics
from test_resume import enet

from seglight.commands.train import RUN_DIR_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_write_one_run_directory_with_metrics_of_all_ranks(tmp_path):
    root = make_fake_camvid(tmp_path / "camvid", {"train": 4, "val": 5, "test": 1})
    args = enet(
        root, tmp_path / "unused", "--trainer.max_epochs", "1", "--data.val_batch_size", "1"
    )
    args = args[: args.index("--trainer.default_root_dir")]  # runs/enet/version_N: rank 0 decides
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
    }
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "seglight", "fit", *args, "--trainer.num_nodes", "2", "--trainer.devices", "1",
             "--trainer.strategy", "ddp"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-5000:]

    (run,) = (tmp_path / "runs" / "enet").glob("version_*")  # one run directory, not one per node
    assert sorted(p.name for p in tmp_path.rglob("metrics.json")) == ["metrics.json"]
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    two_nodes = json.loads((run / "metrics.json").read_text())["val"]

    # the same weights validated by one process: every sample of both nodes counted once
    single = tmp_path / "single"
    run_cli(
        ["validate", *enet(root, single, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                           "--data.val_batch_size", "1")],
        cwd=tmp_path,
    )  # fmt: skip
    (evaluation,) = json.loads((single / "metrics.json").read_text())["evaluations"]
    # (not val/loss: each rank validated with its own BatchNorm running statistics; the
    # reduction of the loss over ranks is tested in test_ddp.py)
    assert_same_metrics(two_nodes, evaluation["metrics"], loss=False)


def setup_run_dir(ckpt_path: str | None = None) -> str:
    """The run directory that `seglight fit` (ENet) picks in this process's environment."""
    from jsonargparse import Namespace

    from seglight.commands.train import SeglightCLI

    config = Namespace(
        model=Namespace(class_path="seglight.models.ENet"),
        trainer=Namespace(default_root_dir=None),
        ckpt_path=ckpt_path,
    )
    cli = SeglightCLI.__new__(SeglightCLI)  # the run-directory logic only, no parsing
    cli.experiment = "enet"
    cli._setup_run_dir(config, "fit")
    return config.trainer.default_root_dir


def test_only_rank_zero_reserves_a_run_directory_and_slurm_requeues_find_theirs(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(var, raising=False)
    # torchrun: a rank other than 0 reserves nothing (RunDirectorySync hands rank 0's over)
    monkeypatch.setenv("RANK", "1")
    assert setup_run_dir() == "runs/enet"
    assert not list((tmp_path / "runs" / "enet").glob("version_*"))
    monkeypatch.setenv("RANK", "0")
    assert setup_run_dir() == "runs/enet/version_0"
    monkeypatch.delenv("RANK")

    # srun: rank 0 records its directory under the job and step ids ...
    slurm = {"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242",
             "SLURM_STEP_ID": "0", "SLURM_PROCID": "0"}  # fmt: skip
    for var, value in slurm.items():
        monkeypatch.setenv(var, value)
    assert setup_run_dir() == "runs/enet/version_1"
    # ... where the other ranks, and the requeued job (same ids), find it
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert setup_run_dir() == "runs/enet/version_1"
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv(RUN_DIR_ENV, "")  # a new process
    assert setup_run_dir() == "runs/enet/version_1"
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job: another run
    assert setup_run_dir() == "runs/enet/version_2"
