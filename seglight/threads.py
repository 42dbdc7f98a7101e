"""How many torch threads and loader workers a process should use, so that it never asks for
more cores than it may run on.

Why: OpenMP threads wait for one another at the end of every parallel region, so one thread
descheduled (because the loader workers, or another program, took its core) stalls them all.
On a 2-core machine a small U-Net step ran at 194 images/s with 2 threads and 116 with 1 when
the machine was quiet, but 58 with 2 threads and 122 with 1 beside one busy process. No fixed
number is right; what is always wrong is more runnable threads than usable cores.

The policy, chosen once at start-up:
- usable cores = the CPUs in the process's affinity mask (`os.sched_getaffinity`, which
  taskset, Slurm and Kubernetes cpusets set), capped by the cgroup CPU quota (v2
  `/sys/fs/cgroup/cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`), rounded up; never
  `os.cpu_count()`, which counts the machine;
- with DDP, each of the `ranks` processes on the node gets an equal share of those cores;
- loader workers by default: min(4, share - 1), so one core stays for the training step
  (0 workers on a single core: the main process loads);
- torch threads = share - workers, at least 1.

A busy machine: the cores other programs keep busy are not usable either. On 2 cores with the
load of other programs rising to 4-5, two threads made the quickstart take 1,114 s against 130 s
with one thread on a quiet machine. So the choice leaves out the cores that others occupy:
- others = the 1-minute load average less this process's own running threads (its CPU time
  over the same wall time), scaled to the usable cores' share of the machine's processors;
  threads = min(the policy's, usable cores - floor(others)), at least 1. A load below one core
  (a quiet machine) changes nothing;
- at start-up (nothing of ours runs yet: others = the load), and again every RECHECK_S seconds
  of training (LoadWatch, called by seglight.callbacks.ThreadsRecheck after each training step),
  holding each change for HOLD_S seconds, as long as the load average takes to show it.

What the user set wins, and is never re-checked: an explicit number (`--threads N` for
fit/validate/test/predict/bench, or SEGLIGHT_THREADS), then OMP_NUM_THREADS / MKL_NUM_THREADS
(torch already follows them), then a torch.set_num_threads call made before the run (detected as
a change from the count torch had when this module was imported).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch

THREADS_ENV = "SEGLIGHT_THREADS"
_USER_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: torch's thread count when seglight first looked: a different count later was set by the user
_TORCH_AT_IMPORT = torch.get_num_threads()
_CGROUP = Path("/sys/fs/cgroup")
_announced = False


def cgroup_cpu_limit(root: Path = _CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in cores (e.g. 1.5), or None when unlimited or
    unknown. Reads cgroup v2 (`cpu.max`: "max 100000" or "150000 100000") or v1
    (`cpu/cpu.cfs_quota_us`, -1 for none, and `cpu.cfs_period_us`)."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        for v1 in (root / "cpu", root / "cpu,cpuacct"):
            quota_file = v1 / "cpu.cfs_quota_us"
            if quota_file.is_file():
                quota = int(quota_file.read_text())
                period = int((v1 / "cpu.cfs_period_us").read_text())
                return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        pass
    return None


def usable_cores(root: Path = _CGROUP) -> int:
    """Cores this process may run on: its affinity mask, capped by the cgroup quota (rounded up:
    a quota of 1.5 cores lets 2 threads run most of the time). At least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit(root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cores_per_rank(ranks: int = 1, cores: int | None = None) -> int:
    """The cores one of `ranks` processes on this node gets (at least 1)."""
    cores = usable_cores() if cores is None else cores
    return max(1, cores // max(1, ranks))


def default_workers(ranks: int = 1, cores: int | None = None) -> int:
    """Loader workers by default: min(4, cores of this rank - 1); one core stays with the step."""
    return min(4, cores_per_rank(ranks, cores) - 1)


def policy_threads(workers: int, ranks: int = 1, cores: int | None = None) -> int:
    """torch threads for a process whose loader runs `workers` worker processes beside it, one of
    `ranks` processes on the node: its share of the usable cores minus the workers, at least 1."""
    return max(1, cores_per_rank(ranks, cores) - max(0, workers))


def user_threads() -> tuple[int | None, str | None]:
    """(threads, where) when the user chose a count: SEGLIGHT_THREADS, OMP/MKL_NUM_THREADS, or
    torch.set_num_threads since seglight was imported; (None, None) otherwise."""
    value = os.environ.get(THREADS_ENV)
    if value:
        try:
            return max(1, int(value)), THREADS_ENV
        except ValueError:
            from seglight.errors import ConfigError

            raise ConfigError(f"{THREADS_ENV}={value!r}: expected a number of threads") from None
    for name in _USER_ENV:
        if os.environ.get(name):
            return torch.get_num_threads(), name
    if torch.get_num_threads() != _TORCH_AT_IMPORT:
        return torch.get_num_threads(), "torch.set_num_threads"
    return None, None


#: glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks up to this size come from the heap and freed memory stays there for reuse
HEAP_BLOCK_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc serve tensor-sized blocks (up to 1 GiB) from its heap and keep freed memory
    for reuse, as PyTorch's CUDA caching allocator does on the GPU. Why: by default glibc maps
    every block above 32 MB afresh and unmaps it on free, so each step page-faults and zeroes its
    large activations again: cross-entropy on 2x11x1024x1024 logits took 245 ms instead of 97, a
    cost that grows faster than the pixels. The process keeps its peak memory mapped (like a
    caching allocator). Linux/glibc only; skipped when MALLOC_MMAP_THRESHOLD_ is set (the user's
    choice). Returns whether it was applied."""
    if sys.platform != "linux" or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES) == 1
        return ok and libc.mallopt(_M_TRIM_THRESHOLD, HEAP_BLOCK_BYTES) == 1
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False


def machine_load() -> float:
    """The machine's 1-minute load average (0 where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def others_load(cores: int, own: float = 0.0) -> float:
    """How many of this process's `cores` other programs keep busy: the load average less `own`
    (this process's running threads), scaled to the share of the machine's processors that
    `cores` are (the load average counts the whole machine's)."""
    machine = max(cores, os.cpu_count() or cores)
    return max(0.0, machine_load() - own) * cores / machine


def busy_threads(policy: int, cores: int, others: float) -> int:
    """Threads for a process whose policy gives `policy` on `cores` usable cores, when other
    programs keep `others` cores busy: no more than the cores they leave, at least 1; others
    below 1 (a quiet machine) leave the policy's choice as it is."""
    return max(1, min(policy, cores - math.floor(max(0.0, others))))


#: seconds of training between two looks at the load, and the least time a change holds
RECHECK_S, HOLD_S = 30.0, 60.0


class LoadWatch:
    """Re-checks the load while training and moves torch's threads between 1 and the policy's
    choice (module docstring). Call tick() after each training step, in the training thread
    (torch.set_num_threads applies to the thread that calls it); costs a clock read between
    looks."""

    def __init__(self, policy: int, cores: int, threads: int) -> None:
        self.policy, self.cores, self.threads = policy, cores, threads
        self.changes: list[tuple[float, int, float]] = []  # (time, threads, others' load)
        self._restart(time.monotonic())

    def _restart(self, now: float, hold: float = 0.0) -> None:
        self._wall, self._cpu = now, time.process_time()
        self._next = now + max(RECHECK_S, hold)

    def tick(self) -> int:
        """The thread count, after a look at the load when it is time for one."""
        now = time.monotonic()
        if now < self._next:
            return self.threads
        own = (time.process_time() - self._cpu) / max(1e-6, now - self._wall)
        others = others_load(self.cores, own)
        wanted = busy_threads(self.policy, self.cores, others)
        if wanted == self.threads:
            self._restart(now)
            return self.threads
        global _TORCH_AT_IMPORT
        torch.set_num_threads(wanted)
        _TORCH_AT_IMPORT = wanted  # our own choice is not the user's
        self.changes.append((now, wanted, others))
        print(
            f"seglight: {wanted} torch thread(s) from now on (other programs keep {others:.1f} "
            f"of the {self.cores} usable core(s) busy)",
            file=sys.stderr,
        )
        self.threads = wanted
        self._restart(now, HOLD_S)
        return wanted


_watch: LoadWatch | None = None


def recheck_threads() -> int | None:
    """After a training step: re-check the load when it is time (LoadWatch); None when the thread
    count is the user's or the load is not watched."""
    return None if _watch is None else _watch.tick()


def configure_threads(
    workers: int,
    ranks: int = 1,
    requested: int | None = None,
    announce: bool = True,
    watch: bool = True,
) -> int:
    """Set torch's intra-op threads by the policy (module docstring) for a process with `workers`
    loader workers, one of `ranks` on the node; `requested` (an explicit option) wins, then what
    the user set (user_threads). The policy's choice leaves out the cores other programs keep
    busy, and with `watch` the load is re-checked while training (recheck_threads). Prints the
    choice once per process (rank zero). Returns it. Also tunes the CPU allocator
    (keep_freed_memory)."""
    global _announced, _watch
    keep_freed_memory()
    cores = usable_cores()
    share = cores_per_rank(ranks, cores)
    _watch = None
    busy = ""
    if requested is not None:
        threads, why = max(1, requested), "--threads"
    else:
        threads, why = user_threads()
        if threads is None:
            policy = policy_threads(workers, ranks, cores)
            why = f"{share} usable core(s){f' per rank of {ranks}' if ranks > 1 else ''} - {workers} loader worker(s)"
            others = others_load(cores)  # nothing of ours runs yet
            threads = busy_threads(policy, cores, others)
            if threads < policy:
                busy = f"; other programs keep {others:.1f} of them busy"
            if watch:
                _watch = LoadWatch(policy, cores, threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    global _TORCH_AT_IMPORT
    _TORCH_AT_IMPORT = threads  # our own choice is not the user's
    if announce and not _announced and os.environ.get("LOCAL_RANK", "0") == "0":
        _announced = True
        note = ""
        if threads + workers > share:
            note = f"; {threads} threads + {workers} workers oversubscribe the {share} core(s)"
        elif _watch is not None:
            note = f"; the load is re-checked every {RECHECK_S:.0f} s"
        print(
            f"seglight: {threads} torch thread(s) ({why}{busy}){note}; override with --threads N "
            f"or {THREADS_ENV}/OMP_NUM_THREADS",
            file=sys.stderr,
        )
    return threads
