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

What the user set wins: an explicit number (`--threads N` for fit/validate/test/predict/bench,
or SEGLIGHT_THREADS), then OMP_NUM_THREADS / MKL_NUM_THREADS (torch already follows them), then
a torch.set_num_threads call made before the run (detected as a change from the count torch had
when this module was imported).
"""

from __future__ import annotations

import math
import os
import sys
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


def _busy_machine(cores: int) -> bool:
    try:
        return os.getloadavg()[0] >= cores + 1
    except (AttributeError, OSError):
        return False


def configure_threads(
    workers: int, ranks: int = 1, requested: int | None = None, announce: bool = True
) -> int:
    """Set torch's intra-op threads by the policy (module docstring) for a process with `workers`
    loader workers, one of `ranks` on the node; `requested` (an explicit option) wins, then what
    the user set (user_threads). Prints the choice once per process (rank zero). Returns it.
    Also tunes the CPU allocator (keep_freed_memory)."""
    global _announced
    keep_freed_memory()
    cores = usable_cores()
    share = cores_per_rank(ranks, cores)
    if requested is not None:
        threads, why = max(1, requested), "--threads"
    else:
        threads, why = user_threads()
        if threads is None:
            threads = policy_threads(workers, ranks, cores)
            why = f"{share} usable core(s){f' per rank of {ranks}' if ranks > 1 else ''} - {workers} loader worker(s)"
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    global _TORCH_AT_IMPORT
    _TORCH_AT_IMPORT = threads  # our own choice is not the user's
    if announce and not _announced and os.environ.get("LOCAL_RANK", "0") == "0":
        _announced = True
        note = ""
        if threads + workers > share:
            note = f"; {threads} threads + {workers} workers oversubscribe the {share} core(s)"
        elif threads > 1 and _busy_machine(cores):
            # other programs already keep the cores busy: a descheduled OpenMP thread stalls
            # the others, and one thread can then be faster (the policy cannot know: a hint)
            note = "; the machine is busy (load average above its cores): try --threads 1"
        print(
            f"seglight: {threads} torch thread(s) ({why}){note}; override with --threads N "
            f"or {THREADS_ENV}/OMP_NUM_THREADS",
            file=sys.stderr,
        )
    return threads
