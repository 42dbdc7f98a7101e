"""The run's record: <run dir>/metrics.json, which MetricsSummary writes after each validation,
test and predict (the training's record, then one entry per evaluation) and which
`seglight compare` and the end-of-fit summary read back."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from seglight.callbacks._common import TrainMeans, _scalar
from seglight.callbacks.checkpoints import best_metric
from seglight.utils import atomic_write_json, git_revision


class MetricsSummary(L.Callback):
    """Writes <run dir>/metrics.json after each validation and test and at the end of training
    (rank zero):

    {"model": ..., "data": ..., "params": ..., "git": {...}, "val": {metric: value}, "best_val":
    {... of the validation with the best value of the metric that chooses the best checkpoint,
    "epoch", "step", "monitor": that metric (val/mIoU; val/mask_mAP for instance models; see
    seglight.callbacks.checkpoints.best_metric)}, "epoch": ..., "step": ...,
    "history": [{"epoch", "step", "mIoU", "acc", "mAcc", "loss", "wall_s", "train", and every
    other summary metric of the validation (not per class: "mask_mAP", "mask_mAP50", ... for
    instance models)} for each validation; wall_s: seconds since the fit started, sanity check
    included, continued across a resume; train: {name: mean} of every scalar train/<name> the
    model logs per step (the loss, a method's loss parts, confident fraction, discriminator
    accuracy, ...) over the training steps since the previous validation, i.e. the epoch's means
    with one validation per epoch],
    "throughput": {"train_images_per_s", "train_images", "train_seconds"},
    "memory": {"activations_mb", "batch_size", "peak_cuda_mb"}, "class_names": [...],
    "evaluations": [{"stage", "checkpoint", "checkpoint_epoch", "checkpoint_step", "inference",
    "config", "time", "metrics"} for each validate / test / predict]}

    Only `fit` writes the training record (val, best_val, epoch, step, history); `validate`,
    `test` and `predict` append to "evaluations" and never change it (their config is saved as
    config_<stage>_<n>.yaml beside the fit's config.yaml).

    When `max_steps` ends a fit between two validations (mid-epoch), a last validation runs
    after the last step (Lightning's validation before a requested stop), so that the record and
    the best checkpoint include the final weights.

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
        self._train = TrainMeans()  # the train/* means of the history's next point

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
        if 0 < trainer.max_steps <= trainer.global_step and not trainer.should_stop:
            # max_steps ends the fit, perhaps mid-epoch: Lightning validates before a requested
            # stop, so the record and the best checkpoint see the final weights too
            trainer.should_stop = True
        self._end_activation_count()
        if trainer.is_global_zero:
            self._train.update(trainer)
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
            metric, mode = best_metric(trainer, pl_module)
            if _better(values, summary.get("best_val") or {}, metric, mode):
                summary["best_val"] = {**values, "epoch": epoch, "step": step, "monitor": metric}
            if trainer.state.fn == "fit":
                point = {k: values.get(k) for k in ("mIoU", "acc", "mAcc", "loss")}
                # and every other summary metric (mask_mAP, mask_mAP50, ...): not per class
                point.update((k, v) for k, v in values.items() if "/" not in k)
                if self._wall_start is not None:  # seconds since the fit started
                    wall = self._wall_offset + time.perf_counter() - self._wall_start
                    point["wall_s"] = round(wall, 2)
                train = self._train.pop()
                if train:
                    point["train"] = train
                # a resumed run may validate a step again: one point per step
                history = [h for h in summary.get("history", []) if h.get("step") != step]
                summary["history"] = [*history, {**point, "epoch": epoch, "step": step}]
        self._save(trainer, pl_module, summary)

    def state_dict(self) -> dict[str, Any]:
        return {"train_means": self._train.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train.load_state_dict(state_dict.get("train_means") or {})

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._checkpoint = {k: checkpoint.get(k) for k in ("epoch", "global_step")}
        if trainer.state.fn != "fit":  # an evaluation's metrics are plotted at that step
            for logger in trainer.loggers:
                if hasattr(logger, "evaluation_step"):
                    logger.evaluation_step = checkpoint.get("global_step")

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


def _better(values: dict[str, Any], best: dict[str, Any], metric: str, mode: str) -> bool:
    """Whether a validation's `values` beat `best` (best_val) on `metric` ("val/mask_mAP"):
    strictly, as ModelCheckpoint decides, so that on a tie the first stays the best and best_val
    describes the best checkpoint. A best_val chosen on another metric (or written before
    best_val named its metric: val/mIoU) is replaced."""
    key = metric.removeprefix("val/")
    current = values.get(key)
    if current is None:
        return False
    previous = best.get(key) if best.get("monitor", "val/mIoU") == metric else None
    if previous is None:
        return True
    return current > previous if mode == "max" else current < previous


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
