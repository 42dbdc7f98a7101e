"""A tiny FolderInstances dataset in its real layout: images drawn from their instance-id images
(one colour per id, conftest.image_from_mask), so a test can read each instance back from the
pixels of any augmented image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from conftest import image_from_mask
from PIL import Image

CLASSES = ["background", "cell", "nucleus"]


def instance_ids(h: int, w: int, seed: int, n: int = 4) -> tuple[np.ndarray, dict[int, str]]:
    """An id image [h, w] of `n` non-overlapping rectangles with ids 1..n (class by parity)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((h, w), np.int64)
    classes = {}
    for k in range(1, n + 1):
        top, left = int(rng.integers(0, h - 6)), int(rng.integers(0, w - 6))
        bh, bw = int(rng.integers(4, max(5, h // 2))), int(rng.integers(4, max(5, w // 2)))
        ids[top : top + bh, left : left + bw] = k  # later ones cover earlier ones in part
        classes[k] = CLASSES[1 + k % 2]
    present = {int(i) for i in np.unique(ids)} - {0}
    return ids, {k: c for k, c in classes.items() if k in present}


def make_folder_instances(
    root: Path,
    n: int = 4,
    size: tuple[int, int] = (32, 40),
    bits: int = 8,
    per_image_json: bool = True,
    splits: dict[str, list[int]] | None = None,
    instances_per_image: int = 4,
) -> dict[str, tuple[np.ndarray, dict[int, str]]]:
    """root/classes.yaml, images/*.png, instances/*.png (+ *.json with per_image_json, else
    instance_class: cell and every instance a cell); 16-bit ids are 1001, 1002, ... Returns
    stem -> (ids, id -> class name)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "instances").mkdir(parents=True, exist_ok=True)
    spec: dict = {"classes": CLASSES}
    if not per_image_json:
        spec["instance_class"] = "cell"
    (root / "classes.yaml").write_text(yaml.safe_dump(spec))
    expected = {}
    for k in range(n):
        stem = f"img{k:03d}"
        ids, classes = instance_ids(*size, seed=k, n=instances_per_image)
        if bits == 16:  # ids an 8-bit file cannot hold
            ids = np.where(ids > 0, ids + 1000, 0)
            classes = {i + 1000: c for i, c in classes.items()}
        if not per_image_json:
            classes = dict.fromkeys(classes, "cell")
        Image.fromarray(image_from_mask((ids % 256).astype(np.uint8), k)).save(
            root / "images" / f"{stem}.png"
        )
        dtype = np.uint8 if bits == 8 else np.uint16
        Image.fromarray(ids.astype(dtype)).save(root / "instances" / f"{stem}.png")
        if per_image_json:
            (root / "instances" / f"{stem}.json").write_text(
                json.dumps({str(i): c for i, c in classes.items()})
            )
        expected[stem] = (ids, classes)
    if splits:
        (root / "splits").mkdir(exist_ok=True)
        for split, members in splits.items():
            (root / "splits" / f"{split}.txt").write_text("".join(f"img{k:03d}\n" for k in members))
    return expected
