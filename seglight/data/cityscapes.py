"""Cityscapes (Cordts et al., CVPR 2016), fine annotations, the 19-class benchmark.

Layout under `root`, as leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip unpack into it:

    leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png    2,975 / 500 / 1,525
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png (and _instanceIds.png)

Images are 1024x2048. The labelIds masks hold the 34 label ids of cityscapesScripts'
helpers/labels.py; they are mapped to its 19 trainIds (road 7 -> 0, sidewalk 8 -> 1, ...,
bicycle 33 -> 18) and every other id (unlabeled 0, ego vehicle 1, ..., license plate) to the
ignore index 255. Only the labelIds files are read (not _color.png or the polygons JSON); CityscapesInstances
also reads _instanceIds.png (background + the 8 instance classes, for instance segmentation).

Evaluation (validate) runs on full 1024x2048 images, as the benchmark scores them; training uses
random crops (default 512x1024 after random scaling; 769x769 and 512x1024 are the common choices).
The test split's labels are not public: it can be predicted (predict_split "test", the default)
and submitted to the benchmark server, but `test` refuses to compute metrics on it.

Downloading needs a (free) account, so `download: true` cannot fetch the data. Register at
https://www.cityscapes-dataset.com/register/, download leftImg8bit_trainvaltest.zip (11 GB) and
gtFine_trainvaltest.zip (241 MB) from https://www.cityscapes-dataset.com/downloads/ and either
unzip both into `root` or put the two zips in `root` and let `download: true` extract them. No
checksum is published with the packages, so the extracted images and labels are counted instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from seglight.data.base import (
    SegmentationDataModule,
    SegmentationDataset,
    dataset_root,
    read_mask,
)
from seglight.data.instances import InstanceData, InstanceDataset
from seglight.errors import DataError

ARCHIVES = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")
SPLIT_SIZES = {"train": 2975, "val": 500, "test": 1525}
#: labelId -> trainId for the 19 evaluated classes (cityscapesScripts helpers/labels.py)
TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
REGISTER = (
    "Cityscapes needs a free account: register at https://www.cityscapes-dataset.com/register/, "
    "download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
    "https://www.cityscapes-dataset.com/downloads/, then unzip both into {root} (giving "
    "{root}/leftImg8bit/ and {root}/gtFine/) or put the two zips there and run with "
    "--data.download true to extract them."
)


def label_ids_to_train_ids() -> np.ndarray:
    """256-entry lookup table: the 19 evaluated labelIds -> trainIds 0..18, everything else 255."""
    lut = np.full(256, 255, dtype=np.uint8)
    for label_id, train_id in TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


class Cityscapes(SegmentationDataModule):
    """Cityscapes fine: 19 classes, 2,975 train / 500 val / 1,525 test (unlabelled) at 1024x2048.

    labelIds -> the 19 trainIds; every other id is ignored (255). Files:
    root/leftImg8bit/<split>/<city>/*_leftImg8bit.png and
    root/gtFine/<split>/<city>/*_gtFine_labelIds.png; the data needs a login (see the module
    docstring).

    Args:
        root: the folder holding leftImg8bit/ and gtFine/ (default: $SEGLIGHT_DATA/cityscapes,
            else ./data/cityscapes).
        download: the data needs a login, so this only extracts leftImg8bit_trainvaltest.zip and
            gtFine_trainvaltest.zip when you have put them in `root`; otherwise it explains where
            to get them.
        crop_size: training crop (H, W) after random scaling; validation is at full resolution.
        **kwargs: batch size, workers and augmentation: see SegmentationDataModule.
    """

    class_names: ClassVar[tuple[str, ...]] = (
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
        "motorcycle", "bicycle",
    )  # fmt: skip
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = (
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
        (0, 80, 100), (0, 0, 230), (119, 11, 32),
    )  # fmt: skip
    label_map = label_ids_to_train_ids()
    #: image counts checked after extracting the zips (no checksum is published)
    split_sizes: ClassVar[dict[str, int]] = SPLIT_SIZES

    def __init__(
        self,
        root: str | None = None,
        download: bool = False,
        crop_size: tuple[int, int] | None = (512, 1024),
        **kwargs,
    ) -> None:
        super().__init__(crop_size=crop_size, **kwargs)
        self.root = dataset_root(root, "cityscapes")
        self.download = download

    def _missing(self, split: str) -> list[str]:
        folders = [f"leftImg8bit/{split}"] + ([] if split == "test" else [f"gtFine/{split}"])
        return [f for f in folders if not (self.root / f).is_dir()]

    def prepare_data(self) -> None:
        if not self.download or not any(self._missing(s) for s in ("train", "val")):
            return
        zips = [self.root / name for name in ARCHIVES]
        absent = [z.name for z in zips if not z.is_file()]
        if absent:
            raise DataError(
                f"Cityscapes cannot be downloaded automatically ({', '.join(absent)} not found in "
                f"{str(self.root)!r}). " + REGISTER.format(root=self.root)
            )
        from seglight.data.download import extract_archive

        for z in zips:
            extract_archive(z, self.root)
        self._check_counts()

    def _check_counts(self) -> None:
        """After extraction: every split has its images, and train/val a label for each."""
        for split, expected in self.split_sizes.items():
            if self._missing(split):
                raise DataError(
                    f"the Cityscapes zips in {str(self.root)!r} did not give "
                    f"{', '.join(self._missing(split))}: are they the *_trainvaltest.zip packages?"
                )
            found = len(self._pairs(split))
            if found != expected:
                raise DataError(
                    f"{self.root / 'leftImg8bit' / split}: expected {expected} images, found "
                    f"{found} (an incomplete download? compare the zip sizes with the website's)"
                )

    def _pairs(self, split: str) -> list[tuple[Path, Path | None]]:
        """(image, labelIds mask) pairs; the mask is None for test, whose labels are not public."""
        pairs: list[tuple[Path, Path | None]] = []
        missing = []
        for city in sorted(p for p in (self.root / "leftImg8bit" / split).iterdir() if p.is_dir()):
            for image in sorted(city.glob("*_leftImg8bit.png")):
                if split == "test":
                    pairs.append((image, None))
                    continue
                stem = image.name[: -len("_leftImg8bit.png")]
                mask = self.root / "gtFine" / split / city.name / f"{stem}_gtFine_labelIds.png"
                if not mask.is_file():
                    missing.append(str(mask))
                pairs.append((image, mask))
        if missing:
            shown = "\n  ".join(missing[:5]) + ("\n  ..." if len(missing) > 5 else "")
            raise DataError(
                f"{len(missing)} Cityscapes {split} image(s) have no labelIds mask (is "
                f"gtFine_trainvaltest.zip fully extracted?):\n  {shown}"
            )
        return pairs

    def setup(self, stage: str | None = None) -> None:
        if stage == "test":
            raise DataError(
                "Cityscapes test labels are not public, so `test` cannot score them: use "
                "`validate` for the val split, or `predict` (predict_split test) and submit the "
                "predictions to https://www.cityscapes-dataset.com/submit/"
            )
        super().setup(stage)

    def build_dataset(self, split: str, train: bool) -> SegmentationDataset:
        missing = self._missing(split)
        if missing:
            raise DataError(
                f"Cityscapes not found at {str(self.root)!r}: missing folder(s) "
                f"{', '.join(missing)} (expected leftImg8bit/{{train,val,test}}/<city>/ and "
                f"gtFine/{{train,val}}/<city>/ under root; point --data.root at your copy or set "
                f"SEGLIGHT_DATA). " + REGISTER.format(root=self.root)
            )
        pairs = self._pairs(split)
        if not pairs:
            raise DataError(
                f"no *_leftImg8bit.png images under {self.root / 'leftImg8bit' / split}"
            )
        transform = self.train_transform() if train else self.eval_transform()
        return SegmentationDataset(
            pairs, self.num_classes, transform, self.label_map, self.ignore_index
        )


#: labelIds of the 8 classes with instances (cityscapesScripts labels.py: hasInstances and
#: evaluated): person, rider, car, truck, bus, train, motorcycle, bicycle
THING_LABEL_IDS = (24, 25, 26, 27, 28, 31, 32, 33)


def instance_label_map() -> np.ndarray:
    """256-entry lookup table of labelIds for CityscapesInstances' semantic mask: the 8 thing
    labelIds -> 1..8, the 11 other evaluated (stuff) classes -> background 0, the rest -> 255."""
    lut = np.full(256, 255, dtype=np.uint8)
    for label_id in TRAIN_IDS:
        lut[label_id] = 0
    for k, label_id in enumerate(THING_LABEL_IDS):
        lut[label_id] = k + 1
    return lut


class _CityscapesInstanceReader:
    """gtFine instanceIds (id = labelId * 1000 + instance number; ids below 1000 are regions
    without instances, such as crowds of cars) -> the masks of the 8 thing classes."""

    label_of_label_id: ClassVar[dict[int, int]] = {
        label_id: k + 1 for k, label_id in enumerate(THING_LABEL_IDS)
    }

    def __init__(self, paths: list[Path | None]) -> None:
        self.paths = paths

    def __call__(self, index: int, height: int, width: int) -> tuple:
        from seglight.data.instances import masks_from_ids, no_instances

        path = self.paths[index]
        if path is None:  # the test split: no labels
            return no_instances(height, width)
        if not path.is_file():
            raise DataError(
                f"{str(path)!r} not found (is gtFine_trainvaltest.zip fully extracted?)"
            )
        ids = read_mask(path).astype(np.int64)
        if ids.shape != (height, width):
            raise DataError(
                f"{str(path)!r} is {ids.shape[0]}x{ids.shape[1]} but its image is {height}x{width}"
            )
        instance_ids = np.unique(ids[ids >= 1000])
        label_of = {
            int(i): self.label_of_label_id[int(i) // 1000]
            for i in instance_ids
            if int(i) // 1000 in self.label_of_label_id
        }
        return masks_from_ids(ids, label_of)


class CityscapesInstances(InstanceData, Cityscapes):
    """Cityscapes fine instances: background + the 8 instance classes, from gtFine instanceIds.

    The classes: person, rider, car, truck, bus, train, motorcycle, bicycle. 9 classes: background 0 (the 11 stuff classes of the benchmark), then the 8 thing classes in
    cityscapesScripts' order; labels outside the 19 evaluated ones are ignored (255), as in
    Cityscapes. Instances: every instanceIds id >= 1000 of a thing class (id // 1000 is its
    labelId); group regions (ids < 1000, e.g. "cargroup") are no instances but keep their class in
    the semantic mask. Files and options: as Cityscapes, plus the *_gtFine_instanceIds.png
    beside each labelIds file.
    """

    class_names: ClassVar[tuple[str, ...]] = (
        "background", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
    )  # fmt: skip
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = (
        (0, 0, 0),
        *(Cityscapes.palette[TRAIN_IDS[label_id]] for label_id in THING_LABEL_IDS),
    )
    label_map = instance_label_map()

    def build_dataset(self, split: str, train: bool) -> InstanceDataset:
        semantic = super().build_dataset(split, train)
        paths = [
            None if m is None else m.with_name(m.name.replace("_labelIds", "_instanceIds"))
            for _, m in semantic.pairs
        ]
        return InstanceDataset(
            semantic.pairs,
            self.num_classes,
            semantic.transform,
            _CityscapesInstanceReader(paths),
            self.label_map,
            self.ignore_index,
        )
