"""Helpers shared by more than one module of seglight.callbacks."""

from __future__ import annotations

import math
from typing import Any

import torch


def _scalar(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _images(batch: Any) -> int | None:
    """The number of images in a training batch: a plain batch's, or the sum over a batch of
    batches (SemiSupervised's {"labeled": ..., "unlabeled": ...})."""
    if isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor):
        return len(batch["image"])
    if isinstance(batch, dict) and isinstance(batch.get("mask"), torch.Tensor):
        return len(batch["mask"])
    if isinstance(batch, dict):
        counts = [n for n in map(_images, batch.values()) if n is not None]
        return sum(counts) if counts else None
    return None


class TrainMeans:
    """Means of every scalar `train/*` value a model logs per step (the loss and its parts, a
    confident fraction, a discriminator's accuracy, ...), over the steps since the last `pop`,
    whatever the method: read from the trainer's callback metrics after each training batch.

    The sums stay on the model's device (no host sync per step); `pop` reads them once. A value
    counts at the steps that logged it (a value logged again is a new tensor; one left over from
    an earlier step is not counted twice); values logged per epoch only are not seen."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._seen: dict[str, torch.Tensor] = {}  # the tensor counted last, per name

    def update(self, trainer: Any) -> None:
        for key, value in trainer.callback_metrics.items():
            if (
                not key.startswith("train/")
                or key.endswith("_epoch")
                or not isinstance(value, torch.Tensor)
                or value.numel() != 1
            ):
                continue
            name = key[len("train/") :].removesuffix("_step")
            if self._seen.get(name) is value:  # the same step's value under its two names
                continue
            self._seen[name] = value
            value = value.detach().float().reshape(())
            total = self._sums.get(name)
            self._sums[name] = value if total is None else total.to(value.device) + value
            self._counts[name] = self._counts.get(name, 0) + 1

    def state_dict(self) -> dict[str, Any]:
        """The sums and counts so far (for a checkpoint: a run resumed mid-way between two
        validations continues them, so its means are those of the uninterrupted run)."""
        return {
            "sums": {n: v.detach().cpu() for n, v in self._sums.items()},
            "counts": dict(self._counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sums = dict(state.get("sums") or {})
        self._counts = dict(state.get("counts") or {})
        self._seen = {}

    def pop(self) -> dict[str, float | None]:
        """{name: mean} since the last pop (the loss first, then as the model logs them), and
        start again."""
        names = sorted(self._sums, key=lambda n: n != "loss")
        sums, counts = self._sums, self._counts
        self._sums, self._counts = {}, {}
        if not names:
            return {}
        values = torch.stack([sums[n] for n in names]).cpu().tolist()  # one read
        return {n: _scalar(v / counts[n]) for n, v in zip(names, values, strict=True)}


def format_train(values: dict[str, float | None]) -> str:
    """The loss, then its parts and the other values as the model logs them (`loss_` left out of
    the parts' names): "loss 1.21 (sup 0.98, unsup 0.23, confident 0)"."""

    def number(v: float | None) -> str:
        return "nan" if v is None else f"{v:.3g}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"

    parts = [f"{n.removeprefix('loss_')} {number(v)}" for n, v in values.items() if n != "loss"]
    text = f"loss {number(values['loss'])}" if "loss" in values else ""
    if parts:
        text = f"{text} ({', '.join(parts)})" if text else ", ".join(parts)
    return text
