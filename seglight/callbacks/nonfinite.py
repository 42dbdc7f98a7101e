"""The stop at a diverged training: NonFiniteLossCheck raises a DivergenceError at a NaN or
infinite training loss, validation loss or model state (weights, BatchNorm statistics), before
that model is validated or checkpointed."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from seglight.errors import DivergenceError


class NonFiniteLossCheck(L.Callback):
    """Stops training with a DivergenceError when the model diverged, before that model is
    validated or checkpointed:

    - a NaN or infinite training loss (naming the first such step). The check costs no host
      sync per step: each step folds `isfinite(loss)` into a flag on the device; the flag is
      read back (one sync) every `trainer.log_every_n_steps` steps, before each validation and
      before each checkpoint is written;
    - a NaN or infinite tensor in the model's state (a training loss can stay finite while
      BatchNorm's running variances overflow), checked before each validation and in every
      checkpoint about to be written (weights and optimiser state);
    - a NaN or infinite validation loss, checked when the validation ends (before the
      checkpoints of that validation and its record in metrics.json).

    A diverged model therefore never replaces last.ckpt or the best checkpoint.
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
            self.check_state(trainer, pl_module.state_dict(), "before validation")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get("val/loss")
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all()):
            raise DivergenceError(
                f"the validation loss was {float(loss)} after training step "
                f"{trainer.global_step} (epoch {trainer.current_epoch}): {STOPPED}"
            )

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.check(trainer)
        tensors = {
            **named_tensors(checkpoint.get("state_dict") or {}),
            **named_tensors(checkpoint.get("optimizer_states") or [], "optimizer_states"),
        }
        self.check_state(trainer, tensors, "in the checkpoint about to be written")

    def check_state(self, trainer: L.Trainer, tensors: dict[str, Any], where: str) -> None:
        """Raise DivergenceError if a floating tensor of `tensors` holds NaN or infinity."""
        bad = non_finite(tensors)
        if bad:
            shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
            raise DivergenceError(
                f"the model's state became NaN or infinite by training step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}; {len(bad)} tensor(s) {where}: {shown}): "
                f"{STOPPED}"
            )

    def check(self, trainer: L.Trainer) -> None:
        """Raise DivergenceError if a training loss so far was not finite (one host sync)."""
        if self._first_bad is None:
            return
        first = int(self._first_bad)
        if first < 0:
            return
        raise DivergenceError(
            f"the training loss became NaN or infinite at training step {first} (counting from 1; "
            f"seen in epoch {trainer.current_epoch}): {STOPPED}"
        )


#: the end of every divergence message: true, since each checkpoint is checked before it is written
STOPPED = (
    "training stopped, and no checkpoint of the diverged model was written. Lower --model.lr "
    "(or warm up: --model.warmup_steps), or check the data"
)


def named_tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of nested dicts and lists (a state dict, optimiser states) by dotted name."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if not isinstance(tree, dict | list | tuple):
        return {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    found: dict[str, torch.Tensor] = {}
    for key, value in items:
        found.update(named_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


def non_finite(tensors: dict[str, Any]) -> list[str]:
    """The names of the floating tensors that hold a NaN or an infinity (one host sync per
    device)."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            by_device.setdefault(t.device, []).append((name, t.detach()))
    bad: list[str] = []
    for items in by_device.values():
        flags = torch.stack([~torch.isfinite(t).all() for _, t in items]).cpu()
        bad += [name for (name, _), flag in zip(items, flags.tolist(), strict=True) if flag]
    return bad
