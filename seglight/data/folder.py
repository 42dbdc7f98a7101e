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

Masks are either class indices (`mask_format: index`, single-channel PNGs, the default),
binary (`mask_format: binary`: two classes, 0 is class 0 and 1 or 255 is class 1), or
colour-coded (`mask_format: rgb`), converted with the palette once into a cache of index masks
(under $SEGLIGHT_CACHE; a changed mask is converted again). A colour that is in neither the
palette nor ignore_colors is an error naming the file, the colour and its pixel count.

Index masks: value i is class i, the `ignore_index` of classes.yaml (255 unless given) is
"not labelled", and `value_map` maps other raw values to classes (e.g. `{255: 1}` for 0/255
binary masks). Any other value is an error naming the file: with `ignore_index: 0`, a raw 255
is an error, not silently ignored. A class with no pixels in the training split stops `fit`.

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

from seglight.data.base import (
    INVALID,
    SegmentationDataModule,
    SegmentationDataset,
    find_pairs,
)
from seglight.data.utils import cache_folder, decode_colour_masks
from seglight.errors import ConfigError, DataError

CLASSES_FILE = "classes.yaml"
MASK_FORMATS = ("index", "binary", "rgb")


def index_lut(
    num_classes: int,
    raw_ignore: int | None,
    value_map: dict[int, int] | None = None,
    ignore_index: int = 255,
) -> np.ndarray:
    """The lookup table of index masks: raw value i < num_classes -> class i, `raw_ignore` ->
    ignore_index, `value_map` raw -> class; every other raw value INVALID (an error if found)."""
    lut = np.full(256, INVALID, dtype=np.int16)
    lut[:num_classes] = np.arange(num_classes)
    if raw_ignore is not None:
        lut[raw_ignore] = ignore_index
    for raw, cls in (value_map or {}).items():
        lut[raw] = cls
    return lut


def read_classes_file(path: Path, extra_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Parse and check classes.yaml -> {"classes", "palette", "ignore_index", "ignore_colors"},
    plus the `extra_keys` a subclass's format adds (unchecked, None when absent)."""
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
    keys = ("classes", "palette", "ignore_index", "ignore_colors", *extra_keys)
    unknown = set(spec) - set(keys) if isinstance(spec, dict) else set()
    if not isinstance(spec, dict) or unknown:
        raise ConfigError(
            f"{path}: expected the keys {', '.join(keys)}; "
            f"got {sorted(unknown) if isinstance(spec, dict) else spec!r}"
        )
    classes = spec.get("classes")
    if not isinstance(classes, list) or not classes or len(classes) > 255:
        raise ConfigError(f"{path}: 'classes' must be a list of 2 to 255 names, got {classes!r}")
    classes = [str(c) for c in classes]
    if len(classes) == 1:
        raise ConfigError(
            f"{path}: 'classes' lists one class ({classes[0]!r}); a mask's value i is classes[i], "
            f"so list the background too: classes: [background, {classes[0]}] (for 0/255 masks "
            "add --data.mask_format binary)"
        )
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
        "ignore_index_given": "ignore_index" in spec,
        "ignore_colors": ignore_colors,
        **{key: spec.get(key) for key in extra_keys},
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
        mask_format: "index" (single-channel class indices), "binary" (two classes: 0 is
            class 0, 1 or 255 is class 1) or "rgb" (colour-coded masks, converted with the
            palette of classes.yaml).
        value_map: raw mask value -> class index, for index masks whose values are not the class
            indices, e.g. {255: 1} for binary masks stored as 0/255.
        val_fraction: share of the images for validation when there is no splits/ folder.
        test_fraction: share of the images for testing when there is no splits/ folder.
        seed: seed of the random split.
        crop_size: training crop (H, W); null trains on whole images.
        cache_dir: where converted colour masks go (default: a folder under $SEGLIGHT_CACHE).
        **kwargs: batch size, workers and augmentation: see SegmentationDataModule.
    """

    #: keys a subclass's classes.yaml may add (FolderInstances: instance_class)
    extra_class_keys: tuple[str, ...] = ()

    def __init__(
        self,
        root: str,
        mask_format: str = "index",
        value_map: dict[int, int] | None = None,
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
        spec = read_classes_file(self.root / CLASSES_FILE, self.extra_class_keys)
        self.class_spec = spec
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
        self.value_map = self._check_value_map(value_map, mask_format, spec)
        self.label_map = None
        if mask_format != "rgb":
            # a raw ignore value that value_map turns into a class is no longer "ignore"
            raw_ignore = None if self.raw_ignore_index in self.value_map else self.raw_ignore_index
            self.label_map = index_lut(self.num_classes, raw_ignore, self.value_map)
        self._pairs: dict[str, list[tuple[Path, Path]]] | None = None
        self.splits = tuple(s for s in ("train", "val", "test") if self._split_stems().get(s))

    def _check_value_map(
        self, value_map: dict[int, int] | None, mask_format: str, spec: dict[str, Any]
    ) -> dict[int, int]:
        where = self.root / CLASSES_FILE
        if mask_format == "binary":
            if len(self.class_names) != 2:
                raise ConfigError(
                    f"mask_format binary needs exactly 2 classes in {where}, got "
                    f"{len(self.class_names)}: {list(self.class_names)}"
                )
            value_map = {255: 1, **(value_map or {})}
        value_map = dict(value_map or {})
        if value_map and mask_format == "rgb":
            raise ConfigError("value_map applies to index masks; mask_format rgb uses the palette")
        for raw, cls in value_map.items():
            if not (isinstance(raw, int) and 0 <= raw <= 255):
                raise ConfigError(f"value_map: raw mask values are 0..255, got {raw!r}")
            if not (isinstance(cls, int) and 0 <= cls < len(self.class_names)):
                raise ConfigError(
                    f"value_map: {raw} -> {cls!r} is not a class index (0..{len(self.class_names) - 1})"
                )
        if spec["ignore_index_given"] and self.raw_ignore_index in value_map:
            raise ConfigError(
                f"value_map maps {self.raw_ignore_index} to a class, but {where} declares it "
                "the ignore_index: remove one of the two"
            )
        return value_map

    def _all_pairs(self) -> list[tuple[Path, Path]]:
        missing = [d for d in ("images", "masks") if not (self.root / d).is_dir()]
        if missing:
            raise DataError(
                f"Folder dataset at {str(self.root)!r}: missing folder(s) {', '.join(missing)} "
                f"(expected {CLASSES_FILE}, images/ and masks/ with files of the same stems)"
            )
        pairs = find_pairs(self.root / "images", self.root / "masks")
        if self.mask_format != "rgb":
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
