"""SegmentationModel: the LightningModule every architecture subclasses.

A subclass builds its network (a plain nn.Module) in __init__ and assigns it to `self.net`;
everything else is here, once: the loss, the metrics, the optimiser and schedule, logging, the
end-of-test table, and predict.

The network's forward takes images [B, in_channels, H, W] and returns logits
[B, num_classes, H, W] at the input's size, or, in training only, a dict
{"out": logits, "aux": logits or list of logits} whose auxiliary logits (any size; they are
resized to the mask) are added to the loss with weight `aux_weight` (PSPNet's 0.4).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from seglight.errors import ConfigError
from seglight.losses import CrossEntropyLoss, load_class_weights
from seglight.metrics import segmentation_metrics

MODELS: dict[str, type[SegmentationModel]] = {}


class PolyWithWarmup:
    """LR factor for LambdaLR: linear warm-up, then (1 - t)^power ("poly") or cosine decay.

    A class rather than a closure so that the scheduler's state can be checkpointed.
    """

    def __init__(
        self, total_steps: int, warmup_steps: int = 0, power: float = 0.9, kind: str = "poly"
    ):
        self.total_steps = max(1, total_steps)
        self.warmup_steps = max(0, min(warmup_steps, self.total_steps - 1))
        self.power = power
        self.kind = kind

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        t = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if self.kind == "poly":
            return (1.0 - t) ** self.power
        return 1.0


class SegmentationModel(L.LightningModule):
    """Base class of every seglight architecture.

    Args:
        num_classes: number of classes (linked from the data by the CLI).
        class_names: class names in index order, for per-class logs (linked from the data).
        ignore_index: target value that is ignored by the loss and the metrics (linked from the data).
        in_channels: image channels (linked from the data).
        class_weights: cross-entropy class weights: a list, one per class, or a file with them
            (JSON list or whitespace-separated numbers); null for none.
        label_smoothing: cross-entropy label smoothing.
        aux_weight: weight of auxiliary-head losses, when the network has such heads (training only).
        optimizer: "adamw" or "sgd" (Nesterov-free SGD with momentum).
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay; not applied to norms and biases.
        momentum: SGD momentum.
        scheduler: "poly" ((1 - t)^poly_power, per step), "cosine" or "constant".
        poly_power: exponent of the poly schedule (0.9 in DeepLab/PSPNet).
        warmup_steps: linear warm-up steps before the schedule.
        channels_last: use the channels_last memory format on CUDA (faster convolutions).
        compile: torch.compile the network.
    """

    #: short name -> class of every architecture (filled by subclassing)
    registry: ClassVar[dict[str, type[SegmentationModel]]] = MODELS
    #: the paper's figures for its reference configuration, for `seglight models`: parameters in
    #: millions and GFLOPs (None where the paper gives none); the docstring names the table
    paper_params: ClassVar[float | None] = None
    paper_gflops: ClassVar[float | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        MODELS[cls.__name__] = cls

    def __init__(
        self,
        num_classes: int,
        class_names: list[str] | None = None,
        ignore_index: int = 255,
        in_channels: int = 3,
        class_weights: list[float] | str | None = None,
        label_smoothing: float = 0.0,
        aux_weight: float = 0.4,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        scheduler: Literal["poly", "cosine", "constant"] = "poly",
        poly_power: float = 0.9,
        warmup_steps: int = 0,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class_names given for num_classes={num_classes}")
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.class_names = (
            list(class_names) if class_names else [str(i) for i in range(num_classes)]
        )
        self.ignore_index = ignore_index
        self.in_channels = in_channels
        self.criterion = CrossEntropyLoss(
            load_class_weights(class_weights, num_classes), ignore_index, label_smoothing
        )
        self.metrics = nn.ModuleDict(
            {stage: segmentation_metrics(num_classes, ignore_index) for stage in ("val", "test")}
        )
        self.net: nn.Module  # set by the subclass

    # ----------------------------------------------------------------------------- forward
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes, H, W] for images [B, in_channels, H, W]."""
        out = self.net(image)
        return out["out"] if isinstance(out, dict) else out

    def configure_model(self) -> None:
        # called by the Trainer before the model is moved to its device (the formats survive the move)
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        if self.hparams.channels_last and device.type == "cuda":
            self.net.to(memory_format=torch.channels_last)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.net = torch.compile(self.net)
            self._compiled = True

    def _input(self, batch: dict) -> torch.Tensor:
        image = batch["image"]
        if self.hparams.channels_last and image.is_cuda:
            image = image.contiguous(memory_format=torch.channels_last)
        return image

    # ----------------------------------------------------------------------------- steps
    def compute_loss(self, output: torch.Tensor | dict, mask: torch.Tensor) -> torch.Tensor:
        """Main loss plus `aux_weight` times each auxiliary head's loss."""
        if not isinstance(output, dict):
            return self.criterion(output, mask)
        loss = self.criterion(output["out"], mask)
        aux = output.get("aux")
        for logits in [aux] if isinstance(aux, torch.Tensor) else aux or []:
            logits = F.interpolate(
                logits, size=mask.shape[-2:], mode="bilinear", align_corners=False
            )
            loss = loss + self.hparams.aux_weight * self.criterion(logits, mask)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        output = self.net(self._input(batch))
        loss = self.compute_loss(output, batch["mask"])
        self.log(
            "train/loss",
            loss,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(batch["mask"]),
        )
        return loss

    def _eval_step(self, batch: dict, stage: str) -> dict:
        logits = self(self._input(batch))
        loss = self.criterion(logits, batch["mask"])
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=len(batch["mask"]))
        pred = logits.argmax(1)
        self.metrics[stage].update(pred, batch["mask"])
        return {"pred": pred}

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """{"pred": uint8/int64 labels [B, H, W], "name": list of sample names}."""
        pred = self(self._input(batch)).argmax(1)
        return {"pred": pred, "name": batch.get("name")}

    # ----------------------------------------------------------------------------- epoch ends
    def _log_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        values = self.metrics[stage].compute()  # synced across ranks by torchmetrics
        self.metrics[stage].reset()
        logs = {f"{stage}/{k}": values[k] for k in ("mIoU", "acc", "mAcc")}
        for name, iou in zip(self.class_names, values["IoU"], strict=True):
            logs[f"{stage}/IoU/{name}"] = iou
        # values are identical on every rank already: no further sync
        self.log_dict(logs, sync_dist=False)
        return logs

    def on_validation_epoch_end(self) -> None:
        logs = self._log_metrics("val")
        if self.trainer.state.fn == "validate" and not self.trainer.sanity_checking:
            self.print_table("val", logs)

    def on_test_epoch_end(self) -> None:
        self.print_table("test", self._log_metrics("test"))

    def print_table(self, stage: str, logs: dict[str, torch.Tensor]) -> None:
        """Per-class IoU and the summary metrics as a rich table (rank zero only)."""
        if not self.trainer.is_global_zero:
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{stage} per-class IoU ({type(self).__name__})")
        table.add_column("class")
        table.add_column("IoU %", justify="right")
        for name in self.class_names:
            iou = float(logs[f"{stage}/IoU/{name}"])
            table.add_row(name, "-" if math.isnan(iou) else f"{100 * iou:.2f}")
        table.add_section()
        for key, label in (("mIoU", "mIoU"), ("acc", "pixel acc"), ("mAcc", "mean class acc")):
            table.add_row(f"[bold]{label}", f"[bold]{100 * float(logs[f'{stage}/{key}']):.2f}")
        Console().print(table)

    # ----------------------------------------------------------------------------- checkpoints
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("num_classes")
        if saved is not None and saved != self.num_classes:
            raise ConfigError(
                f"the checkpoint was trained for {saved} classes but the data has {self.num_classes} "
                f"({', '.join(self.class_names)}); use a checkpoint trained on this dataset"
            )

    # ----------------------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict]:
        """Weight decay on conv/linear weights only, not on norms and biases (standard practice)."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        groups = self.parameter_groups()
        fused = {"fused": True} if self.device.type == "cuda" else {}
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, **fused)
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, **fused)
        else:
            raise ConfigError(f"optimizer must be 'adamw' or 'sgd', got {hp.optimizer!r}")
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ConfigError(
                "the LR schedule needs a finite number of steps: set trainer.max_epochs or trainer.max_steps"
            )
        factor = PolyWithWarmup(int(total), hp.warmup_steps, hp.poly_power, hp.scheduler)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_callbacks(self) -> list:
        # every run writes metrics.json (and predict writes masks), whatever callbacks the config lists
        from seglight.callbacks import MetricsSummary, PredictionWriter

        return [MetricsSummary(), PredictionWriter()]
