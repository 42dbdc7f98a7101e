"""A diverged model is never saved: a NaN or infinite model state (BatchNorm's running variances
overflow while the training loss is still finite) or validation loss stops the run before that
model is validated, recorded or checkpointed, and the message says so truly."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO
from test_resume_epoch_end import make_binary_folder

from seglight.callbacks import NonFiniteLossCheck
from seglight.cli import main
from seglight.errors import DivergenceError


def test_a_diverged_state_stops_fit_before_anything_is_saved(tmp_path, capsys):
    """The membranes setup at --model.lr 1e6: the training loss stays finite for a while, the
    BatchNorm running variances do not."""
    root = make_binary_folder(tmp_path / "data", n=18)
    (tmp_path / "run.yaml").write_text(
        f"""\
model: {{class_path: UNet, init_args: {{encoder: original, base_channels: 4, lr: 1.0e6}}}}
data:
  class_path: Folder
  init_args: {{root: {root}, mask_format: binary, crop_size: [16, 24], batch_size: 4,
              num_workers: 0}}
trainer: {{max_epochs: 4, accelerator: cpu, logger: false, enable_progress_bar: false,
          enable_model_summary: false}}
threads: 1
"""
    )
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(REPO / "experiments" / "quickstart.yaml"),
              "--config", str(tmp_path / "run.yaml"), "--trainer.default_root_dir", str(run_dir)])  # fmt: skip
    assert stop.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "NaN or infinite" in error[0], error
    assert "no checkpoint of the diverged model was written" in error[0]
    for path in (run_dir / "checkpoints").glob("*.ckpt"):  # none, or only finite ones
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), path
    metrics = run_dir / "metrics.json"
    history = json.loads(metrics.read_text()).get("history", []) if metrics.exists() else []
    assert all(point["loss"] is not None for point in history), history


def fake_trainer(**metrics: float) -> SimpleNamespace:
    return SimpleNamespace(
        state=SimpleNamespace(fn="fit"), sanity_checking=False, global_step=8, current_epoch=1,
        log_every_n_steps=10,
        callback_metrics={k.replace("_", "/"): torch.tensor(v) for k, v in metrics.items()},
    )  # fmt: skip


def test_a_non_finite_validation_loss_or_checkpoint_tensor_stops_the_run():
    check = NonFiniteLossCheck()
    check.on_validation_end(fake_trainer(val_loss=0.5), None)  # finite: nothing happens
    with pytest.raises(DivergenceError, match=r"validation loss was nan after training step 8"):
        check.on_validation_end(fake_trainer(val_loss=float("nan")), None)
    checkpoint = {
        "state_dict": {"w": torch.ones(3), "bn.num_batches_tracked": torch.tensor(4)},
        "optimizer_states": [{"state": {0: {"exp_avg_sq": torch.tensor([1.0, float("inf")])}}}],
    }
    with pytest.raises(DivergenceError, match=r"1 tensor\(s\) in the checkpoint.*exp_avg_sq"):
        check.on_save_checkpoint(fake_trainer(), None, checkpoint)
