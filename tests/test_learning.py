"""Learning quality: real recipes, trained for real, must reach a floor well above chance.

The quickstart fell from 81.5% to 48% val mIoU and every other test stayed green (issue 23): a
change to init, data, augmentation, losses or the training step can change what a model learns
without breaking any contract. These tests train and read the validation mIoU:

- the quickstart's recipe for 300 steps (about a minute at 1 thread): floor 48%. Measured on
  the 2-core machine at seeds 0, 1, 2: 58.6 / 53.8 / 65.3% with the paper's U-Net init, and
  30.8 / 42.1 / 28.7% with the init that broke it (PyTorch's default for the classifier, fan-out
  elsewhere): the floor sits between them at every seed, this test runs seed 0;
- the full quickstart (`slow`): the 80% its README promises, at 1 thread;
- the CPU-scale CamVid protocol's supervised DDRNet on all 367 labels for 200 steps, where the real
  data is present (skipped otherwise): floor 20% (24.1% measured; chance is ~5%).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CAMVID, REPO

from seglight.cli import run

QUICKSTART = REPO / "experiments" / "quickstart.yaml"


def best_miou(args: list[str], out: Path) -> tuple[float, list[float]]:
    """Fit with `args` into `out`; the best val mIoU and the curve (percent) from metrics.json."""
    run(
        [
            "fit", *args, "--threads", "1", "--trainer.default_root_dir", str(out),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    history = json.loads((out / "metrics.json").read_text())["history"]
    curve = [round(100 * h["mIoU"], 1) for h in history]
    return max(curve) / 100, curve


def test_the_quickstart_recipe_learns_in_300_steps(tmp_path):
    best, curve = best_miou(
        [
            "--config", str(QUICKSTART), "--seed_everything", "0",
            "--trainer.max_epochs", "-1", "--trainer.max_steps", "300",
            "--data.num_val", "32",
        ],
        tmp_path / "run",
    )  # fmt: skip
    assert best >= 0.48, (
        f"the quickstart's U-Net reached {best:.1%} val mIoU in 300 steps (curve {curve}); it "
        "reached 58.6% when this test was written and 30.8% with the init that broke it: "
        "something now makes it learn worse"
    )


@pytest.mark.slow
def test_the_quickstart_reaches_the_readme_promise(tmp_path):
    best, curve = best_miou(
        ["--config", str(QUICKSTART), "--seed_everything", "0"], tmp_path / "run"
    )
    assert best >= 0.80, f"the quickstart reached {best:.1%} val mIoU (curve {curve})"


@pytest.mark.skipif(not (CAMVID / "train").is_dir(), reason=f"no CamVid at {CAMVID}")
def test_the_camvid_protocol_learns_in_200_steps(tmp_path):
    best, curve = best_miou(
        [
            "--config", str(REPO / "experiments" / "semi" / "supervised.yaml"),
            "--config", str(REPO / "experiments" / "cpu" / "camvid_quarter.yaml"),
            "--model", "DDRNet", "--data.root", str(CAMVID),
            "--data.init_args.labeled", "1.0", "--seed_everything", "0",
            "--trainer.max_steps", "200", "--trainer.val_check_interval", "200",
        ],
        tmp_path / "run",
    )  # fmt: skip
    assert best >= 0.20, f"DDRNet on quarter-size CamVid reached {best:.1%} (curve {curve})"
