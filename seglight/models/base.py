"""SegmentationModel: the LightningModule every architecture subclasses.

A subclass builds its network (a plain nn.Module) in __init__ and assigns it to `self.net`;
everything else is here, once: the loss, the metrics, the optimiser and schedule, the weight
average (EMA), inference recipes (sliding window, test-time augmentation, CRF), logging, the
end-of-test table, and predict.

The network's forward takes images [B, in_channels, H, W] and returns logits
[B, num_classes, H, W] at the input's size, or, in training only, a dict
{"out": logits, "aux": logits or list of logits} whose auxiliary logits (any size; they are
resized to the mask) are added to the loss with weight `aux_weight` (PSPNet's 0.4); the same
loss (`loss`, possibly a weighted sum) is applied to every head.

Conventions for architectures: the backbone is `self.net.encoder` (`encoder_lr_mult` scales its
learning rate); nothing else is needed for the options here to work.
"""

from __future__ import annotations

import math
import sys
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from seglight.ema import EMA
from seglight.errors import ConfigError
from seglight.inference import InferenceConfig, infer
from seglight.losses import (
    MEDIAN_FREQUENCY,
    build_loss,
    load_class_weights,
    set_class_weights,
)
from seglight.metrics import segmentation_metrics
from seglight.profile import PaperCost

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


