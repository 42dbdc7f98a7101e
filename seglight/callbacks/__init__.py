"""Callbacks used by the default configuration (experiments/defaults.yaml) and the base model, one
module per concern:

- records: the run's record, <run dir>/metrics.json (MetricsSummary);
- checkpoints: where and how checkpoints are written, and the random states that make a resume
  exact (ModelCheckpoint, AtomicCheckpointIO, SafeCheckpoints, rng_states, set_rng_states);
- nonfinite: the stop at a NaN or infinite training loss (NonFiniteLossCheck);
- console: what the terminal shows (RichProgressBar, RichModelSummary);
- wandb: what goes to the loggers, W&B's media mostly (LearningRateMonitor, LogPredictions,
  LogPerClassMetrics);
- predictions: the masks and overlays that `predict` writes (PredictionWriter);
- threads: torch's thread count re-checked on a busy machine while training (ThreadsRecheck).

Every public name is importable from here, as the config files name the callbacks
(`seglight.callbacks.ModelCheckpoint`).
"""

from seglight.callbacks.checkpoints import (
    AtomicCheckpointIO,
    ModelCheckpoint,
    SafeCheckpoints,
    rng_states,
    set_rng_states,
)
from seglight.callbacks.console import RichModelSummary, RichProgressBar
from seglight.callbacks.nonfinite import NonFiniteLossCheck
from seglight.callbacks.predictions import PredictionWriter
from seglight.callbacks.records import EVALUATION_CONFIG_ATTR, MetricsSummary
from seglight.callbacks.threads import ThreadsRecheck
from seglight.callbacks.wandb import LearningRateMonitor, LogPerClassMetrics, LogPredictions

__all__ = [
    "EVALUATION_CONFIG_ATTR",
    "AtomicCheckpointIO",
    "LearningRateMonitor",
    "LogPerClassMetrics",
    "LogPredictions",
    "MetricsSummary",
    "ModelCheckpoint",
    "NonFiniteLossCheck",
    "PredictionWriter",
    "RichModelSummary",
    "RichProgressBar",
    "ThreadsRecheck",
    "SafeCheckpoints",
    "rng_states",
    "set_rng_states",
]
