"""`bench --losses ce,dice,...`: forward + backward time of each loss on random logits at
`--loss-sizes` (e.g. 256,512,1024), batch `--batch-size`, interleaved rounds."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from seglight.commands.bench.measure import timed


def bench_losses(
    names: list[str],
    sizes: list[int],
    batch_size: int,
    num_classes: int,
    device: torch.device,
    rounds: int,
    steps: int,
    warmup: int,
) -> list[dict]:
    """Forward + backward milliseconds of each loss (seglight.losses, by `loss:` name) on random
    float32 logits [batch_size, num_classes, S, S] with 5% ignored pixels, for S in `sizes`;
    interleaved rounds. One row per (loss, size): median ms, min-max, and ms per megapixel (a
    loss that scales linearly keeps it constant across sizes)."""
    from seglight.losses import build_loss

    losses = {name: build_loss(name).to(device) for name in names}
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for size in sizes:
        logits = torch.randn(batch_size, num_classes, size, size, generator=g)
        target = torch.randint(0, num_classes, (batch_size, size, size), generator=g)
        target[torch.rand(target.shape, generator=g) < 0.05] = 255
        inputs[size] = (logits.to(device).requires_grad_(), target.to(device))
    seconds: dict[tuple[str, int], list[float]] = {(n, s): [] for n in names for s in sizes}

    def work(name: str, size: int) -> Callable[[int], None]:
        logits, target = inputs[size]

        def step(i: int) -> None:
            logits.grad = None
            losses[name](logits, target).backward()

        return step

    for key in seconds:
        for i in range(warmup):
            work(*key)(i)
    for _ in range(rounds):
        for key in seconds:
            seconds[key].append(timed(work(*key), steps, device) / steps)
    rows = []
    for (name, size), secs in seconds.items():
        ms = 1000 * statistics.median(secs)
        megapixels = batch_size * size * size / 1e6
        rows.append(
            {"loss": name, "size": size, "ms": ms, "min": 1000 * min(secs),
             "max": 1000 * max(secs), "ms_per_mpixel": ms / megapixels}
        )  # fmt: skip
    return rows
