"""Callbacks used by the default configuration (experiments/defaults.yaml) and the base model."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint
from PIL import Image

from seglight.utils import atomic_write_json, default_palette, git_revision


def _scalar(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


class MetricsSummary(L.Callback):
    """Writes <run dir>/metrics.json after each validation and test (rank zero):

    {"model": ..., "data": ..., "params": ..., "git": {...}, "val": {metric: value}, "best_val":
    {... of the epoch with the best val/mIoU}, "test": {...}, "epoch": ..., "step": ...}

    A small, stable summary for comparing runs without W&B. Written atomically.
    """

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        path = Path(trainer.default_root_dir) / "metrics.json"
        summary: dict[str, Any] = {}
        if path.exists():
            try:
                import json

                summary = json.loads(path.read_text())
            except ValueError:
                summary = {}
        prefix = f"{stage}/"
        values = {
            k[len(prefix) :]: _scalar(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(prefix) and v.numel() == 1
        }
        if not values:
            return
        summary.update(
            model=type(pl_module).__name__,
            data=type(trainer.datamodule).__name__ if trainer.datamodule is not None else None,
            params=sum(p.numel() for p in pl_module.parameters()),
            git=summary.get("git") or git_revision(),
        )
        summary[stage] = values
        if stage == "val":
            summary.update(epoch=trainer.current_epoch, step=trainer.global_step)
            best = summary.get("best_val") or {}
            if values.get("mIoU") is not None and values["mIoU"] >= (best.get("mIoU") or -1):
                summary["best_val"] = {**values, "epoch": trainer.current_epoch}
        atomic_write_json(path, summary)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._update(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._update(trainer, pl_module, "test")


class ModelCheckpoint(_ModelCheckpoint):
    """Lightning's ModelCheckpoint, saving to <run dir>/checkpoints by default (so that
    `--ckpt_path last` finds the run's last.ckpt whatever logger is used)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)


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


class PredictionWriter(BasePredictionWriter):
    """Writes each predicted mask as a palette PNG, <output_dir>/<name>.png.

    Args:
        output_dir: where to write (default: <run dir>/predictions).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch_indices: Any,
        batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        out = Path(self.output_dir or Path(trainer.default_root_dir) / "predictions")
        out.mkdir(parents=True, exist_ok=True)
        palette = getattr(trainer.datamodule, "palette", None) or default_palette(
            pl_module.num_classes
        )
        flat = [c for rgb in palette for c in rgb]
        preds = prediction["pred"].to(torch.uint8).cpu().numpy()
        names = prediction.get("name") or [f"{batch_idx:05d}_{i:03d}" for i in range(len(preds))]
        for pred, name in zip(preds, names, strict=True):
            image = Image.fromarray(pred, mode="P")
            image.putpalette(flat)
            tmp = out / f".{name}.png.tmp"
            image.save(tmp, format="PNG")
            os.replace(tmp, out / f"{name}.png")
