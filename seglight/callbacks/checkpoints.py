"""Checkpoints: where they go (ModelCheckpoint: <run dir>/checkpoints, last.ckpt rewritten at
every validation), how they are written (AtomicCheckpointIO: atomically) and what makes resuming
from one exact (SafeCheckpoints: every rank's random states, saved and restored with rng_states and
set_rng_states, and the training loader's position)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from seglight.utils import atomic_open, remove_stale_temporaries

#: `monitor: auto`: the model's own validation metric (SegmentationModel.checkpoint_monitor)
AUTO = "auto"
#: what a model that declares no metric is chosen on
DEFAULT_MONITOR = ("val/mIoU", "max")


def model_monitor(pl_module: L.LightningModule) -> tuple[str, str]:
    """The validation metric a model declares to choose its best checkpoint on, and its mode
    ("max" or "min"): val/mIoU (max) unless the model says otherwise (Mask R-CNN: val/mask_mAP)."""
    return tuple(getattr(pl_module, "checkpoint_monitor", DEFAULT_MONITOR))  # type: ignore[return-value]


def best_metric(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[str, str]:
    """The metric that chooses the run's best checkpoint, and its mode: the checkpoint callback's
    monitor when it is a validation metric, else the model's own (model_monitor). metrics.json's
    best_val and the end-of-fit summary follow it."""
    callback = trainer.checkpoint_callback
    monitor = getattr(callback, "monitor", None)
    if isinstance(monitor, str) and monitor.startswith("val/"):
        return monitor, callback.mode  # type: ignore[union-attr]
    return model_monitor(pl_module)


class ModelCheckpoint(_ModelCheckpoint):
    """Lightning's ModelCheckpoint, saving to <run dir>/checkpoints by default (so that
    `--ckpt_path last` finds the run's last.ckpt whatever logger is used), and with `save_last`
    rewriting last.ckpt after every validation (or training epoch, when there is no validation),
    whether the monitored metric improved or not: last.ckpt always holds the latest state, for
    `--ckpt_path last`. (Lightning 2.6 rewrites it only when a top-k checkpoint was saved at the
    same step, i.e. only on improvement; tests/test_resume.py pins the behaviour we rely on.)

    When last.ckpt would hold the state just saved as a top-k checkpoint (a validation that
    improved), it is a hard link to that file rather than a second copy (one file on the disk,
    two names; U-Net R34's is about 280 MB): written atomically like every checkpoint, later
    rewrites of last.ckpt replace the name, never the best checkpoint's content. (Only with
    AtomicCheckpointIO, which never writes into an existing file, and on filesystems with hard
    links; a copy is written otherwise.)

    `monitor: auto` (experiments/defaults.yaml) monitors the model's own metric
    (SegmentationModel.checkpoint_monitor: val/mIoU, max; val/mask_mAP, max for instance models),
    resolved when the Trainer sets the callback up; `mode` then defaults to the model's, and
    `filename` to epochNNN-<metric><value> (epoch012-miou0.6512.ckpt,
    epoch012-mask_map0.4230.ckpt). An explicit monitor keeps Lightning's defaults (mode "min",
    filename epoch=N-step=M)."""

    def __init__(
        self,
        monitor: str | None = None,
        mode: str | None = None,
        filename: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._auto = monitor == AUTO
        self._auto_mode = mode is None
        self._auto_filename = filename is None and self._auto
        # until setup, an auto monitor stands as the default one (Lightning checks top-k with it)
        super().__init__(
            monitor=DEFAULT_MONITOR[0] if self._auto else monitor,
            mode=mode or (DEFAULT_MONITOR[1] if self._auto else "min"),
            filename=filename,
            **kwargs,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        if self._auto:
            metric, mode = model_monitor(pl_module)
            self.monitor = metric
            if self._auto_mode:
                self.mode = mode
                self.kth_value = torch.tensor(-torch.inf if mode == "max" else torch.inf)
            if self._auto_filename:
                tag = metric.rsplit("/", 1)[-1].lower()
                self.filename = f"epoch{{epoch:03d}}-{tag}{{{metric}:.4f}}"
                self.auto_insert_metric_name = False  # its "/" would make a folder
        super().setup(trainer, pl_module, stage)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning's, with the recorded checkpoints looked up in this run's checkpoint folder
        by name (relocated): a run folder moved or copied elsewhere keeps its best score and its
        best, top-k and last checkpoints; a checkpoint whose best is not there (a new run from
        another run's checkpoint) reloads no path. Lightning alone would forget the best score
        of a moved run and keep best_model_path naming the original run's file."""
        super().load_state_dict(relocated(state_dict, self.dirpath))

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

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        saved = self._last_checkpoint_saved  # a top-k checkpoint written at this very step
        if (
            self.save_last is not True
            or not saved
            or self._last_global_step_saved != trainer.global_step
            or not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
            or not _is_local_file_protocol(saved)
        ):
            super()._save_last_checkpoint(trainer, monitor_candidates)
            return
        filepath = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        if os.path.abspath(filepath) == os.path.abspath(saved):
            return
        linked = False
        if trainer.is_global_zero:
            linked = _hard_link(saved, filepath)
        if not trainer.strategy.broadcast(linked):  # no hard links here: a copy, as Lightning
            super()._save_last_checkpoint(trainer, monitor_candidates)
            return
        previous, self.last_model_path = self.last_model_path, filepath
        trainer.strategy.barrier()
        if previous and self._should_remove_checkpoint(trainer, previous, filepath):
            self._remove_checkpoint(trainer, previous)


