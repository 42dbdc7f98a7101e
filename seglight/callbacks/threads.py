"""The busy machine's re-check of torch's thread count while training (ThreadsRecheck)."""

from __future__ import annotations

from typing import Any

import lightning as L

from seglight.threads import recheck_threads


class ThreadsRecheck(L.Callback):
    """After each training step, seglight.threads.recheck_threads: every 30 s the load is read
    again and torch's threads follow the cores other programs leave free (a clock read
    otherwise; nothing when the thread count is the user's)."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        recheck_threads()
