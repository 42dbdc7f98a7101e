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
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.callbacks import LearningRateMonitor as _LearningRateMonitor
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint
from lightning.pytorch.callbacks import RichModelSummary as _RichModelSummary
from lightning.pytorch.callbacks import RichProgressBar as _RichProgressBar
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from seglight.errors import DivergenceError
from seglight.utils import (
    atomic_open,
    atomic_write_json,
    default_palette,
    git_revision,
    remove_stale_temporaries,
)


def _scalar(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


class MetricsSummary(L.Callback):
    """Writes <run dir>/metrics.json after each validation and test and at the end of training
    (rank zero):

    {"model": ..., "data": ..., "params": ..., "git": {...}, "val": {metric: value}, "best_val":
    {... of the epoch with the best val/mIoU}, "epoch": ..., "step": ...,
    "history": [{"epoch", "step", "mIoU", "acc", "mAcc", "loss", "wall_s"} for each validation;
    wall_s: seconds since the fit started, sanity check included, continued across a resume],
    "throughput": {"train_images_per_s", "train_images", "train_seconds"},
    "memory": {"activations_mb", "batch_size", "peak_cuda_mb"}, "class_names": [...],
    "evaluations": [{"stage", "checkpoint", "checkpoint_epoch", "checkpoint_step", "inference",
    "config", "time", "metrics"} for each validate / test / predict]}

    Only `fit` writes the training record (val, best_val, epoch, step, history); `validate`,
    `test` and `predict` append to "evaluations" and never change it (their config is saved as
    config_<stage>_<n>.yaml beside the fit's config.yaml).

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
        self._checkpoint: dict[str, Any] = {}  # epoch and step of a loaded checkpoint
        self._wall_start: float | None = None
        self._wall_offset = 0.0

    # ----------------------------------------------------------------------------- throughput
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        # wall time for the history (time to accuracy); a resumed fit continues its clock
        history = _read_summary(trainer).get("history") if trainer.ckpt_path else None
        self._wall_offset = (history[-1].get("wall_s") or 0.0) if history else 0.0
        self._wall_start = time.perf_counter()

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
        if trainer.state.fn != "fit":  # an evaluation: recorded beside the training record
            summary.setdefault("evaluations", []).append(
                self._evaluation(trainer, pl_module, values)
            )
            self._save(trainer, pl_module, summary)
            return
        summary[stage] = values
        if stage == "val":
            epoch, step = trainer.current_epoch, trainer.global_step
            summary.update(epoch=epoch, step=step)
            best = summary.get("best_val") or {}
            # strictly better, as ModelCheckpoint decides: on a tie the first epoch stays the
            # best, so best_val describes the best checkpoint
            if values.get("mIoU") is not None and values["mIoU"] > (best.get("mIoU") or -1):
                summary["best_val"] = {**values, "epoch": epoch}
            if trainer.state.fn == "fit":
                point = {k: values.get(k) for k in ("mIoU", "acc", "mAcc", "loss")}
                if self._wall_start is not None:  # seconds since the fit started
                    wall = self._wall_offset + time.perf_counter() - self._wall_start
                    point["wall_s"] = round(wall, 2)
                # a resumed run may validate a step again: one point per step
                history = [h for h in summary.get("history", []) if h.get("step") != step]
                summary["history"] = [*history, {**point, "epoch": epoch, "step": step}]
        self._save(trainer, pl_module, summary)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._checkpoint = {k: checkpoint.get(k) for k in ("epoch", "global_step")}

    def _evaluation(
        self, trainer: L.Trainer, pl_module: L.LightningModule, values: dict[str, Any] | None
    ) -> dict[str, Any]:
        """One entry of "evaluations": what was evaluated, how, when, and the result."""
        import dataclasses
        from datetime import datetime, timezone

        inference = getattr(pl_module, "inference", None)
        checkpoint = self._checkpoint
        record = {
            "stage": str(trainer.state.fn.value),  # validate, test, predict
            "checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "checkpoint_epoch": checkpoint.get("epoch"),
            "checkpoint_step": checkpoint.get("global_step"),
            "inference": dataclasses.asdict(inference)
            if dataclasses.is_dataclass(inference)
            else None,
            "config": getattr(trainer, EVALUATION_CONFIG_ATTR, None),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if values is not None:
            record["metrics"] = values
        return record

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._update(trainer, pl_module, "val")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            summary = _read_summary(trainer)
            summary.setdefault("evaluations", []).append(self._evaluation(trainer, pl_module, None))
            self._save(trainer, pl_module, summary)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._update(trainer, pl_module, "test")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:  # throughput and memory, also for a fit without validation
            self._save(trainer, pl_module, _read_summary(trainer))


#: the Trainer attribute where the CLI notes the config file of an evaluation (validate, test,
#: predict): config_<stage>_<n>.yaml in the run directory
EVALUATION_CONFIG_ATTR = "seglight_config_file"


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
    `--ckpt_path last` finds the run's last.ckpt whatever logger is used), and with `save_last`
    rewriting last.ckpt after every validation (or training epoch, when there is no validation),
    whether the monitored metric improved or not: last.ckpt always holds the latest state, for
    `--ckpt_path last`. (Lightning 2.6 rewrites it only when a top-k checkpoint was saved at the
    same step, i.e. only on improvement; tests/test_resume.py pins the behaviour we rely on.)"""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_due(trainer, at_train_epoch_end=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_last_if_due(trainer, at_train_epoch_end=False)

    def _save_last_if_due(self, trainer: L.Trainer, at_train_epoch_end: bool) -> None:
        # `_should_skip_saving_checkpoint` is also true when Lightning saved at this step already
        if (
            self.save_last is True
            and not self._should_skip_saving_checkpoint(trainer)
            and self._should_save_on_train_epoch_end(trainer) == at_train_epoch_end
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save checkpoint IO, reading with weights_only=True only and writing local
    files through
    seglight.utils.atomic_open (a temporary file beside the checkpoint, fsync, rename): a kill at
    any moment leaves the previous checkpoint or the new one, never a truncated file, and nothing
    in $TMPDIR. Remote paths (s3://, ...) keep Lightning's own writer."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        remove_stale_temporaries(path)  # left by a killed writer (only rank zero writes)
        with atomic_open(path, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: Any = None
    ) -> dict:
        """Local files through seglight.checkpoints.load_checkpoint (weights_only=True, one-line
        errors), whatever the caller asks: Trainer.fit(ckpt_path=...) outside the CLI too."""
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, weights_only=True)
        from seglight.checkpoints import load_checkpoint

        return load_checkpoint(path)


class SafeCheckpoints(L.Callback):
    """Makes every checkpoint of a run safe to resume from, exactly:

    - checkpoints are written atomically (AtomicCheckpointIO replaces Lightning's default IO);
    - the global random states (torch, CUDA, numpy, Python) of every rank are saved in the
      checkpoint and restored when training resumes from it, so dropout and any other draw in
      the training step continue the same streams (the data order and augmentation are a
      function of the seed, epoch and position; seglight.data.base.ResumableSampler).

    Added by SegmentationModel.configure_callbacks, so every run has it (CLI or Trainer).
    """

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None
        self._loader_states: list[dict[str, int]] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        # only Lightning's default writer is replaced: a configured one (async, remote) is kept
        if type(getattr(strategy, "_checkpoint_io", None) or TorchCheckpointIO()) is (
            TorchCheckpointIO
        ):
            strategy.checkpoint_io = AtomicCheckpointIO()

    def state_dict(self) -> dict[str, Any]:
        states = [rng_states()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # rank zero writes the checkpoint: it keeps every rank's streams (a collective:
            # Lightning builds the checkpoint on every rank)
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        return {"rng": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        self._loader_states = loop.get("combined_loader")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resume_loader(trainer)
        # restored here, after the sanity check and the loaders' start, right before the first
        # training step: what ran in between draws nothing from these generators
        if self._loaded is None:
            return
        states = self._loaded.get("rng") or []
        if len(states) == trainer.world_size:
            set_rng_states(states[trainer.global_rank])
        elif states:
            rank_zero_warn(
                f"the checkpoint holds the random states of {len(states)} processes, this run has "
                f"{trainer.world_size}: they are not restored (the run continues, not bit-exactly)"
            )
        self._loaded = None

    def _resume_loader(self, trainer: L.Trainer) -> None:
        """Continue the training loader where the checkpoint left it (mid-epoch: at the next
        batch; at an epoch's end: at the next epoch's start).

        Lightning restores a loader's state only if the loader starts after the checkpoint is
        loaded; SegmentationModel.configure_optimizers asks for `estimated_stepping_batches`,
        which starts it before (at epoch 0's first batch, which Lightning would then use with
        loader workers). So the state is applied here and the loader's iterator started again."""
        from seglight.data.base import ResumableLoader

        states, self._loader_states = self._loader_states, None
        # one loader, or several (SemiSupervised's labelled and unlabelled ones): the fit loop's
        # CombinedLoader saved the state of each of its loaders that has one, in this order
        combined = getattr(trainer.fit_loop, "_combined_loader", None)
        loaders = combined.flattened if combined is not None else [trainer.train_dataloader]
        loaders = [dl for dl in loaders if callable(getattr(dl, "state_dict", None))]
        if not states or len(states) != len(loaders):
            return
        if not all(isinstance(dl, ResumableLoader) for dl in loaders):
            return
        for dl, state in zip(loaders, states, strict=True):
            dl.load_state_dict(state)
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if fetcher is not None:
            iter(fetcher)  # the epoch loop then counts the batches already done (`fetched`)


def rng_states() -> dict[str, Any]:
    """This process's global random states, as tensors and plain values (loadable with
    torch.load(weights_only=True))."""
    import random

    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
            "has_gauss": int(np_has_gauss), "gauss": float(np_gauss),
        },
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    import random

    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


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


def _instance_colour(k: int) -> tuple[int, int, int]:
    """A distinct, saturated colour for the k-th instance (golden-ratio hue steps)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


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

    For instance models (a prediction with "instances"), also each image's instances: an
    instance-id PNG <output_dir>/instances/<name>.png (16-bit, 0 = none, id k = the k-th instance
    by score; higher scores win overlaps) with <name>.json mapping id -> class name (the
    FolderInstances format, so predictions can be read back as data), and an overlay
    <output_dir>/overlays/<name>_instances.jpg (each instance its own colour, box and class label).

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
            if prediction.get("instances") is not None:
                self._write_instances(
                    out, name, prediction["instances"][i], pl_module.class_names,
                    None if images is None else images[i],
                )  # fmt: skip

    def _write_instances(
        self, out: Path, name: str, instances: dict[str, torch.Tensor], class_names: list[str],
        image: torch.Tensor | None,
    ) -> None:  # fmt: skip
        """The instance-id PNG, its JSON and (with `image`, uint8 [3, H, W]) the overlay."""
        from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

        order = instances["scores"].argsort(descending=True).cpu()
        masks = instances["masks"].cpu()[order].bool()  # [N, H, W]
        labels = instances["labels"].cpu()[order].tolist()
        ids = np.zeros(masks.shape[-2:], dtype=np.uint16)
        for k in range(len(masks) - 1, -1, -1):  # the best last: it wins overlaps
            ids[masks[k].numpy()] = k + 1
        self._save(Image.fromarray(ids), out / "instances" / f"{name}.png", "PNG")
        mapping = {str(k + 1): class_names[c] for k, c in enumerate(labels)}
        atomic_write_json(out / "instances" / f"{name}.json", mapping)
        if image is None:
            return
        picture = image
        if len(masks):
            colours = [_instance_colour(k) for k in range(len(masks))]
            picture = draw_segmentation_masks(picture, masks, alpha=self.alpha, colors=colours)
            scores = instances["scores"].cpu()[order].tolist()
            picture = draw_bounding_boxes(
                picture, instances["boxes"].cpu()[order],
                labels=[f"{class_names[c]} {s:.2f}" for c, s in zip(labels, scores, strict=True)],
                colors=colours,
            )  # fmt: skip
        self._save(
            Image.fromarray(picture.permute(1, 2, 0).numpy()),
            out / "overlays" / f"{name}_instances.jpg", "JPEG", quality=90,
        )  # fmt: skip

    @staticmethod
    def _save(image: Image.Image, path: Path, fmt: str, **options: Any) -> None:
        """Write atomically: a reader sees the old file or the new one, never a part."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        image.save(tmp, format=fmt, **options)
        os.replace(tmp, path)
