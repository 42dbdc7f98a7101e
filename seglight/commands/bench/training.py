"""Training speed: seglight inside `Trainer.fit` and its peers' plain loops, in interleaved rounds
on the same batches, already on the device (no loader in the timing).

A callback times whole loop iterations of seglight (from the start of a round's first batch to
the start of the batch after its last), so Lightning's per-step work (hooks, logging, closure,
batch transfer) and the base class's count. No progress bar, logger or checkpointing (a raw loop
has none either). Rounds are interleaved: `steps` steps of each peer in turn, `rounds` times,
after `warmup` steps of each.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any

from seglight.commands.bench.measure import (
    MemoryMeter,
    now,
    peak_bytes,
    persistent_bytes,
    sync,
    timed,
)
from seglight.commands.bench.peers import Peer, Runner
from seglight.commands.bench.profiling import StepProfile, hook_labels


class _Batches:
    """`length` batches cycling over a few fixed ones (a loader for Trainer.fit)."""

    def __init__(self, batches: list[dict], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict]:
        return (self.batches[i % len(self.batches)] for i in range(self.length))


def _plus(peak: int | None, state: int) -> int | None:
    return None if peak is None else peak + state


def bench_training(
    model: Any,
    peers: list[Peer],
    batches: list[dict],
    runner: Runner,
    rounds: int,
    steps: int,
    warmup: int,
    cudnn_benchmark: bool = True,
    memory: bool = True,
    profile: bool = False,
) -> Peer:
    """Interleaved training rounds of seglight (inside Trainer.fit) and its peers: at each round
    boundary a callback closes seglight's pass, runs the same pass of every peer, and opens
    seglight's next. After the timed rounds, one profiled pass of each (`profile`,
    seglight.commands.bench.profiling), then one memory pass of each (`memory`). Returns seglight as a
    Peer (its rounds in .train, its profile in .profile); the peers' are recorded in them."""
    import lightning as L

    device = runner.device
    meter = MemoryMeter(device) if memory else None
    labels = hook_labels() if profile else None
    own = Peer("seglight", model, model.forward)
    # pass k starts at step warmup + k * steps
    # the profile before the memory pass: the meter trims the heap, and the steps after it
    # page-fault their memory in again
    passes = ["time"] * rounds + ["profile"] * profile + ["memory"] * (meter is not None)
    boundaries = {warmup + k * steps: k for k in range(len(passes) + 1)}

    def batch_at(i: int) -> dict:
        return batches[i % len(batches)]

    def peers_pass(k: int) -> None:
        for peer in peers:
            assert peer.step is not None
            work = lambda i, p=peer: p.step(batch_at(i))  # noqa: E731
            if passes[k] == "time":
                peer.train.seconds.append(timed(work, steps, device))
            elif passes[k] == "memory":
                assert meter is not None
                peak = peak_bytes(work, steps, meter)
                if peak is not None:
                    peer.train.peak.append(peak + persistent_bytes(peer.module, peer.optimizer))
            else:
                runner.labels = True
                with StepProfile(device) as recorded:
                    for i in range(steps):
                        work(i)
                runner.labels = False
                peer.profile = recorded.summary(steps)

    class Interleave(L.Callback):
        calls, t0 = 0, 0.0
        recorded: StepProfile | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.calls == 0:
                # the peers warm up first, then seglight: every peer's first timed round then
                # follows its own warm-up, with the others' memory already allocated (seglight's
                # first round, run after the peers' warm-up, page-faulted 10k times per step)
                for peer in peers:
                    assert peer.step is not None
                    for i in range(warmup):
                        peer.step(batch_at(i))
            k = boundaries.get(self.calls)
            self.calls += 1
            if k is None:
                return
            sync(device)
            done = passes[k - 1] if k > 0 else None  # close seglight's pass k - 1
            if done == "time":
                own.train.seconds.append(now() - self.t0)
            elif done == "memory":
                assert meter is not None
                state = persistent_bytes(pl_module, trainer.optimizers[0])
                peak = _plus(meter.stop(), state)
                if peak is not None:
                    own.train.peak.append(peak)
            elif done == "profile":
                assert labels is not None and self.recorded is not None
                labels.on = False
                self.recorded.__exit__(None, None, None)
                own.profile = self.recorded.summary(steps)
            if k == len(passes):
                return
            peers_pass(k)
            if passes[k] == "memory":
                assert meter is not None
                meter.start()
            elif passes[k] == "profile":
                assert labels is not None
                self.recorded = StepProfile(device).__enter__()
                labels.on = True
            sync(device)
            self.t0 = now()

    total = warmup + len(passes) * steps + 1  # the last step only closes the last pass
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=runner.precision,
        max_steps=total,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        benchmark=cudnn_benchmark if device.type == "cuda" else None,
        default_root_dir=tempfile.mkdtemp(prefix="seglight-bench-"),
        callbacks=[Interleave()],
        profiler=labels,
    )
    trainer.fit(model, train_dataloaders=_Batches(batches, total))
    return own
