"""The stop at a diverged training: NonFiniteLossCheck raises a DivergenceError at a NaN or
infinite training loss, before that model is validated or checkpointed."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from seglight.errors import DivergenceError


class NonFiniteLossCheck(L.Callback):
    """Stops training with a DivergenceError naming the first step whose training loss was NaN or
    infinite, before that model is validated or checkpointed.

    The check costs no host sync per step: each step folds `isfinite(loss)` into a flag on the
    device; the flag is read back (one sync) every `trainer.log_every_n_steps` steps, before
    each validation and before each checkpoint is written. A diverged model therefore never
    replaces last.ckpt or the best checkpoint.
    """

    def __init__(self) -> None:
        self._first_bad: torch.Tensor | None = None  # first non-finite step, -1 while none

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        step = trainer.global_step  # already counts this step's optimiser step
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()).all() & (self._first_bad < 0)
        self._first_bad = torch.where(bad, step, self._first_bad)
        if step % max(1, trainer.log_every_n_steps) == 0:
            self.check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.check(trainer)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.check(trainer)

    def check(self, trainer: L.Trainer) -> None:
        """Raise DivergenceError if a training loss so far was not finite (one host sync)."""
        if self._first_bad is None:
            return
        first = int(self._first_bad)
        if first < 0:
            return
        raise DivergenceError(
            f"the training loss became NaN or infinite at training step {first} (counting from 1; "
            f"seen in epoch {trainer.current_epoch}): training stopped, and no checkpoint of the "
            "diverged model was written. Lower --model.lr (or warm up: --model.warmup_steps), "
            "or check the data"
        )
