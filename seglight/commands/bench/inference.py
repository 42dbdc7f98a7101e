"""Inference speed: eval mode, inference_mode, the same autocast; forward and argmax of a batch
(seglight's through predict_step), in interleaved rounds. "ms/batch" is the latency at the batch
size (use --batch-size 1 for single-image latency)."""

from __future__ import annotations

import torch

from seglight.commands.bench.measure import MemoryMeter, peak_bytes, persistent_bytes, timed
from seglight.commands.bench.peers import Peer


def bench_inference(
    peers: list[Peer],
    images: torch.Tensor,
    device: torch.device,
    rounds: int,
    steps: int,
    warmup: int,
    memory: bool = True,
) -> None:
    """Interleaved inference rounds (eval mode, inference_mode) of every peer, then one memory
    pass of each (`memory`)."""
    for peer in peers:
        peer.module.eval()
    with torch.inference_mode():
        for peer in peers:
            for _ in range(warmup):
                peer.predict(images)
        for _ in range(rounds):
            for peer in peers:
                peer.infer.seconds.append(timed(lambda i, p=peer: p.predict(images), steps, device))
        meter = MemoryMeter(device) if memory else None
        for peer in peers if meter is not None else []:
            peak = peak_bytes(lambda i, p=peer: p.predict(images), steps, meter)
            if peak is not None:
                peer.infer.peak.append(peak + persistent_bytes(peer.module, None))
