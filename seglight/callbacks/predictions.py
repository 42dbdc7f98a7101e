"""What `predict` writes: PredictionWriter's palette PNG masks and overlays, and for instance
models each image's instance-id PNG with its class names and an instance overlay."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from seglight.utils import atomic_write_json, default_palette


def _instance_colour(k: int) -> tuple[int, int, int]:
    """A distinct, saturated colour for the k-th instance (golden-ratio hue steps)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


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
