"""Your own data: a folder of images and masks matched by file stem, described by classes.yaml.

Layout under `root`:

    classes.yaml    class names (required), palette, ignore value: see below
    images/         a.jpg b.png ...  (any image format)
    masks/          a.png b.png ...  (same stems)
    splits/         optional: train.txt, val.txt, test.txt, one stem per line

classes.yaml:

    classes: [background, road, car]        # index i in a mask = classes[i]
    palette: [[0, 0, 0], [128, 64, 128], [64, 0, 128]]   # optional; needed for colour masks
    ignore_index: 255                       # optional: the mask value meaning "not labelled"
    ignore_colors: [[255, 255, 255]]        # optional: colours meaning "not labelled"

Masks are either class indices (`mask_format: index`, single-channel PNGs, the default) or
colour-coded (`mask_format: rgb`), converted with the palette once into a cache of index masks
(under $SEGLIGHT_CACHE; a changed mask is converted again). A colour that is in neither the
palette nor ignore_colors is an error naming the file, the colour and its pixel count.

Splits: the files in splits/ if that folder exists (lines may name a stem or a file; blank lines
and # comments are skipped), else a seeded random split of all images into train / val / test
by `val_fraction` and `test_fraction` (the same seed gives the same split on every machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from seglight.data.base import SegmentationDataModule, SegmentationDataset, find_pairs
from seglight.data.camvid import void_to_ignore
from seglight.data.utils import cache_folder, decode_colour_masks
from seglight.errors import ConfigError, DataError

CLASSES_FILE = "classes.yaml"
MASK_FORMATS = ("index", "rgb")


def read_classes_file(path: Path) -> dict[str, Any]:
    """Parse and check classes.yaml -> {"classes", "palette", "ignore_index", "ignore_colors"}."""
    if not path.is_file():
        raise ConfigError(
            f"{str(path)!r} not found: a Folder dataset needs a {CLASSES_FILE} listing its "
            "classes, e.g.\n  classes: [background, road, car]\n  palette: [[0, 0, 0], "
            "[128, 64, 128], [64, 0, 128]]   # optional"
        )
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    unknown = set(spec) - {"classes", "palette", "ignore_index", "ignore_colors"}
    if not isinstance(spec, dict) or unknown:
        raise ConfigError(
            f"{path}: expected the keys classes, palette, ignore_index, ignore_colors; "
            f"got {sorted(unknown) if isinstance(spec, dict) else spec!r}"
        )
    classes = spec.get("classes")
    if not isinstance(classes, list) or not classes or len(classes) > 255:
        raise ConfigError(f"{path}: 'classes' must be a list of 1 to 255 names, got {classes!r}")
    classes = [str(c) for c in classes]
    palette = spec.get("palette")
    if palette is not None:
        ok = isinstance(palette, list) and all(
            isinstance(c, list)
            and len(c) == 3
            and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in palette
        )
        if not ok or len(palette) != len(classes):
            raise ConfigError(
                f"{path}: 'palette' must hold one [r, g, b] (0..255) per class "
                f"({len(classes)}), got {palette!r}"
            )
        if len({tuple(c) for c in palette}) != len(palette):
            raise ConfigError(f"{path}: 'palette' repeats a colour: {palette}")
    ignore_index = spec.get("ignore_index", 255)
    if not isinstance(ignore_index, int) or not len(classes) <= ignore_index <= 255:
        raise ConfigError(
            f"{path}: 'ignore_index' must be a mask value in {len(classes)}..255 (not a class "
            f"index), got {ignore_index!r}"
        )
    ignore_colors = spec.get("ignore_colors") or []
    if not isinstance(ignore_colors, list) or not all(
        isinstance(c, list) and len(c) == 3 for c in ignore_colors
    ):
        raise ConfigError(
            f"{path}: 'ignore_colors' must be a list of [r, g, b], got {ignore_colors!r}"
        )
    clash = {tuple(c) for c in ignore_colors} & {tuple(c) for c in palette or []}
    if clash:
        raise ConfigError(f"{path}: colours {sorted(clash)} are both a class and ignored")
    return {
        "classes": classes,
        "palette": palette,
        "ignore_index": ignore_index,
        "ignore_colors": ignore_colors,
    }


def random_split(
    stems: list[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Shuffle sorted stems with `seed` and cut off val and test parts (each at least one image
    when its fraction is above 0 and enough images remain for training)."""
    order = np.random.default_rng(seed).permutation(len(stems))
    shuffled = [sorted(stems)[i] for i in order]
    n_val = max(round(val_fraction * len(stems)), 1 if val_fraction > 0 else 0)
    n_test = max(round(test_fraction * len(stems)), 1 if test_fraction > 0 else 0)
    if n_val + n_test >= len(stems):
        raise ConfigError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no training "
            f"images out of {len(stems)}"
        )
    return {
        "val": sorted(shuffled[:n_val]),
        "test": sorted(shuffled[n_val : n_val + n_test]),
        "train": sorted(shuffled[n_val + n_test :]),
    }


