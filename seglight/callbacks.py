"""Callbacks used by the default configuration (experiments/defaults.yaml) and the base model."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint
from lightning.pytorch.callbacks import RichModelSummary as _RichModelSummary
from lightning.pytorch.callbacks import RichProgressBar as _RichProgressBar
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from seglight.utils import atomic_write_json, default_palette, git_revision


def _scalar(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


class MetricsSummary(L.Callback):
    """Writes <run dir>/metrics.json after each validation and test and at the end of training
    (rank zero):

    {"model": ..., "data": ..., "params": ..., "git": {...}, "val": {metric: value}, "best_val":
    {... of the epoch with the best val/mIoU}, "test": {...}, "epoch": ..., "step": ...,
    "history": [{"epoch", "step", "mIoU", "acc", "mAcc", "loss"} for each validation],
    "throughput": {"train_images_per_s", "train_images", "train_seconds"},
    "memory": {"activations_mb", "batch_size", "peak_cuda_mb"}, "class_names": [...]}

    A small, stable summary for comparing runs without W&B (`python -m seglight compare`).
    Written atomically. Throughput counts the training batches after the first of each epoch
    (and of each stretch between validations), loading included, on rank zero times the world
    size. `activations_mb` is what the first training batch's forward pass keeps for the
    backward pass (distinct tensors, parameters excluded): the activation memory, measured the
    same way on a CPU or a GPU; `peak_cuda_mb` is the CUDA allocator's peak during fit.
    """

    def __init__(self) -> None:
        self._images = 0
        self._seconds = 0.0
        self._last: float | None = None
        self._memory: dict[str, Any] = {}
        self._hooks: Any = None

    # ----------------------------------------------------------------------------- throughput
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # the first batch includes the loader's start: not timed

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # time spent validating is not training time

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._memory or getattr(pl_module.hparams, "compile", False):
            return  # measured once; torch.compile and saved-tensor hooks do not mix
        params = {p.untyped_storage().data_ptr() for p in pl_module.parameters()}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, ...)
                return t
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        self._hooks = (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), saved)
        self._hooks[0].__enter__()
        self._memory["batch_size"] = _batch_size(batch)

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        self._end_activation_count()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        self._end_activation_count()
        now = time.perf_counter()
        if self._last is not None:
            self._seconds += now - self._last
            self._images += _batch_size(batch) or 0
        self._last = now

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._end_activation_count()  # never leave the hooks installed in this process

    def _end_activation_count(self) -> None:
        if self._hooks is not None:
            hooks, saved = self._hooks
            hooks.__exit__(None, None, None)
            self._memory["activations_mb"] = sum(saved.values()) / 2**20
            self._hooks = None

    # ----------------------------------------------------------------------------- the file
    def _save(
        self, trainer: L.Trainer, pl_module: L.LightningModule, summary: dict[str, Any]
    ) -> None:
        summary.update(
            model=type(pl_module).__name__,
            data=type(trainer.datamodule).__name__ if trainer.datamodule is not None else None,
            params=sum(p.numel() for p in pl_module.parameters()),
            git=summary.get("git") or git_revision(),
        )
        if getattr(pl_module, "class_names", None):  # the order of the classes (keys get sorted)
            summary["class_names"] = list(pl_module.class_names)
        if self._seconds > 0:
            summary["throughput"] = {
                "train_images_per_s": self._images / self._seconds * trainer.world_size,
                "train_images": self._images * trainer.world_size,
                "train_seconds": self._seconds,
            }
        memory = dict(self._memory)
        if pl_module.device.type == "cuda" and trainer.state.fn == "fit":
            memory["peak_cuda_mb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        if memory:
            summary["memory"] = {**summary.get("memory", {}), **memory}
        atomic_write_json(_summary_path(trainer), summary)

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        prefix = f"{stage}/"
        values = {
            k[len(prefix) :]: _scalar(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(prefix) and v.numel() == 1
        }
        if not values:
            return
        summary = _read_summary(trainer)
        summary[stage] = values
        if stage == "val":
            epoch, step = trainer.current_epoch, trainer.global_step
            summary.update(epoch=epoch, step=step)
            best = summary.get("best_val") or {}
            if values.get("mIoU") is not None and values["mIoU"] >= (best.get("mIoU") or -1):
                summary["best_val"] = {**values, "epoch": epoch}
            if trainer.state.fn == "fit":
                point = {k: values.get(k) for k in ("mIoU", "acc", "mAcc", "loss")}
                # a resumed run may validate a step again: one point per step
                history = [h for h in summary.get("history", []) if h.get("step") != step]
                summary["history"] = [*history, {**point, "epoch": epoch, "step": step}]
        self._save(trainer, pl_module, summary)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._update(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._update(trainer, pl_module, "test")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:  # throughput and memory, also for a fit without validation
            self._save(trainer, pl_module, _read_summary(trainer))


def _summary_path(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir) / "metrics.json"


def _read_summary(trainer: L.Trainer) -> dict[str, Any]:
    path = _summary_path(trainer)
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        return {}


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, dict) and isinstance(batch.get("mask"), torch.Tensor):
        return len(batch["mask"])
    return None


class ModelCheckpoint(_ModelCheckpoint):
    """Lightning's ModelCheckpoint, saving to <run dir>/checkpoints by default (so that
    `--ckpt_path last` finds the run's last.ckpt whatever logger is used)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)


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
    `test`; the last confusion matrix of a fit, validate or test is also saved as
    <run dir>/confusion_<stage>.png.

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
        path = Path(trainer.default_root_dir) / f"confusion_{stage}.png" if save else None
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


