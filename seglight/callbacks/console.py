"""What the terminal shows during a run: the progress bar (RichProgressBar: the loss, val/mIoU
and the best so far) and the model summary (RichModelSummary, without FLOPs that were not
measured)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichModelSummary as _RichModelSummary
from lightning.pytorch.callbacks import RichProgressBar as _RichProgressBar

from seglight.callbacks._common import _scalar


class RichProgressBar(_RichProgressBar):
    """Lightning's rich progress bar, also showing the training loss, read back from the device
    only every `loss_every_n_steps` steps (each read is a host sync, which stalls a GPU), and
    after each validation its val/mIoU and the best so far (read once per validation, when the
    metric has been computed and synced already). Lightning's `v_num` is not shown.

    Args:
        loss_every_n_steps: how often to refresh the shown loss.
        **kwargs: Lightning's RichProgressBar options (refresh_rate, leave, theme, ...).
    """

    def __init__(self, loss_every_n_steps: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loss_every_n_steps = max(1, loss_every_n_steps)
        self._loss: float | None = None
        self._miou: float | None = None
        self._best: tuple[float, int] | None = None  # (val/mIoU, epoch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        miou = trainer.callback_metrics.get("val/mIoU")
        if trainer.sanity_checking or miou is None or trainer.state.fn != "fit":
            return
        self._miou = _scalar(miou)
        if self._miou is not None and (self._best is None or self._miou >= self._best[0]):
            self._best = (self._miou, trainer.current_epoch)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version (a W&B id's tail), not the run's
        loss = trainer.callback_metrics.get("train/loss_step")
        if loss is not None and (
            self._loss is None or trainer.global_step % self.loss_every_n_steps == 0
        ):
            self._loss = float(loss)
        if self._loss is not None:
            metrics["loss"] = f"{self._loss:.3g}"
        if self._miou is not None:
            metrics["val/mIoU"] = f"{self._miou:.3f}"
        if self._best is not None:
            metrics["best"] = f"{self._best[0]:.3f} ep{self._best[1]}"
        return metrics


class RichModelSummary(_RichModelSummary):
    """Lightning's rich model summary without the FLOPs column and total when they were not
    measured (Lightning counts FLOPs only for models with an `example_input_array`, and shows 0
    otherwise)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
        model_size: float, total_training_modes: dict[str, int], total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:  # fmt: skip
        if total_flops:
            _RichModelSummary.summarize(
                summary_data, total_parameters, trainable_parameters, model_size,
                total_training_modes, total_flops, **summarize_kwargs,
            )  # fmt: skip
            return
        from lightning.pytorch.utilities.model_summary.model_summary import (
            get_formatted_model_size,
            get_human_readable_count,
        )
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for i, (name, _) in enumerate(columns):
            table.add_column(name if name else " ", style="dim" if i == 0 else None,
                             justify="right" if name in ("Params", "In sizes", "Out sizes") else "left")  # fmt: skip
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        trainable, total = (
            get_human_readable_count(trainable_parameters),
            get_human_readable_count(total_parameters),
        )
        console.print(
            f"[bold]Trainable params[/]: {trainable}   [bold]Total params[/]: {total}   "
            f"[bold]Size[/]: {get_formatted_model_size(model_size)} MB   "
            f"[bold]Modules in train/eval mode[/]: {total_training_modes['train']}/{total_training_modes['eval']}"
        )  # fmt: skip