class Folder(SegmentationDataModule):
    """Your own images/ + masks/ folder, classes from classes.yaml, list-file or random splits.

    Args:
        root: the folder holding classes.yaml, images/, masks/ and optionally splits/.
        mask_format: "index" (single-channel class indices) or "rgb" (colour-coded masks,
            converted with the palette of classes.yaml).
        val_fraction: share of the images for validation when there is no splits/ folder.
        test_fraction: share of the images for testing when there is no splits/ folder.
        seed: seed of the random split.
        crop_size: training crop (H, W); null trains on whole images.
        cache_dir: where converted colour masks go (default: a folder under $SEGLIGHT_CACHE).
        **kwargs: batch size, workers and augmentation: see SegmentationDataModule.
    """

    def __init__(
        self,
        root: str,
        mask_format: str = "index",
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        seed: int = 0,
        crop_size: tuple[int, int] | None = None,
        cache_dir: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(crop_size=crop_size, **kwargs)
        if mask_format not in MASK_FORMATS:
            raise ConfigError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= value < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        self.root = Path(root).expanduser()
        spec = read_classes_file(self.root / CLASSES_FILE)
        if mask_format == "rgb" and spec["palette"] is None:
            raise ConfigError(
                f"mask_format rgb needs a palette in {self.root / CLASSES_FILE}: one [r, g, b] per class"
            )
        # instance attributes: this dataset's classes come from its files
        self.class_names = tuple(spec["classes"])
        self.palette = tuple(tuple(c) for c in spec["palette"] or ())
        self.ignore_colors = [tuple(c) for c in spec["ignore_colors"]]
        self.raw_ignore_index = spec["ignore_index"]
        self.mask_format = mask_format
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.cache_dir = cache_dir
        self.label_map = void_to_ignore(self.raw_ignore_index) if mask_format == "index" else None
        self._pairs: dict[str, list[tuple[Path, Path]]] | None = None
        self.splits = tuple(s for s in ("train", "val", "test") if self._split_stems().get(s))

    def _all_pairs(self) -> list[tuple[Path, Path]]:
        missing = [d for d in ("images", "masks") if not (self.root / d).is_dir()]
        if missing:
            raise DataError(
                f"Folder dataset at {str(self.root)!r}: missing folder(s) {', '.join(missing)} "
                f"(expected {CLASSES_FILE}, images/ and masks/ with files of the same stems)"
            )
        pairs = find_pairs(self.root / "images", self.root / "masks")
        if self.mask_format == "index":
            self._check_single_channel(pairs[0][1])
        return pairs

    def _check_single_channel(self, mask: Path) -> None:
        """A clear message for the common mix-up of colour masks read as class indices."""
        try:
            with Image.open(mask) as im:
                mode = im.mode
        except Exception as e:  # noqa: BLE001 - PIL raises several types for broken files
            raise DataError(f"cannot read mask {str(mask)!r}: {e}") from e
        if mode in ("RGB", "RGBA"):
            raise DataError(
                f"mask {str(mask)!r} is a colour (mode {mode}) image but mask_format is index; "
                "for colour-coded masks set --data.mask_format rgb and give a palette in "
                f"{CLASSES_FILE}"
            )

    def _split_stems(self) -> dict[str, list[str]]:
        split_dir = self.root / "splits"
        if not split_dir.is_dir():
            stems = [image.stem for image, _ in self._all_pairs()]
            return random_split(stems, self.val_fraction, self.test_fraction, self.seed)
        found = {s: split_dir / f"{s}.txt" for s in ("train", "val", "test")}
        if not found["train"].is_file():
            raise DataError(f"{split_dir} exists but has no train.txt (one image stem per line)")
        stems: dict[str, list[str]] = {}
        for split, path in found.items():
            if path.is_file():
                lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
                stems[split] = [
                    Path(line).stem if Path(line).suffix else line for line in lines if line
                ]
        return stems

    def _split_pairs(self) -> dict[str, list[tuple[Path, Path]]]:
        if self._pairs is not None:
            return self._pairs
        pairs = self._all_pairs()
        if self.mask_format == "rgb":
            palette = list(self.palette) + self.ignore_colors
            lut = np.arange(256, dtype=np.uint8)
            lut[len(self.palette) : len(palette)] = 255
            pairs = decode_colour_masks(
                pairs, palette, cache_folder("folder", self.root, self.cache_dir), lut
            )
        by_stem = {image.stem: (image, mask) for image, mask in pairs}
        self._pairs = {}
        for split, stems in self._split_stems().items():
            unknown = [s for s in stems if s not in by_stem]
            if unknown:
                raise DataError(
                    f"{self.root / 'splits' / f'{split}.txt'}: {len(unknown)} name(s) have no image "
                    f"with its mask in images/ and masks/: {', '.join(unknown[:5])}"
                )
            self._pairs[split] = [by_stem[s] for s in stems]
        return self._pairs

    def build_dataset(self, split: str, train: bool) -> SegmentationDataset:
        transform = self.train_transform() if train else self.eval_transform()
        return SegmentationDataset(
            self._split_pairs()[split],
            self.num_classes,
            transform,
            self.label_map,
            self.ignore_index,
        )
