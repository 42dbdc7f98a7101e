"""Shared fixtures: tiny fake datasets in the real on-disk layouts, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# the training methods register in MODELS like the architectures: import them here so that the
# registry-parametrised tests see the same MODELS whatever the order tests import modules in
import seglight.methods  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
CAMVID = Path(os.environ.get("SEGLIGHT_CAMVID", REPO.parent / "shared" / "data" / "camvid"))


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No W&B, seglight's caches in a temporary folder, and a temporary working directory (runs/,
    metrics.json and W&B files of in-process runs never land in the repository), for every test."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("SEGLIGHT_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("SEGLIGHT_RUN_DIR", raising=False)


def camvid_like_mask(h: int, w: int, seed: int, void: int = 11) -> np.ndarray:
    """Vertical bands of classes 0..10 plus a void (11) corner: every class appears."""
    rng = np.random.default_rng(seed)
    bands = np.repeat(rng.permutation(11), int(np.ceil(w / 11)))[:w]
    mask = np.tile(bands, (h, 1)).astype(np.uint8)
    mask[: h // 4, : w // 4] = void
    return mask


def image_from_mask(mask: np.ndarray, seed: int) -> np.ndarray:
    """An RGB image whose colour encodes the class: learnable, and lets a test check alignment."""
    rng = np.random.default_rng(seed)
    colours = (np.arange(256)[:, None] * np.array([23, 71, 113]) % 256).astype(np.uint8)
    noise = rng.integers(-6, 7, size=(*mask.shape, 3))
    return np.clip(colours[mask].astype(int) + noise, 0, 255).astype(np.uint8)


def make_fake_camvid(
    root: Path, counts: dict[str, int] | None = None, size: tuple[int, int] = (24, 32)
) -> Path:
    """The SegNet CamVid layout: train/ trainannot/ val/ valannot/ test/ testannot/.

    train and test images are .jpg, val images .png (CamVid ships PNG, our copy JPEG)."""
    counts = counts or {"train": 6, "val": 5, "test": 3}
    for split, n in counts.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            stem = f"0001TP_{split}_{i:04d}"
            seed = zlib.crc32(f"{split}/{i}".encode())  # hash() differs per process
            mask = camvid_like_mask(*size, seed)
            ext = ".png" if split == "val" else ".jpg"
            Image.fromarray(image_from_mask(mask, seed)).save(
                root / split / f"{stem}{ext}", quality=98
            )
            Image.fromarray(mask, mode="L").save(root / f"{split}annot" / f"{stem}.png")
    return root


@pytest.fixture
def fake_camvid(tmp_path) -> Path:
    return make_fake_camvid(tmp_path / "camvid")


def run_cli(
    args: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout: int = 600
):
    """`python -m seglight ARGS` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "seglight", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"seglight {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc
