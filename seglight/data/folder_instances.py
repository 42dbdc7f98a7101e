"""Your own instance data: images and instance-id images matched by file stem, classes.yaml.

Layout under `root`:

    classes.yaml      classes: [background, cell, ...] and instance_class: cell (optional)
    images/           a.jpg b.png ...  (any image format)
    instances/        a.png b.png ...  (same stems): 8- or 16-bit instance ids, 0 = no instance
    instances/a.json  optional, per image: {"1": "cell", "2": "nucleus"} (id -> class name)
    splits/           optional: train.txt, val.txt, test.txt, one stem per line

classes.yaml lists the classes, class 0 being the background (no instance is of that class), and
optionally `instance_class`, the class of every instance of an image without its own JSON; an
image with a JSON takes every id's class from it. `palette` is optional, as for Folder.

The semantic mask (for val/mIoU) is each pixel's instance class, background where the id is 0.
Splits: as Folder (splits/ lists, else a seeded random split by val_fraction / test_fraction).

Bad input is an error naming the file, before training (`check_masks`, the default) or when the
file is read: an instance image whose size differs from its image's, a colour (RGB) instance
image, an id in the image that its JSON does not map (or no JSON and no instance_class), a class
name that is not in classes.yaml or is the background, a JSON id above 255 for an 8-bit image
(an 8-bit PNG holds at most 255 instances: save more as a 16-bit PNG, mode I;16). An all-zero
instance image is allowed: an image without instances (all background); but `fit` stops when an
instance class has no instance in the whole training split (unless allow_empty_classes: true).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from seglight.data.base import check_all, find_pairs, image_size
from seglight.data.folder import CLASSES_FILE, Folder
from seglight.data.instances import InstanceData, InstanceDataset, masks_from_ids
from seglight.errors import ConfigError, DataError

INSTANCE_EXTENSIONS = (".png", ".tif", ".tiff")


def read_instance_image(
    path: Path,
    height: int,
    width: int,
    class_names: tuple[str, ...],
    instance_class: str | None,
) -> tuple[np.ndarray, dict[int, int]]:
    """An instance-id image and its classes -> (ids int64 [H, W], id -> class index).

    The classes come from `path` with the suffix .json if it exists, else `instance_class`.
    Raises DataError for the bad inputs listed in the module docstring."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("L", "P", "I;16", "I;16B", "I"):
                raise DataError(
                    f"instance image {str(path)!r} is a {mode} image; expected single-channel "
                    "8- or 16-bit instance ids (0 = no instance)"
                )
            ids = np.array(im).astype(np.int64)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises several types for broken files
        raise DataError(f"cannot read instance image {str(path)!r}: {e}") from e
    if ids.shape != (height, width):
        raise DataError(
            f"instance image {str(path)!r} is {ids.shape[0]}x{ids.shape[1]} but its image is "
            f"{height}x{width}"
        )
    present = [int(i) for i in np.unique(ids) if i != 0]
    index = {name: k for k, name in enumerate(class_names)}
    spec = path.with_suffix(".json")
    if spec.is_file():
        try:
            raw = json.loads(spec.read_text())
            mapping = {int(k): v for k, v in raw.items()}
        except (OSError, ValueError, AttributeError) as e:
            raise DataError(
                f"{str(spec)!r}: expected a JSON object mapping instance ids to class names, "
                f'e.g. {{"1": "{class_names[-1]}"}}: {e}'
            ) from e
        if mode in ("L", "P") and any(i > 255 for i in mapping):
            raise DataError(
                f"{str(spec)!r} maps ids above 255 but {str(path)!r} is an 8-bit image (ids "
                "1..255 only): save images with more than 255 instances as 16-bit PNGs (mode I;16)"
            )
        where = str(spec)
    elif present and instance_class is None:
        raise DataError(
            f"instance image {str(path)!r} has instances but neither {spec.name} nor "
            f"`instance_class` in {CLASSES_FILE} gives their class"
        )
    else:
        mapping = dict.fromkeys(present, instance_class)
        where = f"instance_class in {CLASSES_FILE}"
    unmapped = [i for i in present if i not in mapping]
    if unmapped:
        raise DataError(
            f"instance image {str(path)!r}: ids {unmapped[:10]} have no class in {where}"
        )
    bad = sorted({str(c) for c in mapping.values() if c not in index or index[c] == 0})
    if bad:
        raise DataError(
            f"{where}: class(es) {bad} are not instance classes of {CLASSES_FILE} "
            f"({', '.join(class_names[1:])}; class 0, {class_names[0]}, is the background)"
        )
    return ids, {i: index[mapping[i]] for i in present}