class PredictionWriter(BasePredictionWriter):
    """Writes each predicted mask as a palette PNG, <output_dir>/<name>.png, and the image beside
    its prediction blended over it, <output_dir>/overlays/<name>.jpg (twice the image's width).

    Args:
        output_dir: where to write (default: <run dir>/predictions).
        overlays: also write the side-by-side overlays.
        alpha: opacity of the mask's colours in the overlay.
    """

    def __init__(
        self, output_dir: str | None = None, overlays: bool = True, alpha: float = 0.5
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.overlays = overlays
        self.alpha = alpha
        self._written = {"masks": 0, "overlays": 0}
        self.last_written: dict[str, Any] = {}  # `written` at the end of the last predict

    def _out(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or Path(trainer.default_root_dir) / "predictions")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._written = {"masks": 0, "overlays": 0}

    def written(self, trainer: L.Trainer) -> dict[str, Any]:
        """{"predict/masks", "predict/overlays": files written by all ranks, "predict/dir"}
        (a collective: every rank calls it)."""
        counts = torch.tensor([self._written["masks"], self._written["overlays"]])
        masks, overlays = (int(n) for n in trainer.strategy.reduce(counts, reduce_op="sum"))
        return {
            "predict/masks": masks,
            "predict/overlays": overlays,
            "predict/dir": str(self._out(trainer)),
        }

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Say what was written where (the counts of every rank)."""
        written = self.last_written = self.written(trainer)
        masks, overlays = written["predict/masks"], written["predict/overlays"]
        if not trainer.is_global_zero:
            return
        out = self._out(trainer)
        print(
            f"seglight predict: wrote {masks} masks to {out}/ (palette PNG, class index per pixel)"
        )
        if overlays:
            print(
                f"seglight predict: wrote {overlays} overlays to {out / 'overlays'}/ (JPEG: the "
                "image beside its prediction blended over it)"
            )

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch_indices: Any,
        batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        from seglight.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize
        from seglight.inference import overlay

        out = self._out(trainer)
        dm = trainer.datamodule
        palette = getattr(dm, "palette", None) or default_palette(pl_module.num_classes)
        flat = [c for rgb in palette for c in rgb]
        preds = prediction["pred"].to(torch.uint8).cpu()
        names = prediction.get("name") or [f"{batch_idx:05d}_{i:03d}" for i in range(len(preds))]
        images = None
        if self.overlays and isinstance(batch, dict) and "image" in batch:
            mean = getattr(dm, "mean", IMAGENET_MEAN)
            std = getattr(dm, "std", IMAGENET_STD)
            images = denormalize(batch["image"][:, :3], mean[:3], std[:3]).cpu()
            colours = torch.tensor(palette, dtype=torch.uint8)
        for i, (pred, name) in enumerate(zip(preds, names, strict=True)):
            image = Image.fromarray(pred.numpy(), mode="P")
            image.putpalette(flat)
            self._save(image, out / f"{name}.png", "PNG")
            self._written["masks"] += 1
            if images is not None:
                # classes beyond the palette (none in practice) wrap around rather than fail
                coloured = colours[pred.long() % len(colours)].permute(2, 0, 1)
                side_by_side = overlay(images[i], coloured, self.alpha)
                picture = Image.fromarray(side_by_side.permute(1, 2, 0).numpy())
                self._save(picture, out / "overlays" / f"{name}.jpg", "JPEG", quality=90)
                self._written["overlays"] += 1

    @staticmethod
    def _save(image: Image.Image, path: Path, fmt: str, **options: Any) -> None:
        """Write atomically: a reader sees the old file or the new one, never a part."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        image.save(tmp, format=fmt, **options)
        os.replace(tmp, path)
