"""`bench --profile`: where each peer's training step goes, from one extra profiled pass of each
after the timed rounds (torch.profiler, so the profiler's own cost never enters a timed round).

What the pass records, per step:
- every operator's self time (aten ops, the autograd engine's nodes, the optimiser's kernels)
  and call count;
- the step's phases: for seglight, Lightning's hooks and loop actions as Lightning names them
  ("[LightningModule]UNet.optimizer_step", "[Callback]...", "run_training_batch"), labelled
  through a Lightning profiler (HookLabels); for a plain loop, zero_grad, forward + loss,
  backward, optimizer.step, scheduler.step;
- the step's wall time (the profiler's operator times are wall times too, whatever `--clock`
  says), and what of it is outside every operator (Python: the loop, the hooks, logging, and
  the profiler's own bookkeeping; on a busy machine also the time the process waited);
- its CPU time and page faults (a step that gets fresh pages from the kernel again and again
  pays for zeroing them inside whichever operator touches them first).

report.print_profile shows the operators side by side with seglight's time minus each peer's,
the largest differences first, so the next gap is found in one command.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from seglight.commands.bench.measure import sync


def hook_labels() -> Any:
    """A Lightning profiler that marks each of Lightning's actions (hooks, loop steps) as a
    torch.profiler range while its `on` is True; otherwise it does what Lightning's
    PassThroughProfiler does (nothing), so the timed rounds are not slowed."""
    from lightning.pytorch.profilers import Profiler

    class HookLabels(Profiler):
        def __init__(self) -> None:
            super().__init__()
            self.on = False
            self._open: dict[str, list[Any]] = {}

        def start(self, action_name: str) -> None:
            if self.on:
                record = torch.profiler.record_function(action_name)
                record.__enter__()
                self._open.setdefault(action_name, []).append(record)

        def stop(self, action_name: str) -> None:
            records = self._open.get(action_name)
            if records:
                records.pop().__exit__(None, None, None)

    return HookLabels()


def phase(labelled: bool, name: str) -> contextlib.AbstractContextManager:
    """A plain loop's phase `name` as a profiler range, when `labelled` (while a profile records)."""
    return torch.profiler.record_function(name) if labelled else contextlib.nullcontext()


class StepProfile:
    """torch.profiler over `steps` training steps of one peer: `with StepProfile(device) as p:`,
    then p.summary(steps)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(activities=activities)
        self.seconds = 0.0

    def __enter__(self) -> StepProfile:
        sync(self.device)
        self._profiler.__enter__()
        self._t0, self._cpu0, self._faults0 = time.perf_counter(), time.process_time(), _faults()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = time.process_time() - self._cpu0
        self.faults = _faults() - self._faults0
        self._profiler.__exit__(*exc)

    def summary(self, steps: int) -> dict[str, Any]:
        """{"step_ms", "ops": [{"name", "calls", "self_ms", "device_ms"}], "phases": [{"name",
        "calls", "ms", "self_ms"}], "outside_ms", "cpu_ms", "faults"}: per step; ops by CPU self
        time (device_ms: the GPU's), phases by their total time; outside_ms: the step's time
        outside every operator; cpu_ms: the process's CPU time; faults: its page faults."""
        ops, phases = [], []
        for event in self._profiler.key_averages():
            row = {
                "name": event.key,
                "calls": event.count / steps,
                "self_ms": event.self_cpu_time_total / 1000 / steps,
                "device_ms": getattr(event, "self_device_time_total", 0.0) / 1000 / steps,
            }
            if getattr(event, "is_user_annotation", False):
                row["ms"] = event.cpu_time_total / 1000 / steps
                phases.append(row)
            else:
                ops.append(row)
        ops.sort(key=lambda r: -r["self_ms"])
        phases.sort(key=lambda r: -r["ms"])
        step_ms = 1000 * self.seconds / steps
        inside = sum(r["self_ms"] for r in ops)
        return {"step_ms": step_ms, "ops": ops, "phases": phases, "outside_ms": step_ms - inside,
                "cpu_ms": 1000 * self.cpu_seconds / steps, "faults": self.faults / steps}  # fmt: skip


def _faults() -> int:
    """Page faults of this process so far (minor + major; each one maps and zeroes a fresh page:
    memory the allocator handed back and took again); 0 where there is no getrusage."""
    try:
        import resource
    except ImportError:  # not Unix
        return 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt
