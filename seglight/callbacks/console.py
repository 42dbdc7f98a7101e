"""What the console shows during a run. In a terminal: the rich progress bar (RichProgressBar:
the loss and its parts, val/mIoU and the best so far) and the model summary (RichModelSummary,
without FLOPs that were not measured). When stdout is not a terminal (nohup, SLURM, `> log`),
plain lines instead of the bar: one per validation and one every few steps or minutes of
training, as cluster logs are read."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichModelSummary as _RichModelSummary
from lightning.pytorch.callbacks import RichProgressBar as _RichProgressBar

from seglight.callbacks._common import TrainMeans, _images, _scalar, format_train


def _elapsed(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


class RichProgressBar(_RichProgressBar):
    """Lightning's rich progress bar, also showing the training loss and every other `train/*`
    value the model logs per step (a semi-supervised method's loss parts and confident fraction,
    ...), read back from the device only every `loss_every_n_steps` steps (each read is a host
    sync, which stalls a GPU), and after each validation its val/mIoU and the best so far (read
    once per validation, when the metric has been computed and synced already). Lightning's
    `v_num` is not shown, nor a last epoch with `max_epochs: -1` (no limit).

    When stdout is not a terminal nor Jupyter (`plain`: None decides so), the bar is replaced by
    plain lines on stdout, flushed at once (rank zero):

        epoch 3/19  step 160  val/mIoU 0.2731  best 0.2731 (epoch 3)  val/loss 1.02  train loss 1.21 (sup 0.98, unsup 0.23, confident 0.41)  41.2 img/s  elapsed 0:02:13

    after each validation (train: the means since the last validation; img/s: training images
    per second since then), and a `train` line every `plain_every_n_steps` steps or
    `plain_every_s` seconds, whichever comes first (the means since the last line).

    Args:
        loss_every_n_steps: how often to refresh the shown loss.
        plain: plain lines instead of the bar (None: when stdout is not a terminal).
        plain_every_n_steps: steps between two plain training lines.
        plain_every_s: seconds between two plain training lines.
        **kwargs: Lightning's RichProgressBar options (refresh_rate, leave, theme, ...).
    """

    def __init__(
        self, loss_every_n_steps: int = 10, plain: bool | None = None,
        plain_every_n_steps: int = 50, plain_every_s: float = 120.0, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.loss_every_n_steps = max(1, loss_every_n_steps)
        self.plain = plain
        self.plain_every_n_steps = max(1, plain_every_n_steps)
        self.plain_every_s = plain_every_s
        self._plain = False  # decided at setup
        self._train: dict[str, float | None] = {}  # the last `train/*` values read
        self._miou: float | None = None
        self._best: tuple[float, int] | None = None  # (val/mIoU, epoch)
        # plain lines: the means since the last line and since the last validation, the clock
        self._line_means, self._val_means = TrainMeans(), TrainMeans()
        self._start = self._val_start = 0.0
        self._images = 0
        self._line_mark = self._val_mark = (0.0, 0, -1)  # (time, images, step) at the last line
        self._pending: str | None = None  # a training line, printed when the next batch starts

    @property
    def is_enabled(self) -> bool:
        return not self._plain and super().is_enabled

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.plain is not None:
            self._plain = self.plain
        else:  # a file or pipe; Jupyter's output is no terminal either, but rich draws there
            from rich import get_console

            self._plain = not sys.stdout.isatty() and not get_console().is_jupyter

    def _get_train_description(self, current_epoch: int) -> str:
        epochs = self.trainer.max_epochs
        description = f"Epoch {current_epoch}"
        if epochs is not None and epochs > 0:  # -1: no limit (Lightning's bar says "0/-2")
            description += f"/{epochs - 1}"
        # as wide as "Validation": the bar does not move between the two
        return description.ljust(len(self.validation_description))

    # ------------------------------------------------------------------ plain lines
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = time.monotonic()
        self._line_mark = self._val_mark = (self._start, 0, trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self._plain or not trainer.is_global_zero:
            return
        self._images += _images(batch) or 0
        self._line_means.update(trainer)
        self._val_means.update(trainer)
        now, step = time.monotonic(), trainer.global_step
        since, _, last_step = self._line_mark
        if step != last_step and (
            step - last_step >= self.plain_every_n_steps or now - since >= self.plain_every_s
        ):
            train = format_train(self._line_means.pop())
            rate = self._rate(self._line_mark, now)
            # printed when the next batch starts: a validation right after this batch says it all
            self._pending = self._line(trainer, f"train {train}" if train else "", rate)
            self._line_mark = (now, self._images, step)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._print_pending()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._print_pending()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._val_start = time.monotonic()
        if not trainer.sanity_checking:
            self._pending = None

    def _print_pending(self) -> None:
        if self._pending:
            print(self._pending, flush=True)
        self._pending = None

    def _rate(self, mark: tuple[float, int, int], now: float) -> str:
        seconds, images = now - mark[0], self._images - mark[1]
        return f"{images / seconds:.1f} img/s" if seconds > 0 and images else ""

    def _line(self, trainer: L.Trainer, *fields: str) -> str:
        epochs = trainer.max_epochs
        epoch = f"epoch {trainer.current_epoch}"
        if epochs is not None and epochs > 0:
            epoch += f"/{epochs - 1}"
        elapsed = f"elapsed {_elapsed(time.monotonic() - self._start)}"
        return "  ".join(f for f in (epoch, f"step {trainer.global_step}", *fields, elapsed) if f)

    def _validation_line(self, trainer: L.Trainer) -> None:
        fields = [f"val/mIoU {self._miou:.4f}" if self._miou is not None else "val/mIoU nan"]
        if self._best is not None:
            fields.append(f"best {self._best[0]:.4f} (epoch {self._best[1]})")
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None and _scalar(loss) is not None:
            fields.append(f"val/loss {float(loss):.3g}")
        train = format_train(self._val_means.pop())
        fields += [f"train {train}" if train else "", self._rate(self._val_mark, self._val_start)]
        print(self._line(trainer, *fields), flush=True)
        now = time.monotonic()
        self._val_mark = self._line_mark = (now, self._images, trainer.global_step)
        self._line_means.pop()  # the next training line starts after the validation

    # ------------------------------------------------------------------ the bar
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        miou = trainer.callback_metrics.get("val/mIoU")
        if trainer.sanity_checking or miou is None or trainer.state.fn != "fit":
            return
        self._miou = _scalar(miou)
        if self._miou is not None and (self._best is None or self._miou > self._best[0]):
            self._best = (self._miou, trainer.current_epoch)
        if self._plain and trainer.is_global_zero:
            self._validation_line(trainer)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version (a W&B id's tail), not the run's
        current = {
            k[len("train/") :].removesuffix("_step"): v
            for k, v in trainer.callback_metrics.items()
            if k.startswith("train/") and not k.endswith("_epoch") and v.numel() == 1
        }
        if current and (not self._train or trainer.global_step % self.loss_every_n_steps == 0):
            self._train = {k: _scalar(v) for k, v in current.items()}
            if "loss" in self._train:  # the loss first
                self._train = {"loss": self._train.pop("loss"), **self._train}
        for name, value in self._train.items():
            shown = name if name == "loss" else name.removeprefix("loss_")
            metrics[shown] = "nan" if value is None else f"{value:.3g}"
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