class _FolderInstanceDataset(InstanceDataset):
    """Reads each instance-id image once: the semantic mask and the instances come from it."""

    def __init__(
        self, pairs, num_classes, transform, class_names, instance_class, ignore_index=255
    ) -> None:
        super().__init__(pairs, num_classes, transform, None, None, ignore_index)
        self.class_names = class_names
        self.instance_class = instance_class

    def load_instances(self, index: int) -> tuple[torch.Tensor, ...]:
        from seglight.data.base import read_image

        image_path, ids_path = self.pairs[index]
        image = read_image(image_path)
        ids, label_of = read_instance_image(
            ids_path, *image.shape[-2:], self.class_names, self.instance_class
        )
        lut = np.zeros(int(ids.max()) + 1, dtype=np.uint8)
        for i, label in label_of.items():
            lut[i] = label
        masks, labels = masks_from_ids(ids, label_of)
        return image, torch.from_numpy(lut[ids]), masks, labels


class FolderInstances(InstanceData, Folder):
    """Your own instance data: images/, 8/16-bit instance-id images/, classes.yaml.

    See the module docstring for the layout, the class rules and the errors.

    Args:
        root: the folder holding classes.yaml, images/, instances/ and optionally splits/.
        val_fraction: share of the images for validation when there is no splits/ folder.
        test_fraction: share of the images for testing when there is no splits/ folder.
        seed: seed of the random split.
        crop_size: training crop (H, W); null trains on whole images.
        **kwargs: batch size, workers and augmentation: see SegmentationDataModule.
    """

    extra_class_keys = ("instance_class",)

    def __init__(
        self,
        root: str,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        seed: int = 0,
        crop_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            crop_size=crop_size,
            **kwargs,
        )
        if self.mask_format != "index":
            raise ConfigError(
                "FolderInstances reads instance-id images: mask_format does not apply"
            )
        path = self.root / CLASSES_FILE  # (classes.yaml lists 2 classes or more: Folder's check)
        classes, instance_class = self.class_spec["classes"], self.class_spec["instance_class"]
        if instance_class is not None and instance_class not in classes[1:]:
            raise ConfigError(
                f"{path}: instance_class {instance_class!r} is not one of the instance classes "
                f"{classes[1:]} (class 0 is the background)"
            )
        self.instance_class = instance_class
        self.label_map = None  # the semantic mask comes from the ids (_FolderInstanceDataset)

    def _all_pairs(self) -> list[tuple[Path, Path]]:
        missing = [d for d in ("images", "instances") if not (self.root / d).is_dir()]
        if missing:
            raise DataError(
                f"FolderInstances dataset at {str(self.root)!r}: missing folder(s) "
                f"{', '.join(missing)} (expected {CLASSES_FILE}, images/ and instances/ with "
                "instance-id images of the same stems)"
            )
        return find_pairs(
            self.root / "images", self.root / "instances", mask_exts=INSTANCE_EXTENSIONS
        )

    def build_dataset(self, split: str, train: bool) -> InstanceDataset:
        transform = self.train_transform() if train else self.eval_transform()
        return _FolderInstanceDataset(
            self._split_pairs()[split],
            self.num_classes,
            transform,
            self.class_names,
            self.instance_class,
            self.ignore_index,
        )

    def verify(self, dataset: Any, split: str) -> None:
        """Read every instance image (and JSON) once and list every bad file; when fitting, an
        instance class without any instance in the training split is an error (as a class
        without pixels is for Folder), unless allow_empty_classes."""
        found: list[dict[int, int]] = []  # id -> class of each image (list.append: thread-safe)

        def check(pair: tuple[Path, Path]) -> str | None:
            image_path, ids_path = pair
            try:
                width, height = image_size(image_path)  # the header, and a cut-off file
                _, label_of = read_instance_image(
                    ids_path, height, width, self.class_names, self.instance_class
                )
            except DataError as e:
                return str(e)
            except Exception as e:  # noqa: BLE001
                return f"cannot read image {str(image_path)!r}: {e}"
            found.append(label_of)
            return None

        check_all(check, dataset.pairs, f"FolderInstances {split} instance images are invalid")
        fitting = self.trainer is not None and self.trainer.state.fn == "fit"
        if split != "train" or not fitting or self.allow_empty_classes:
            return
        counts = np.bincount(
            [c for label_of in found for c in label_of.values()], minlength=self.num_classes
        )
        empty = [
            f"{k} ({self.class_names[k]})" for k in range(1, self.num_classes) if not counts[k]
        ]
        if empty:
            images = sum(1 for label_of in found if label_of)
            raise DataError(
                f"FolderInstances train: {len(empty)} instance class(es) {', '.join(empty)} have "
                f"no instance in the {len(dataset.pairs)} instance images of the training split "
                f"under {str(self.root / 'instances')!r} ({images} hold any instance; ids 0 are "
                "background), so the model cannot learn them. To train anyway, set "
                "allow_empty_classes: true."
            )