def fused_option(device: torch.device) -> dict[str, bool]:
    """{"fused": True} where torch has fused AdamW/SGD kernels for `device` (CUDA, and the CPU
    since torch 2.4): one kernel over all parameters instead of a loop of small ops per tensor
    (on the CPU, U-Net R34's AdamW step takes ~17 ms fused against ~77 ms)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        supported = device.type in _get_fused_kernels_supported_devices()
    except ImportError:  # older torch: CUDA only
        supported = device.type == "cuda"
    return {"fused": True} if supported else {}


def _trained_model(hparams: dict[str, Any]) -> str:
    """ " (LinkNet)" or " (FixMatch, network UNet)": what a checkpoint's hyper-parameters say it
    trained, for errors; "" when they do not say."""
    names = []
    for key, label in (("_class_path", ""), ("network", "network ")):
        value = hparams.get(key)
        if isinstance(value, dict):
            value = value.get("class_path")
        if isinstance(value, str) and value:
            names.append(label + value.rsplit(".", 1)[-1])
    return f" ({', '.join(names)})" if names else ""


def one_class_message(num_classes: int, class_names: Any = None) -> str:
    """The refusal of data with fewer than two classes (a softmax over one class is constant:
    nothing to learn, and per-class metrics have nothing to average), naming the fix."""
    names = list(class_names or [])
    example = f"[background, {names[0]}]" if len(names) == 1 else "[background, object]"
    return (
        f"num_classes={num_classes}{f' ({names})' if names else ''}: segmentation needs the "
        f"background and at least one object class; list both, e.g. classes: {example} "
        "(for 0/255 masks add --data.mask_format binary)"
    )


class SegmentationModel(L.LightningModule):
    """Base class of every seglight architecture.

    Args:
        num_classes: number of classes (linked from the data by the CLI).
        class_names: class names in index order, for per-class logs (linked from the data).
        ignore_index: target value that is ignored by the loss and the metrics (linked from the data).
        in_channels: image channels (linked from the data).
        loss: the training loss: a name (ce, focal, dice, lovasz, ohem, unet; see seglight.losses)
            or a weighted sum {name: weight}, e.g. {ce: 1.0, dice: 0.5}.
        loss_options: options of each loss by name, e.g. {focal: {gamma: 2}, ohem: {thresh: 0.7,
            min_kept: 100000}, unet: {w0: 10, sigma: 5}}.
        class_weights: class weights for ce, focal, ohem and unet: a list, one per class, a file
            with them (JSON list or whitespace-separated numbers), "median_frequency" (computed
            from the training masks at setup, Eigen and Fergus 2015), or null for none.
        label_smoothing: label smoothing of ce and ohem.
        aux_weight: weight of auxiliary-head losses, when the network has such heads (training only).
        optimizer: "adamw" or "sgd" (Nesterov-free SGD with momentum).
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay; not applied to norms and biases.
        momentum: SGD momentum.
        scheduler: "poly" ((1 - t)^poly_power, per step), "cosine" or "constant".
        poly_power: exponent of the poly schedule (0.9 in DeepLab/PSPNet).
        warmup_steps: linear warm-up steps before the schedule.
        encoder_lr_mult: learning-rate multiplier of the encoder (`net.encoder`), e.g. 0.1 for a
            pretrained backbone.
        ema_decay: keep an exponential moving average of the weights with this decay (e.g.
            0.999), updated after each optimiser step; validation, test and predict then use the
            averaged weights, which checkpoints hold. null: off.
        inference: how validate, test and predict infer (seglight.inference.InferenceConfig):
            mode (whole | slide), window, overlap, blend, scales, flip, crf (none | dense |
            conv), crf_options, during_fit (apply to fit's validation too).
        channels_last: use the channels_last memory format on CUDA (faster convolutions).
        compile: torch.compile the network.
        init_from: a seglight checkpoint to start training from (a warm start, e.g. a
            semi-supervised method from a supervised run of the same architecture on the
            labelled images): when `fit` starts, the network takes its network weights (its
            averaged ones if it kept an EMA; `init_networks` says where they go), read with the
            safe loader (seglight.checkpoints); nothing else (optimiser, step, a discriminator)
            is taken. Ignored when resuming (`--ckpt_path` restores the run's own weights, and the
            file is not read) and by validate / test / predict.
    """

    #: short name -> class of every architecture (filled by subclassing)
    registry: ClassVar[dict[str, type[SegmentationModel]]] = MODELS
    #: the paper's figures for its reference configuration, for `seglight models`: parameters in
    #: millions and GFLOPs (None where the paper gives none); the docstring names the table
    paper_params: ClassVar[float | None] = None
    paper_cost: ClassVar[PaperCost | None] = None  # the paper's FLOPs and their setting
    #: trained from instance targets (batch["instances"]) by its own training_step rather than
    #: from logits and the semantic mask (Mask R-CNN); generic loss-from-logits tests skip it
    instance_model: ClassVar[bool] = False
    #: the validation metric that chooses the best checkpoint (seglight's ModelCheckpoint with
    #: `monitor: auto`, the defaults' setting) and metrics.json's best_val, and whether higher
    #: ("max") or lower ("min") is better; instance models choose on mask AP
    checkpoint_monitor: ClassVar[tuple[str, str]] = ("val/mIoU", "max")
    #: False for a model whose training objective is not `loss` on its logits (DecoupledNet:
    #: image-level BCE plus per-class figure-ground losses; its logits are log-probabilities of
    #: the detected classes only): the registry's initial-loss check does not apply to it
    trains_on_logits: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        MODELS[cls.__name__] = cls

    def __init__(
        self,
        num_classes: int,
        class_names: list[str] | None = None,
        ignore_index: int = 255,
        in_channels: int = 3,
        loss: str | dict[str, float] = "ce",
        loss_options: dict[str, dict[str, Any]] | None = None,
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
        encoder_lr_mult: float = 1.0,
        ema_decay: float | None = None,
        inference: InferenceConfig | None = None,
        channels_last: bool = True,
        compile: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(one_class_message(num_classes, class_names))
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class_names given for num_classes={num_classes}")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1) or null, got {ema_decay}")
        if encoder_lr_mult < 0:
            raise ConfigError(f"encoder_lr_mult must be >= 0, got {encoder_lr_mult}")
        # `inference` is not a property of the trained weights: kept out of the checkpoint so
        # that `test --ckpt_path X --model.inference.flip true` is not overridden by the
        # checkpoint's hyperparameters (LightningCLI restores those over the command line)
        self.save_hyperparameters(ignore=["inference"])
        self.inference = InferenceConfig.from_any(inference)
        self.num_classes = num_classes
        self.class_names = (
            list(class_names) if class_names else [str(i) for i in range(num_classes)]
        )
        self.ignore_index = ignore_index
        self.in_channels = in_channels
        self.criterion = build_loss(
            loss,
            loss_options,
            ignore_index,
            load_class_weights(class_weights, num_classes),
            label_smoothing,
        )
        self.metrics = nn.ModuleDict(
            {stage: segmentation_metrics(num_classes, ignore_index) for stage in ("val", "test")}
        )
        # the evaluation losses' means, weighted by batch size and summed over DDP ranks (every
        # sample counted once, as in one process); not in the state dict
        self.loss_means = nn.ModuleDict(
            {stage: MeanMetric(nan_strategy="disable") for stage in ("val", "test")}
        )
        self.net: nn.Module  # set by the subclass
        self.ema: EMA | None = None  # created from self.net by _ensure_ema

    # ----------------------------------------------------------------------------- forward
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes, H, W] for images [B, in_channels, H, W]; in eval mode with
        `ema_decay` set, from the averaged weights."""
        net = self.ema.module if self.ema is not None and not self.training else self.net
        out = net(image)
        return out["out"] if isinstance(out, dict) else out

    def _ensure_ema(self) -> None:
        if self.hparams.get("ema_decay") is not None and self.ema is None:
            self.ema = EMA(self.net, self.hparams.ema_decay)  # a copy, on the net's device

    def configure_model(self) -> None:
        # called by the Trainer before the model is moved to its device (the formats survive the move)
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        if self.hparams.channels_last and device.type == "cuda":
            self.net.to(memory_format=torch.channels_last)
        self._ensure_ema()  # before compiling: the average is a copy of the plain network
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.net = torch.compile(self.net)
            self._compiled = True

    def setup(self, stage: str) -> None:
        if self.hparams.class_weights == MEDIAN_FREQUENCY and not getattr(self, "_mf_done", False):
            weights = self._median_frequency_weights()
            if weights is not None:
                set_class_weights(self.criterion, weights.to(self.device))
            self._mf_done = True

    def check_data(self, datamodule: Any, stage: str) -> None:
        """Refuse data this model cannot run `stage` on, in one line (a ConfigError). The CLI
        calls it with the data set up, before the run directory gets files; a no-op here."""

    def _median_frequency_weights(self) -> torch.Tensor | None:
        """Median-frequency class weights of the datamodule's training masks (seglight.data.stats);
        None when the data has no training split (e.g. predict on Images: the weights only
        matter for the losses)."""
        from seglight.data.stats import dataset_statistics

        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or "train" not in getattr(dm, "splits", ()):
            return None
        weights = torch.tensor(dataset_statistics(dm, "train")["weights"], dtype=torch.float32)
        if self.trainer.is_global_zero:
            shown = ", ".join(
                f"{n} {w:.3f}" for n, w in zip(self.class_names, weights.tolist(), strict=True)
            )
            print(f"seglight: median-frequency class weights: {shown}", file=sys.stderr)
        return weights

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
        # semi-supervised data ({"labeled": batch, "unlabeled": batch}): a plain model trains on
        # the labelled part only, the reference row of semi-supervised tables
        batch = batch.get("labeled", batch)
        output = self.net(self._input(batch))
        loss = self.compute_loss(output, batch["mask"])
        # not prog_bar: Lightning reads progress-bar values back to the host after every batch (a
        # sync per step); seglight.callbacks.RichProgressBar shows the loss every few steps instead
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(batch["mask"]))
        return loss

    def _uses_inference_recipe(self, stage: str) -> bool:
        if self.inference.is_plain:
            return False
        if stage == "val" and self._trainer is not None and self.trainer.state.fn == "fit":
            return self.inference.during_fit
        return True

    def _rgb(self, batch: dict) -> torch.Tensor:
        """The batch's images as uint8 RGB [B, 3, H, W] (for the CRFs' colour kernels)."""
        from seglight.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize

        dm = self.trainer.datamodule if self._trainer is not None else None
        mean = getattr(dm, "mean", IMAGENET_MEAN)
        std = getattr(dm, "std", IMAGENET_STD)
        return denormalize(batch["image"][:, :3], mean[:3], std[:3])

    def predict_scores(self, batch: dict, stage: str = "predict") -> torch.Tensor:
        """Scores [B, num_classes, H, W] whose argmax is the prediction: the logits, or, with an
        `inference` recipe (sliding window, TTA, CRF), the log of its averaged probabilities."""
        image = self._input(batch)
        if not self._uses_inference_recipe(stage):
            return self(image)
        probs = infer(self, image, self.inference, rgb=lambda: self._rgb(batch))
        return probs.clamp(min=1e-8).log()

    def _eval_step(self, batch: dict, stage: str) -> dict:
        scores = self.predict_scores(batch, stage)
        loss = self.criterion(scores, batch["mask"])
        self.loss_means[stage].update(loss.detach(), weight=len(batch["mask"]))  # logged at the end
        pred = scores.argmax(1)
        self.metrics[stage].update(pred, batch["mask"])
        return {"pred": pred}

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """{"pred": int64 labels [B, H, W], "name": list of sample names}."""
        pred = self.predict_scores(batch, "predict").argmax(1)
        return {"pred": pred, "name": batch.get("name")}

    # ----------------------------------------------------------------------------- epoch ends
    def _log_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        values = self.metrics[stage].compute()  # synced across ranks by torchmetrics
        self.metrics[stage].reset()
        logs = {f"{stage}/{k}": values[k] for k in ("mIoU", "acc", "mAcc")}
        if self.loss_means[stage].update_called:  # not by models without an evaluation loss
            logs[f"{stage}/loss"] = self.loss_means[stage].compute()  # synced likewise
        self.loss_means[stage].reset()  # (also after the sanity check's few batches)
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
    def on_fit_start(self) -> None:
        # after Lightning restored a `--ckpt_path` (trainer.ckpt_path is then set: the run's own
        # weights win) and before the first step; once per model object (a second fit goes on)
        path = self.hparams.get("init_from")
        if path and not self.trainer.ckpt_path and getattr(self, "_init_from_done", None) is None:
            self.initialise_from(path)
            self._init_from_done = path

    def initialise_from(self, path: str) -> None:
        """Load the network weights of the seglight checkpoint `path` (`init_from`) through
        `init_networks`; an EMA (Mean Teacher's teacher) restarts from them too. Raises
        CheckpointError (one line naming the file) when the file is not a seglight checkpoint, or
        was trained for other classes or with another network."""
        from seglight.checkpoints import load_checkpoint, network_state
        from seglight.errors import CheckpointError

        where = f"init_from {str(path)!r}"
        checkpoint = load_checkpoint(path, "init_from")
        hparams = checkpoint.get("hyper_parameters") or {}
        saved = hparams.get("num_classes")
        if saved is not None and saved != self.num_classes:
            raise CheckpointError(
                f"{where} was trained for {saved} classes but this model has {self.num_classes} "
                f"({', '.join(self.class_names)}): use a checkpoint trained on this dataset"
            )
        trained = _trained_model(hparams)
        self.init_networks(network_state(checkpoint, where), where + trained)
        if self.ema is not None:  # the average (a teacher) starts from the same weights
            net = getattr(self.net, "_orig_mod", self.net)
            self.ema.module.load_state_dict(net.state_dict())
        if self._trainer is None or self.trainer.is_global_zero:
            print(f"seglight: network weights from {where}{trained}", file=sys.stderr)

    def init_networks(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Copy an `init_from` checkpoint's network weights (keys as in `net`) into the model's
        networks: `net`; methods with more (CPS) or other (GANSemiSeg) networks override it."""
        from seglight.checkpoints import load_network

        load_network(self.net, state, where)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("num_classes")
        if saved is not None and saved != self.num_classes:
            raise ConfigError(
                f"the checkpoint was trained for {saved} classes but the data has {self.num_classes} "
                f"({', '.join(self.class_names)}); use a checkpoint trained on this dataset"
            )
        self._match_ema_state(checkpoint.get("state_dict", {}))
        if self.strict_loading:  # one line naming what differs, not torch's list of keys
            from seglight.checkpoints import check_state_dict

            where = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
            check_state_dict(self, checkpoint.get("state_dict", {}), f"checkpoint {str(where)!r}")

    def _match_ema_state(self, state: dict[str, torch.Tensor]) -> None:
        """Make a checkpoint's weights fit this model's EMA setting (edits `state` in place):
        - this model averages, the checkpoint has no average: the average starts from its weights;
        - the checkpoint has an average, this model none: evaluate the average (the weights the
          run was validated with), or, when fitting, continue from the raw weights."""
        ema_prefix = "ema.module."

        def strip(key: str) -> str:
            return key.removeprefix("net.").removeprefix("_orig_mod.")

        has_ema = any(k.startswith("ema.") for k in state)
        if self.hparams.get("ema_decay") is not None:
            self._ensure_ema()
            if not has_ema:
                for key in [k for k in state if k.startswith("net.")]:
                    state[ema_prefix + strip(key)] = state[key].clone()
                state["ema.num_updates"] = torch.zeros((), dtype=torch.long)
        elif has_ema:
            fitting = self._trainer is not None and self.trainer.state.fn == "fit"
            if not fitting:
                for key in [k for k in state if k.startswith("net.")]:
                    state[key] = state[ema_prefix + strip(key)]
            for key in [k for k in state if k.startswith("ema.")]:
                del state[key]

    # ----------------------------------------------------------------------------- optimisation
    def networks(self) -> list[nn.Module]:
        """The trained networks (methods with two, such as CPS, list both)."""
        return [self.net]

    def parameter_groups(self) -> list[dict]:
        """Weight decay on conv/linear weights only, not on norms and biases (standard practice);
        the encoder's (`net.encoder`) learning rate times `encoder_lr_mult`."""
        hp = self.hparams
        mult = hp.get("encoder_lr_mult", 1.0)
        encoder_ids: set[int] = set()
        if mult != 1.0:
            for net in self.networks():
                encoder = getattr(getattr(net, "_orig_mod", net), "encoder", None)
                if not isinstance(encoder, nn.Module):
                    raise ConfigError(
                        f"encoder_lr_mult={mult}: {type(self).__name__}'s network has no `encoder` "
                        "module (the convention for the backbone whose learning rate it scales)"
                    )
                encoder_ids |= {id(p) for p in encoder.parameters()}
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for p in self.parameters():
            if p.requires_grad:  # the EMA copy has none
                groups.setdefault((id(p) in encoder_ids, p.ndim <= 1), []).append(p)
        return [
            {
                "params": groups[key],
                "weight_decay": 0.0 if key[1] else hp.weight_decay,
                "lr": hp.lr * (mult if key[0] else 1.0),
            }
            for key in sorted(groups)
        ]

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        groups = self.parameter_groups()
        fused = fused_option(self.device)
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

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # free the gradients now: Lightning zeroes them only after the next forward pass, so they
        # would stay allocated through it, where memory peaks (one more copy of the weights)
        optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.net)

    def configure_callbacks(self) -> list:
        # every run writes metrics.json (and predict writes masks), whatever callbacks the config
        # lists; a PredictionWriter configured there (own output_dir, overlays) is kept
        from seglight.callbacks import (
            MetricsSummary,
            NonFiniteLossCheck,
            PredictionWriter,
            SafeCheckpoints,
            ThreadsRecheck,
        )

        # also: checkpoints written atomically with the random states (exact resume), a stop
        # with a clear error at a NaN/Inf training or validation loss or model state (first: a
        # diverged validation is not recorded in metrics.json), and torch's threads following
        # the load
        callbacks: list = [
            NonFiniteLossCheck(),
            MetricsSummary(),
            SafeCheckpoints(),
            ThreadsRecheck(),
        ]
        if not any(isinstance(c, PredictionWriter) for c in self.trainer.callbacks):
            callbacks.append(PredictionWriter())
        return callbacks
