"""The bench's measuring instruments: the clock of the timed rounds, the memory meter, persistent
state in bytes, and the confidence interval of a median ratio.

Peak memory is measured in separate passes after the timed rounds (one round of each peer with
the meter on), never inside them: the CPU meter's allocator settings slow every peer. It is the
peer's persistent state (parameters, buffers, gradients, optimiser state) plus the most the pass
allocated above what was allocated at its start. On CUDA that is torch.cuda.max_memory_allocated.
On the CPU it is the resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs),
with glibc set to return freed blocks to the system (a fixed mmap threshold and malloc_trim), so
memory one peer freed does not hide the next one's; Linux only, n/a elsewhere. On the CPU only
the training figure is compared: inference allocates little beyond the weights, and what the
resident set shows there is mostly what the allocator kept (identical networks measured 151 vs
244 MB), so no inference memory ratio is given on the CPU.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryMeter:
    """Peak bytes allocated during a measured section above what was allocated at its start.

    CUDA: max_memory_allocated. CPU (Linux): the resident set's high-water mark (see the module
    docstring); `available` is False elsewhere. The CPU meter's allocator settings hold from
    start() to stop() only: building a meter changes nothing (it once set them when built,
    before the timed rounds, and slowed those rounds, seglight's more than the raw loop's).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.available = device.type == "cuda" or self._prepare_cpu()
        self._start = 0

    def _prepare_cpu(self) -> bool:
        status = Path("/proc/self/status")
        if not status.exists():
            return False
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._libc.mallopt  # noqa: B018 (glibc, not musl)
        except (OSError, AttributeError):
            self._libc = None
        return True

    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def start(self) -> None:
        if not self.available:
            return
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if self._libc is not None:
            # a fixed mmap threshold (M_MMAP_THRESHOLD = -3): tensor-sized blocks are mapped and
            # unmapped on free, instead of kept in glibc's heap, where they would hide the next
            # pass's allocations; until stop()
            self._libc.mallopt(-3, 256 * 1024)
            self._libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        self._start = self._status_kb("VmRSS") * 1024

    def stop(self) -> int | None:
        """Bytes above the start, at the peak; None when not available."""
        if not self.available:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._start
        peak = max(0, self._status_kb("VmHWM") * 1024 - self._start)
        if self._libc is not None:
            _restore_allocator(self._libc)
        return peak


def _restore_allocator(libc: Any) -> None:
    """The allocator settings the timed rounds run with: seglight.threads.keep_freed_memory, or
    the user's MALLOC_MMAP_THRESHOLD_ where it is set."""
    from seglight.threads import keep_freed_memory

    if not keep_freed_memory():
        user = os.environ.get("MALLOC_MMAP_THRESHOLD_", "")
        if user.isdigit():
            libc.mallopt(-3, int(user))


def _tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def persistent_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Parameters, buffers, existing gradients and optimiser state of a peer."""
    tensors: list[torch.Tensor] = [*module.parameters(), *module.buffers()]
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values()]
    return _tensor_bytes(iter(tensors))


@dataclass
class Measured:
    """Seconds and peak bytes per round of one peer, for training or inference."""

    seconds: list[float] = field(default_factory=list)
    peak: list[int] = field(default_factory=list)

    def add(self, seconds: float, peak: int | None) -> None:
        self.seconds.append(seconds)
        if peak is not None:
            self.peak.append(peak)


#: the clock of the timed rounds: wall time, or with `--clock cpu` the process's CPU time (with
#: one thread on a CPU shared with other work, the work a step does, whatever else runs)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def use_clock(name: str) -> None:
    """Time the rounds that follow on clock `name` (a key of CLOCKS)."""
    global _clock
    _clock = CLOCKS[name]


def now() -> float:
    """The current reading of the rounds' clock, in seconds."""
    return _clock()


def timed(work: Callable[[int], Any], steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls of work(i)."""
    sync(device)
    t0 = _clock()
    for i in range(steps):
        work(i)
    sync(device)
    return _clock() - t0


def peak_bytes(work: Callable[[int], Any], steps: int, meter: MemoryMeter) -> int | None:
    """Peak bytes above the start during `steps` calls of work(i) (a memory pass, not timed)."""
    meter.start()
    for i in range(steps):
        work(i)
    return meter.stop()


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median of `values`: the order statistics
    x_(k) and x_(n+1-k) with the largest k whose binomial tail P(Bin(n, 1/2) < k) stays below
    (1 - level) / 2 on each side. With fewer than 6 values no such k exists: min-max."""
    xs, n = sorted(values), len(values)
    tail, k = 0.0, 0
    while True:  # the cumulative binomial probability of k successes or fewer
        tail += math.comb(n, k) / 2**n
        if tail > (1 - level) / 2:
            break
        k += 1
    return (xs[k - 1], xs[n - k]) if k >= 1 else (xs[0], xs[-1])