def _hard_link(target: str, path: str) -> bool:
    """Make `path` a second name of `target`'s file, atomically (a temporary link beside it,
    renamed over it); False where the filesystem has no hard links."""
    tmp = f"{os.path.dirname(path) or '.'}/.{os.path.basename(path)}.link.tmp"
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.link(target, tmp)
        os.replace(tmp, path)
    except OSError:
        if os.path.lexists(tmp):
            os.remove(tmp)
        return False
    return True


def relocated(state: dict[str, Any], dirpath: str | None) -> dict[str, Any]:
    """ModelCheckpoint's state with its paths in `dirpath` (the checkpoint folder of the run
    resuming), when the state was written in another folder: each recorded file by its name
    there, dropped where it is not there; unchanged if the best checkpoint is not there."""
    old = state.get("dirpath")
    if not dirpath or not old or old == dirpath:
        return state

    def local(path: str | None) -> str:
        here = Path(dirpath) / Path(path).name if path else None
        return str(here) if here is not None and here.is_file() else ""

    best = local(state.get("best_model_path"))
    if not best:  # not a copy of this run: nothing of another folder is kept
        return {**state, "best_model_path": ""}
    top_k = {local(p): v for p, v in (state.get("best_k_models") or {}).items() if local(p)}
    return {
        **state, "dirpath": dirpath, "best_model_path": best, "best_k_models": top_k,
        "kth_best_model_path": local(state.get("kth_best_model_path")),
        "last_model_path": local(state.get("last_model_path")),
    }  # fmt: skip


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
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        settle_epoch_end(fit_loop)
        self._loader_states = fit_loop.get("state_dict", {}).get("combined_loader")

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


def settle_epoch_end(fit_loop: dict[str, Any]) -> None:
    """Make the fit loop's state of a checkpoint written in `on_train_epoch_end`
    (ModelCheckpoint's default; the epoch counted `processed`, not yet `completed`) resume as
    the uninterrupted run continued, in place:

    - the epoch ran to its last batch: it becomes the state at the next epoch's start (the
      epoch completed, the batch counters at zero), so training resumes at the next epoch's
      first batch;
    - the epoch was cut short (`max_steps` reached mid-epoch, then the run extended): it is not
      counted processed, so training resumes at its next batch, as from a mid-epoch checkpoint.

    Lightning resumes such checkpoints by running the epoch's end again when training is
    iteration-based (`max_steps` set: its loops then always "restart"), counting the epoch
    `processed` twice: every later epoch gave its samplers an epoch one ahead of the Trainer's
    (another order and augmentation than the uninterrupted run's).
    """
    epochs = fit_loop.get("epoch_progress")
    batches = fit_loop.get("epoch_loop.batch_progress")
    if not epochs or not batches:
        return
    total = epochs["total"]
    if not total["ready"] == total["started"] == total["processed"] == total["completed"] + 1:
        return  # not written in on_train_epoch_end
    if not batches.get("is_last_batch"):  # cut short: unfinished, at its next batch
        for counts in (epochs["total"], epochs["current"]):
            counts["processed"] = counts["completed"]
        return
    for counts in (epochs["total"], epochs["current"]):
        counts["completed"] = counts["processed"]

    def zero(progress: dict[str, Any] | None, *parts: str) -> None:
        for part in parts:
            for key in (progress or {}).get(part, {}):
                progress[part][key] = 0

    # what the epoch loop's reset does at an epoch's start (the totals keep counting)
    batches["is_last_batch"] = False
    zero(batches, "current")
    zero(fit_loop.get("epoch_loop.scheduler_progress"), "current")
    optim = fit_loop.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer")
    for progress in (optim or {}).values():
        zero(progress, "current")
    val = fit_loop.get("epoch_loop.val_loop.batch_progress")
    zero(val, "current", "total")
    if val is not None:
        val["is_last_batch"] = False


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
