"""Logging to the run's loggers, W&B's media mostly: the learning rates (LearningRateMonitor),
the first validation images with their predicted and true masks (LogPredictions), and the
per-class IoU table and the confusion matrix (LogPerClassMetrics, which also saves the matrix as a
PNG in the run directory). `_wandb_active` (is a logger a W&B logger that is not disabled?) serves
the commands and models too."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import LearningRateMonitor as _LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_warn

from seglight.callbacks.records import EVALUATION_CONFIG_ATTR


class LearningRateMonitor(_LearningRateMonitor):
    """Lightning's LearningRateMonitor (learning rates, momentum, weight decay to every logger),
    which does nothing when the run has no logger (`--trainer.logger false`) instead of stopping
    the fit with a MisconfigurationException: the defaults file lists it for every experiment."""

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class LogPredictions(L.Callback):
    """Logs the first validation images with their predicted and true masks to W&B, as W&B
    segmentation masks with class labels, every `every_n_epochs` epochs (rank zero only)."""

    def __init__(self, every_n_epochs: int = 5, num_samples: int = 4) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if (
            batch_idx != 0
            or dataloader_idx != 0
            or trainer.sanity_checking
            or not trainer.is_global_zero
        ):
            return
        last = trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1
        if trainer.current_epoch % self.every_n_epochs != 0 and not last:
            return
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not isinstance(outputs, dict) or "pred" not in outputs:
            return
        import wandb

        from seglight.data.transforms import denormalize

        dm = trainer.datamodule
        labels = {i: name for i, name in enumerate(pl_module.class_names)}
        labels[pl_module.ignore_index] = "ignore"
        images = denormalize(batch["image"][: self.num_samples], dm.mean, dm.std).permute(
            0, 2, 3, 1
        )
        logged = []
        for image, pred, mask in zip(
            images.cpu().numpy(),
            outputs["pred"][: self.num_samples].cpu().numpy(),
            batch["mask"][: self.num_samples].cpu().numpy(),
            strict=True,
        ):
            logged.append(
                wandb.Image(
                    image,
                    masks={
                        "prediction": {"mask_data": pred.astype(np.uint8), "class_labels": labels},
                        "ground_truth": {
                            "mask_data": mask.astype(np.uint8),
                            "class_labels": labels,
                        },
                    },
                )
            )
        for logger in loggers:
            logger.experiment.log(
                {"val/predictions": logged, "trainer/global_step": trainer.global_step}
            )


class LogPerClassMetrics(L.Callback):
    """Per-class IoU as a W&B table (`<stage>/per_class`) and the confusion matrix, rows
    normalised, as a W&B image (`<stage>/confusion_matrix`), from the model's own metric state
    (the counts behind `val/mIoU`, summed over DDP ranks). Logged after each validation every
    `every_n_epochs` epochs during fit and after the last one, and after every `validate` and
    `test`; the last confusion matrix of a fit is also saved as <run dir>/confusion_val.png, and
    each evaluation's beside its config (confusion_test_1.png with config_test_1.yaml).

    Args:
        every_n_epochs: during fit, log to W&B every this many epochs (and the last validation).
    """

    def __init__(self, every_n_epochs: int = 5) -> None:
        self.every_n_epochs = every_n_epochs
        # the last validation's (stage, counts, step, logged to W&B already)
        self._last: tuple[str, torch.Tensor, int, bool] | None = None
        self._ckpt_epoch: int | None = None  # the epoch of the checkpoint evaluated

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._ckpt_epoch = checkpoint.get("epoch")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._collect(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._collect(trainer, pl_module, "test")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last is not None and trainer.is_global_zero:
            stage, confmat, step, logged = self._last
            self._log(trainer, pl_module, stage, confmat, step, wandb=not logged, save=True)
            self._last = None

    def _collect(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # callbacks' epoch-end hooks run before the model's, which computes and resets the state
        metrics = getattr(pl_module, "metrics", None)
        # fast_dev_run is a smoke test: Lightning writes no logs or checkpoints in it, nor do we
        if (
            trainer.sanity_checking
            or trainer.fast_dev_run
            or metrics is None
            or stage not in metrics
        ):
            return
        # the members of the collection share one `confmat` state
        metric = next(iter(metrics[stage].values(copy_state=False)))
        with metric.sync_context():  # a collective: every rank takes part
            confmat = metric.confmat.detach().cpu().clone()
        if not trainer.is_global_zero or confmat.sum() == 0:
            return
        if trainer.state.fn != "fit":
            self._log(
                trainer, pl_module, stage, confmat, trainer.global_step, wandb=True, save=True
            )
            return
        due = trainer.current_epoch % self.every_n_epochs == 0
        self._log(trainer, pl_module, stage, confmat, trainer.global_step, wandb=due, save=False)
        self._last = (stage, confmat, trainer.global_step, due)  # for the end of fit

    def _log(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, confmat: torch.Tensor,
        step: int, wandb: bool, save: bool,
    ) -> None:  # fmt: skip
        from seglight.plots import class_scores, plot_confusion

        loggers = [lg for lg in trainer.loggers if _wandb_active(lg)] if wandb else []
        if not loggers and not save:
            return
        names = list(getattr(pl_module, "class_names", None) or range(len(confmat)))
        path = _confusion_path(trainer, stage) if save else None
        title = _confusion_title(type(pl_module).__name__, stage, confmat, self._epoch(trainer))
        try:
            image = plot_confusion(confmat, names, path, title=title)
        except ImportError as e:  # no matplotlib: keep the table, never fail a finished run
            rank_zero_warn(f"LogPerClassMetrics: no confusion-matrix image ({e})")
            image = None
        scores = class_scores(confmat)
        rows = [
            [str(name), _nan_to_none(iou), _nan_to_none(acc), int(gt), int(pred)]
            for name, iou, acc, gt, pred in zip(
                names, scores["IoU"], scores["acc"], scores["pixels"], scores["predicted"],
                strict=True,
            )
        ]  # fmt: skip
        for logger in loggers:
            logger.log_table(
                f"{stage}/per_class",
                columns=["class", "IoU", "acc", "pixels", "predicted"],
                data=rows,
                step=step,
            )
            if image is not None:
                logger.log_image(f"{stage}/confusion_matrix", [image], step=step, caption=[title])

    def _epoch(self, trainer: L.Trainer) -> int | None:
        """The epoch the weights come from: this fit's, or the evaluated checkpoint's."""
        return trainer.current_epoch if trainer.state.fn == "fit" else self._ckpt_epoch


def _confusion_path(trainer: L.Trainer, stage: str) -> Path:
    """<run dir>/confusion_<stage>.png for fit's last validation; an evaluation's is named after
    its config (config_test_2.yaml -> confusion_test_2.png), so it never replaces the training's
    image or an earlier evaluation's."""
    run_dir = Path(trainer.default_root_dir)
    if trainer.state.fn == "fit":
        return run_dir / f"confusion_{stage}.png"
    config = getattr(trainer, EVALUATION_CONFIG_ATTR, None)  # set by the CLI
    if config:
        return run_dir / Path(config.replace("config_", "confusion_", 1)).with_suffix(".png")
    n = 1  # a Trainer used without the CLI: the next free number
    while (run_dir / f"confusion_{trainer.state.fn.value}_{n}.png").exists():
        n += 1
    return run_dir / f"confusion_{trainer.state.fn.value}_{n}.png"


def _confusion_title(model: str, stage: str, confmat: torch.Tensor, epoch: int | None) -> str:
    """ "UNet test, epoch 17: mIoU 61.3%" (mIoU over the classes present, as in seglight.metrics)."""
    from seglight.plots import class_scores

    iou = class_scores(confmat)["IoU"]
    miou = float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan")
    when = f", epoch {epoch}" if epoch is not None else ", no checkpoint"
    return f"{model} {stage}{when}: mIoU {100 * miou:.1f}%"


def _wandb_active(logger: Any) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return False
    return "disabled" not in (logger._wandb_init.get("mode"), os.environ.get("WANDB_MODE"))


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
