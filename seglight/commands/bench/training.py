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
    Measured,
    MemoryMeter,
    now,
    peak_bytes,
    persistent_bytes,
    sync,
    timed,
)
from seglight.commands.bench.peers import Peer, Runner


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
) -> Measured:
    """Interleaved training rounds of seglight (inside Trainer.fit) and its peers: at each round
    boundary a callback closes seglight's round, runs one round of every peer, and opens the next.
    After the timed rounds, one memory pass of each (`memory`). Returns seglight's rounds; the
    peers' are recorded in them."""
    import lightning as L

    device = runner.device
    meter = MemoryMeter(device) if memory else None
    own = Measured()
    # round k starts at step warmup + k * steps; round `rounds` is the memory pass
    passes = rounds + (1 if meter is not None else 0)
    boundaries = {warmup + k * steps: k for k in range(passes + 1)}

    def batch(i: int) -> dict:
        return batches[i % len(batches)]

    def peers_round(k: int) -> None:
        for peer in peers:
            assert peer.step is not None
            work = lambda i, p=peer: p.step(batch(i))  # noqa: E731
            if k == 0:
                for i in range(warmup):
                    work(i)
            if k < rounds:
                peer.train.seconds.append(timed(work, steps, device))
            else:
                assert meter is not None
                peak = peak_bytes(work, steps, meter)
                if peak is not None:
                    peer.train.peak.append(peak + persistent_bytes(peer.module, peer.optimizer))

    class Interleave(L.Callback):
        calls, t0 = 0, 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            k = boundaries.get(self.calls)
            self.calls += 1
            if k is None:
                return
            sync(device)
            if 0 < k <= rounds:  # close seglight's timed round k - 1
                own.seconds.append(now() - self.t0)
            elif k > rounds and meter is not None:  # close its memory pass
                state = persistent_bytes(pl_module, trainer.optimizers[0])
                peak = _plus(meter.stop(), state)
                if peak is not None:
                    own.peak.append(peak)
            if k < passes:
                peers_round(k)
                if k == rounds and meter is not None:
                    meter.start()
                sync(device)
                self.t0 = now()

    total = warmup + passes * steps + 1  # the last step only closes the last round
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
    )
    trainer.fit(model, train_dataloaders=_Batches(batches, total))
    return own
