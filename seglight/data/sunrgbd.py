"""SUN RGB-D (Song et al. 2015), RGB images with the 37-class labelling, 5,285 train / 5,050 test.

Layout under `root` (the pre-extracted release of github.com/ankurhanda/sunrgbd-meta-data, which
most public RGB(-D) segmentation code trains from: RedNet, ESANet, ReCo, ...):

    SUNRGBD-train_images/        img-000001.jpg ... img-005285.jpg
    SUNRGBD-test_images/         img-000001.jpg ... img-005050.jpg
    sunrgbd_train_test_labels/   img-000001.png ... img-010335.png

Why this layout: the official release keeps its 2-D segmentation in SUNRGBDtoolbox's
SUNRGBD2Dseg.mat, which needs about 64 GB of RAM to load; the meta-data release is the same
labels extracted to PNG, with the official train/test split (the toolbox's allsplit.mat) baked
into the file names. Label file k holds test image k for k <= 5050 and train image k - 5050
after that. Label values: 0 = unlabelled -> the ignore index 255, 1..37 -> classes 0..36. Images
come from four sensors and differ in size (e.g. 530x730, 427x561, 441x591, 531x681).

SUN RGB-D has no validation split: `val` is the test set, as in the papers that report on it.
`download: true` fetches the three archives; no checksums are published for them, so the
download is checked by counting 5,285 + 5,050 images and 10,335 label maps.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

from seglight.data.base import SegmentationDataModule, SegmentationDataset, dataset_root
from seglight.data.utils import label_colormap, shift_labels
from seglight.errors import DataError

TRAIN_IMAGES, TEST_IMAGES, LABELS = (
    "SUNRGBD-train_images",
    "SUNRGBD-test_images",
    "sunrgbd_train_test_labels",
)
URLS = {
    TRAIN_IMAGES: "http://www.doc.ic.ac.uk/~ahanda/SUNRGBD-train_images.tgz",
    TEST_IMAGES: "http://www.doc.ic.ac.uk/~ahanda/SUNRGBD-test_images.tgz",
    LABELS: "https://github.com/ankurhanda/sunrgbd-meta-data/raw/master/sunrgbd_train_test_labels.tar.gz",
}
SIZES = {TRAIN_IMAGES: 5285, TEST_IMAGES: 5050, LABELS: 10335}
TEST_SIZE = 5050  # train image k has label file k + 5050
SPLIT_DIRS = {"train": TRAIN_IMAGES, "val": TEST_IMAGES, "test": TEST_IMAGES}
NAME = re.compile(r"img-(\d{6})")


class SUNRGBD(SegmentationDataModule):
    """SUN RGB-D, 37 classes, 5,285 train / 5,050 test RGB images (sizes vary by sensor).

    Args:
        root: the folder holding SUNRGBD-train_images/, SUNRGBD-test_images/ and
            sunrgbd_train_test_labels/ (default: $SEGLIGHT_DATA/sunrgbd, else ./data/sunrgbd).
        download: fetch and extract the archives into `root` if they are not there.
        crop_size: training crop (H, W).
        **kwargs: batch size, workers and augmentation: see SegmentationDataModule.
    """

    class_names: ClassVar[tuple[str, ...]] = (
        "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
        "bookshelf", "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser",
        "pillow", "mirror", "floor mat", "clothes", "ceiling", "books", "fridge", "tv", "paper",
        "towel", "shower curtain", "box", "whiteboard", "person", "night stand", "toilet",
        "sink", "lamp", "bathtub", "bag",
    )  # fmt: skip
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = label_colormap(37)
    label_map = shift_labels(37)

    def __init__(
        self,
        root: str | None = None,
        download: bool = False,
        crop_size: tuple[int, int] | None = (480, 640),
        **kwargs,
    ) -> None:
        super().__init__(crop_size=crop_size, **kwargs)
        self.root = dataset_root(root, "sunrgbd")
        self.download = download

    def _missing(self) -> list[str]:
        return [d for d in (TRAIN_IMAGES, TEST_IMAGES, LABELS) if not (self.root / d).is_dir()]

    def prepare_data(self) -> None:
        if self.download and self._missing():
            self._download()

    def _download(self) -> None:
        from seglight.data.download import download_url, extract_archive

        self.root.mkdir(parents=True, exist_ok=True)
        for folder in self._missing():
            url = URLS[folder]
            archive = download_url(url, self.root / url.rsplit("/", 1)[-1], None)
            with tempfile.TemporaryDirectory(dir=self.root) as tmp:
                extract_archive(archive, Path(tmp))
                staging = Path(tmp) / "files"
                staging.mkdir()
                for p in list(Path(tmp).rglob("img-*")):  # flat or inside a folder alike
                    if staging not in p.parents and NAME.fullmatch(p.stem):
                        p.rename(staging / p.name)
                found = len(list(staging.iterdir()))
                if found != SIZES[folder]:
                    archive.unlink()  # so that the next run downloads it again
                    raise DataError(
                        f"{archive}: expected {SIZES[folder]} img-*.* files, found {found}; "
                        "deleted it, run again to download it again"
                    )
                shutil.move(str(staging), str(self.root / folder))

    def build_dataset(self, split: str, train: bool) -> SegmentationDataset:
        missing = self._missing()
        if missing:
            hint = "" if self.download else " or add --data.download true to fetch it"
            raise DataError(
                f"SUN RGB-D not found at {str(self.root)!r}: missing folder(s) {', '.join(missing)} "
                f"(expected {TRAIN_IMAGES}/ and {TEST_IMAGES}/ with img-000001.jpg ..., and "
                f"{LABELS}/ with img-000001.png ...). Point --data.root at your copy{hint}."
            )
        folder = self.root / SPLIT_DIRS[split]
        offset = TEST_SIZE if folder.name == TRAIN_IMAGES else 0
        pairs, unlabelled = [], []
        for image in sorted(folder.iterdir()):
            match = NAME.fullmatch(image.stem)
            if match is None or image.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            label = self.root / LABELS / f"img-{int(match[1]) + offset:06d}.png"
            (pairs if label.is_file() else unlabelled).append((image, label))
        if unlabelled:
            shown = ", ".join(f"{i.name} -> {m.name}" for i, m in unlabelled[:5])
            raise DataError(
                f"{len(unlabelled)} image(s) in {str(folder)!r} have no label map in "
                f"{str(self.root / LABELS)!r} (train image k is labelled by img-<k + 5050>.png): "
                f"{shown}"
            )
        transform = self.train_transform() if train else self.eval_transform()
        return SegmentationDataset(
            pairs, self.num_classes, transform, self.label_map, self.ignore_index
        )
