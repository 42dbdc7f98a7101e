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


def _image_paths(trainer: L.Trainer) -> dict[str, Path]:
    """{sample name: image file} of the predict loaders' datasets (those made of image files:
    a `pairs` list, possibly inside a Subset); empty for generated data."""
    loaders = trainer.predict_dataloaders
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    paths: dict[str, Path] = {}
    for loader in loaders:
        dataset = getattr(loader, "dataset", None)
        while dataset is not None and not hasattr(dataset, "pairs"):
            dataset = getattr(dataset, "dataset", None)
        for pair in getattr(dataset, "pairs", None) or []:
            paths[Path(pair[0]).stem] = Path(pair[0])
    return paths


def _legend(picture: Image.Image, entries: list[tuple[str, tuple[int, int, int]]]) -> Image.Image:
    """`picture` with a white strip below it: a colour swatch and the class name of each entry,
    in rows as wide as the picture."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    pad, swatch, line = 4, 10, 14
    draw = ImageDraw.Draw(picture)
    places, x, y = [], pad, pad
    for name, colour in entries:
        width = swatch + 3 + int(draw.textlength(name, font=font)) + 2 * pad
        if x > pad and x + width > picture.width:
            x, y = pad, y + line
        places.append((x, y, name, colour))
        x += width
    legend = Image.new("RGB", (picture.width, picture.height + y + line + pad), "white")
    legend.paste(picture, (0, 0))
    draw = ImageDraw.Draw(legend)
    top = picture.height
    for x, y, name, colour in places:
        draw.rectangle(
            [x, top + y + 1, x + swatch, top + y + 1 + swatch], fill=colour, outline="black"
        )
        draw.text((x + swatch + 3, top + y), name, fill="black", font=font)
    return legend


class PredictionWriter(BasePredictionWriter):
    """Writes each predicted mask as a palette PNG, <output_dir>/<name>.png, at the image's own
    size (`original_size`; the loader's, with an `image_scale`, otherwise), and the image beside
    its prediction blended over it, <output_dir>/overlays/<name>.jpg (twice the image's width),
    with a legend of the classes in it.

    Each `predict` of a run gets its own folder, <run dir>/predictions_<n> (n as in its config,
    config_predict_<n>.yaml): a second predict never overwrites the first one's masks.

    For instance models (a prediction with "instances"), also each image's instances: an
    instance-id PNG <output_dir>/instances/<name>.png (16-bit, 0 = none, id k = the k-th instance
    by score; higher scores win overlaps) with <name>.json mapping id -> class name (the
    FolderInstances format, so predictions can be read back as data), and an overlay
    <output_dir>/overlays/<name>_instances.jpg (each instance its own colour, box and class label).

    Args:
        output_dir: where to write (default: <run dir>/predictions_<n>, the next number).
        overlays: also write the side-by-side overlays.
        alpha: opacity of the mask's colours in the overlay.
        original_size: masks and overlays at the size of the image files (read from their
            headers; the padding of a batch is cut off either way).
    """

    def __init__(
        self, output_dir: str | None = None, overlays: bool = True, alpha: float = 0.5,
        original_size: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.overlays = overlays
        self.alpha = alpha
        self.original_size = original_size
        self._written = {"masks": 0, "overlays": 0, "instance_images": 0, "detections": 0}
        self._dir: Path | None = None  # this predict's folder
        self._paths: dict[str, Path] = {}
        self.last_written: dict[str, Any] = {}  # `written` at the end of the last predict

    def _out(self, trainer: L.Trainer) -> Path:
        if self._dir is None:
            self._dir = self._folder(trainer)
        return self._dir

    def _folder(self, trainer: L.Trainer) -> Path:
        """output_dir, or <run dir>/predictions_<n>: n of this predict's config file
        (config_predict_<n>.yaml), else the next free number; rank zero's choice (a collective)."""
        if self.output_dir:
            return Path(self.output_dir)
        from seglight.callbacks.records import EVALUATION_CONFIG_ATTR

        run_dir = Path(trainer.default_root_dir)
        config = getattr(trainer, EVALUATION_CONFIG_ATTR, None) or ""
        n = config.removeprefix("config_predict_").removesuffix(".yaml")
        n = int(n) if n.isdigit() else 1
        while (run_dir / f"predictions_{n}").exists():
            n += 1
        return Path(trainer.strategy.broadcast(str(run_dir / f"predictions_{n}")))

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._written = dict.fromkeys(self._written, 0)
        self._dir = None
        self._paths = _image_paths(trainer) if self.original_size else {}
        out = self._out(trainer)
        if self.output_dir and trainer.is_global_zero and any(out.glob("*.png")):
            print(
                f"seglight predict: {out}/ holds earlier predictions: those of the same names are replaced"
            )

    def written(self, trainer: L.Trainer) -> dict[str, Any]:
        """{"predict/masks", "predict/overlays": files written by all ranks, "predict/dir"; for
        an instance model also "predict/detections", the instances found} (a collective: every
        rank calls it)."""
        counts = torch.tensor(list(self._written.values()))
        summed = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        total = dict(zip(self._written, summed, strict=True))
        written = {
            "predict/masks": int(total["masks"]),
            "predict/overlays": int(total["overlays"]),
            "predict/dir": str(self._out(trainer)),
        }
        if total["instance_images"]:
            written["predict/detections"] = int(total["detections"])
        return written

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
        if written.get("predict/detections") == 0:
            print(
                f"seglight predict: no instance detected in any of the {masks} images: every mask "
                "is all background (a model trained too little, or --model.box_score_thresh set "
                "too high)"
            )

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch_indices: Any,
        batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        from seglight.data.base import read_image
        from seglight.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, scaled_size
        from seglight.inference import overlay

        out = self._out(trainer)
        dm = trainer.datamodule
        palette = getattr(dm, "palette", None) or default_palette(pl_module.num_classes)
        flat = [c for rgb in palette for c in rgb]
        preds = prediction["pred"].to(torch.uint8).cpu()
        names = prediction.get("name") or [f"{batch_idx:05d}_{i:03d}" for i in range(len(preds))]
        class_names = list(getattr(pl_module, "class_names", None) or [])
        class_names += [str(c) for c in range(len(class_names), pl_module.num_classes)]
        images = None
        if self.overlays and isinstance(batch, dict) and "image" in batch:
            mean = getattr(dm, "mean", IMAGENET_MEAN)
            std = getattr(dm, "std", IMAGENET_STD)
            images = denormalize(batch["image"][:, :3], mean[:3], std[:3]).cpu()
            colours = torch.tensor(palette, dtype=torch.uint8)
        scale = float(getattr(dm, "image_scale", 1.0) or 1.0)
        for i, (pred, name) in enumerate(zip(preds, names, strict=True)):
            # the image's own size, and the part of the (padded) batch that is the image
            size = self._size(name)
            if size is not None:
                h, w = scaled_size(*size, scale)
                if h > pred.shape[0] or w > pred.shape[1]:  # not the image we think: as it is
                    size, h, w = None, *pred.shape
            else:
                h, w = pred.shape
            pred = pred[:h, :w]
            image = Image.fromarray(pred.numpy(), mode="P")
            image.putpalette(flat)
            if size is not None and size != (h, w):
                image = image.resize((size[1], size[0]), Image.NEAREST)
            self._save(image, out / f"{name}.png", "PNG")
            self._written["masks"] += 1
            if images is not None:
                source = images[i][:, :h, :w]
                labels = torch.from_numpy(np.array(image)).long()
                if size is not None and size != (h, w):
                    source = read_image(self._paths[name])[:3]  # the image at its own size
                # classes beyond the palette (none in practice) wrap around rather than fail
                coloured = colours[labels % len(colours)].permute(2, 0, 1)
                side_by_side = overlay(source, coloured, self.alpha)
                picture = Image.fromarray(side_by_side.permute(1, 2, 0).numpy())
                present = sorted(set(labels.unique().tolist()) & set(range(len(class_names))))
                entries = [(class_names[c], tuple(palette[c % len(palette)])) for c in present]
                picture = _legend(picture, entries)
                self._save(picture, out / "overlays" / f"{name}.jpg", "JPEG", quality=90)
                self._written["overlays"] += 1
            if prediction.get("instances") is not None:
                self._write_instances(
                    out, name, prediction["instances"][i], pl_module.class_names,
                    None if images is None else images[i], (h, w),
                    size if size is not None and size != (h, w) else None,
                )  # fmt: skip

    def _size(self, name: str) -> tuple[int, int] | None:
        """(height, width) of the image file of sample `name`, from its header."""
        path = self._paths.get(name)
        if path is None:
            return None
        try:
            with Image.open(path) as image:
                return image.height, image.width
        except OSError:
            return None

    def _write_instances(
        self, out: Path, name: str, instances: dict[str, torch.Tensor], class_names: list[str],
        image: torch.Tensor | None, valid: tuple[int, int], size: tuple[int, int] | None,
    ) -> None:  # fmt: skip
        """The instance-id PNG (the `valid` top-left part of the batch, resized to `size`), its
        JSON and (with `image`, uint8 [3, H, W]) the overlay."""
        from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

        order = instances["scores"].argsort(descending=True).cpu()
        masks = instances["masks"].cpu()[order].bool()  # [N, H, W]
        self._written["instance_images"] += 1
        self._written["detections"] += len(masks)
        labels = instances["labels"].cpu()[order].tolist()
        ids = np.zeros(masks.shape[-2:], dtype=np.uint16)
        for k in range(len(masks) - 1, -1, -1):  # the best last: it wins overlaps
            ids[masks[k].numpy()] = k + 1
        id_image = Image.fromarray(ids[: valid[0], : valid[1]])
        if size is not None:
            id_image = id_image.resize((size[1], size[0]), Image.NEAREST)
        self._save(id_image, out / "instances" / f"{name}.png", "PNG")
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
