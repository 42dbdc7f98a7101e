"""The thread and worker policy (seglight.threads): never more torch threads plus loader workers
than the cores the process may use (affinity and cgroup quota), per DDP rank; what the user
sets wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seglight import threads


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    before = torch.get_num_threads()
    for name in (threads.THREADS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_TORCH_AT_IMPORT", torch.get_num_threads())
    monkeypatch.setattr(threads, "_announced", False)
    monkeypatch.setattr(threads, "machine_load", lambda: 0.0)  # a quiet machine, unless a test says
    monkeypatch.setattr(threads, "_watch", None)
    yield
    torch.set_num_threads(before)


def _cgroup_v2(tmp_path: Path, text: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cpu.max").write_text(text)
    return tmp_path


def _cgroup_v1(tmp_path: Path, quota: int, period: int = 100_000) -> Path:
    (tmp_path / "cpu").mkdir(parents=True)
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return tmp_path


def test_cgroup_quota_v1_and_v2(tmp_path):
    assert threads.cgroup_cpu_limit(_cgroup_v2(tmp_path / "a", "max 100000")) is None
    assert threads.cgroup_cpu_limit(_cgroup_v2(tmp_path / "b", "150000 100000")) == 1.5
    assert threads.cgroup_cpu_limit(_cgroup_v1(tmp_path / "c", -1)) is None
    assert threads.cgroup_cpu_limit(_cgroup_v1(tmp_path / "d", 300_000)) == 3.0
    assert threads.cgroup_cpu_limit(tmp_path / "missing") is None


def test_usable_cores_is_affinity_capped_by_quota_not_cpu_count(monkeypatch, tmp_path):
    a_few_dirs = tmp_path
    (tmp_path / "a").mkdir()
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert threads.usable_cores(a_few_dirs / "a") == 6  # no quota
    assert threads.usable_cores(_cgroup_v2(a_few_dirs / "b", "250000 100000")) == 3
    assert threads.usable_cores(_cgroup_v1(a_few_dirs / "c", 50_000)) == 1
    assert threads.usable_cores(_cgroup_v2(a_few_dirs / "d", "1600000 100000")) == 6


@pytest.mark.parametrize("affinity", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("quota", [None, 0.5, 1.5, 2, 6])
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_default_threads_plus_workers_never_exceed_the_usable_cores(
    monkeypatch, tmp_path, affinity, quota, ranks
):
    monkeypatch.setattr(os, "cpu_count", lambda: 128)  # the machine's count must not matter
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    root = tmp_path if quota is None else _cgroup_v2(tmp_path, f"{int(quota * 100000)} 100000")
    monkeypatch.setattr(threads, "_CGROUP", root)
    cores = threads.usable_cores(root)
    workers = threads.default_workers(ranks, cores)
    chosen = threads.policy_threads(workers, ranks, cores)
    assert workers >= 0 and chosen >= 1
    # every rank's threads + workers, summed over the ranks, fit the cores (or one core per rank
    # when there are more ranks than cores: a rank cannot run on less)
    assert ranks * (chosen + workers) <= max(cores, ranks)
    # and it is the most that fits: no core left idle
    assert chosen + workers == max(1, cores // ranks)


def test_explicit_workers_take_cores_from_the_threads():
    assert threads.policy_threads(0, cores=8) == 8
    assert threads.policy_threads(3, cores=8) == 5
    assert threads.policy_threads(2, ranks=2, cores=8) == 2
    assert threads.policy_threads(12, cores=8) == 1  # at least one


def test_configure_sets_torch_and_prints_once(monkeypatch, capsys):
    monkeypatch.setattr(threads, "usable_cores", lambda root=None: 3)
    torch.set_num_threads(7)
    monkeypatch.setattr(threads, "_TORCH_AT_IMPORT", 7)
    assert threads.configure_threads(workers=1) == 2
    assert torch.get_num_threads() == 2
    threads.configure_threads(workers=2)
    err = capsys.readouterr().err
    assert err.count("torch thread") == 1 and "3 usable core(s) - 1 loader worker(s)" in err


def test_busy_threads_leave_the_cores_others_keep_busy():
    assert threads.busy_threads(2, cores=2, others=0.0) == 2
    assert threads.busy_threads(2, cores=2, others=0.99) == 2  # a quiet machine: unchanged
    assert threads.busy_threads(2, cores=2, others=1.0) == 1
    assert threads.busy_threads(2, cores=2, others=9.5) == 1  # at least one
    assert threads.busy_threads(6, cores=8, others=3.2) == 5
    assert threads.busy_threads(4, cores=8, others=3.2) == 4  # never above the policy's


def test_others_load_is_the_load_less_our_own_scaled_to_our_cores(monkeypatch):
    monkeypatch.setattr(threads, "machine_load", lambda: 3.0)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert threads.others_load(2, own=2.0) == 1.0
    assert threads.others_load(2, own=4.0) == 0.0
    monkeypatch.setattr(os, "cpu_count", lambda: 16)  # our 4 of 16 processors: a quarter of it
    monkeypatch.setattr(threads, "machine_load", lambda: 12.0)
    assert threads.others_load(4) == 3.0


def test_a_busy_machine_at_start_up_gets_fewer_threads(monkeypatch, capsys):
    monkeypatch.setattr(threads, "usable_cores", lambda root=None: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "machine_load", lambda: 0.5)
    assert threads.configure_threads(workers=0) == 2  # quiet: the policy's, as before
    monkeypatch.setattr(threads, "_announced", False)
    monkeypatch.setattr(threads, "machine_load", lambda: 4.2)
    assert threads.configure_threads(workers=0) == 1
    assert torch.get_num_threads() == 1
    err = capsys.readouterr().err
    assert "other programs keep 4.2 of them busy" in err and "re-checked every 30 s" in err
    # what the user set is never changed, nor watched
    assert threads.configure_threads(workers=0, requested=2, announce=False) == 2
    assert threads.recheck_threads() is None


def test_the_load_is_rechecked_while_training(monkeypatch, capsys):
    clock = {"now": 1000.0, "cpu": 0.0}
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(threads.time, "process_time", lambda: clock["cpu"])
    monkeypatch.setattr(threads, "usable_cores", lambda root=None: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert threads.configure_threads(workers=0, announce=False) == 2  # quiet at start-up

    def run(seconds: float, own: float, load: float) -> int | None:
        monkeypatch.setattr(threads, "machine_load", lambda: load)
        clock["now"] += seconds
        clock["cpu"] += own * seconds
        return threads.recheck_threads()

    assert run(10, own=2, load=3.0) == 2  # not yet time for a look
    assert run(25, own=1.4, load=3.4) == 1  # 2 others' of 2 cores: one thread
    assert torch.get_num_threads() == 1
    assert run(35, own=1, load=1.0) == 1  # they left, but a change holds 60 s
    assert run(30, own=1, load=1.1) == 2  # the load is ours alone again
    assert run(30, own=2, load=2.2) == 2  # ours: unchanged
    assert "1 torch thread(s) from now on" in capsys.readouterr().err
    # the watch's own changes are not the user's: a later configure still follows the policy
    assert threads.user_threads() == (None, None)


def test_what_the_user_set_wins(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda root=None: 4)
    assert threads.configure_threads(workers=0, requested=3, announce=False) == 3
    monkeypatch.setenv(threads.THREADS_ENV, "2")
    assert threads.configure_threads(workers=0, announce=False) == 2
    monkeypatch.delenv(threads.THREADS_ENV)
    torch.set_num_threads(1)  # a user's call before the run
    assert threads.configure_threads(workers=0, announce=False) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.configure_threads(workers=0, announce=False) == 1
    assert torch.get_num_threads() == 1


def test_omp_num_threads_wins_in_the_cli(tmp_path):
    """A real `seglight fit` under OMP_NUM_THREADS keeps the user's count and says why."""
    repo = Path(__file__).resolve().parents[1]
    code = (
        "import sys, torch; from seglight.commands.train import run; "
        "run(sys.argv[1:]); print('THREADS', torch.get_num_threads())"
    )
    args = [
        sys.executable, "-c", code, "fit", "--config", str(repo / "experiments/quickstart.yaml"),
        "--trainer.fast_dev_run", "1",
        "--data.num_train", "4", "--data.num_val", "4", "--data.image_size", "[32, 32]",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(repo), "WANDB_MODE": "disabled"}
    env.pop("OMP_NUM_THREADS", None)
    env.pop(threads.THREADS_ENV, None)
    mine = subprocess.run(args, cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert mine.returncode == 0, mine.stderr[-2000:]
    assert "THREADS 1" in mine.stdout and "(OMP_NUM_THREADS)" in mine.stderr
