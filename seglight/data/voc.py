"""Pascal VOC 2012 segmentation (Everingham et al., IJCV 2010), optionally with the SBD augmented
training set (Hariharan et al., "Semantic contours from inverse detectors", ICCV 2011).

Layout under `root`, exactly as the official archives unpack into it:

    VOCdevkit/VOC2012/
        JPEGImages/<id>.jpg                       17,125 images (all of VOC 2012)
        SegmentationClass/<id>.png                2,913 palette PNGs (mode P)
        ImageSets/Segmentation/train.txt          1,464 ids
                               val.txt            1,449
                               trainval.txt       2,913
    benchmark_RELEASE/dataset/                    SBD; only needed for train_split "train_aug"
        cls/<id>.mat                              11,355 MATLAB files, mask in GTcls.Segmentation
        img/<id>.jpg
        train.txt  val.txt                        8,498 / 2,857 ids

Masks hold the class index of each pixel (0 background, 1..20 the objects below); VOC marks object
boundaries and difficult regions with 255, which is the ignore index as it is. The palette is the
devkit's bit-interleaved colour map.

train_aug is the 10,582-image list used since DeepLab: (SBD train + SBD val + VOC train) minus VOC
val, computed here from the four list files on disk. An image's mask is VOC's own
SegmentationClass PNG when there is one (finer, with the 255 boundaries), else SBD's .mat (no
boundaries). The .mat masks are decoded once into PNGs in a cache folder (`cache_dir`, default
under $SEGLIGHT_CACHE, never inside the data folder), so training reads PNGs like any other split
and the usual mask check covers them. The VOC test set is only on the evaluation server; report
results on val.

`download: true` fetches VOCtrainval_11-May-2012.tar (2 GB, md5 as published with torchvision's
VOC dataset) and, for train_aug, SBD's benchmark.tgz (1.4 GB, md5 as published with torchvision's
SBDataset) from their official hosts, checks them and extracts them into `root`. The archives stay
in `root`; delete them to save space once the data is there.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from seglight.data.base import SegmentationDataModule, SegmentationDataset, dataset_root
from seglight.data.utils import build_cache, cache_folder, label_colormap, source_digest
from seglight.errors import ConfigError, DataError

VOC_DIR = Path("VOCdevkit/VOC2012")
SBD_DIR = Path("benchmark_RELEASE/dataset")
VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
SBD_URL = (
    "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/"
    "benchmark.tgz"
)
SPLIT_SIZES = {"train": 1464, "val": 1449, "trainval": 2913, "train_aug": 10582}


def voc_palette(n: int = 256) -> tuple[tuple[int, int, int], ...]:
    """The devkit's colour map (VOClabelcolormap.m): black, then index i's bits spread over the
    high bits of R, G and B; entry 255 (the boundary) is (224, 224, 192)."""
    return ((0, 0, 0), *label_colormap(n - 1))


def read_ids(path: Path) -> list[str]:
    """The image ids of a list file (one per line), in file order."""
    if not path.is_file():
        raise DataError(f"split file {str(path)!r} does not exist")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split file {str(path)!r} is empty")
    return ids


def train_aug_ids(voc: Path, sbd: Path) -> list[str]:
    """(SBD train | SBD val | VOC train) - VOC val, sorted: 10,582 ids on the real data."""
    lists = voc / "ImageSets" / "Segmentation"
    pool = set(read_ids(sbd / "train.txt")) | set(read_ids(sbd / "val.txt"))
    pool |= set(read_ids(lists / "train.txt"))
    return sorted(pool - set(read_ids(lists / "val.txt")))


def read_sbd_mask(path: Path) -> np.ndarray:
    """uint8 [H, W] class indices 0..20 from an SBD cls/<id>.mat file (GTcls.Segmentation)."""
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise DataError(
            "reading SBD's .mat masks (train_aug) needs scipy: pip install scipy"
        ) from e
    try:
        seg = np.asarray(
            loadmat(path, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
        )
    except Exception as e:  # noqa: BLE001 - scipy raises several types for broken files
        raise DataError(
            f"cannot read SBD mask {str(path)!r} (expected a MATLAB file with "
            f"GTcls.Segmentation): {e}"
        ) from e
    if seg.ndim != 2 or seg.dtype.kind not in "ui" or seg.size == 0:
        raise DataError(f"SBD mask {str(path)!r}: GTcls.Segmentation is not a 2-D integer array")
    bad = sorted(int(v) for v in np.unique(seg) if not 0 <= v <= 20)
    if bad:
        raise DataError(f"SBD mask {str(path)!r} has values {bad[:10]} outside 0..20")
    return seg.astype(np.uint8)


class VOC(SegmentationDataModule):
    """Pascal VOC 2012: 21 classes, train 1,464 / val 1,449 (or SBD train_aug 10,582), 255 ignored.

    Background + 20 object classes; the 255 boundary label is the ignore index. Files:
    root/VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation} and, for
    train_aug, root/benchmark_RELEASE/dataset/{cls, img, train.txt, val.txt} (see the module
    docstring for the layout, the train_aug list and the download).

    Args:
        root: the folder holding VOCdevkit/ (and benchmark_RELEASE/ for train_aug) (default:
            $SEGLIGHT_DATA/voc, else ./data/voc).
        download: fetch and extract the official archives into `root` if the data is not there
            (VOC 2 GB; SBD 1.4 GB more for train_aug).
        train_split: the list to train on: "train" (1,464), "trainval" (2,913, e.g. for a test
            server submission) or "train_aug" (10,582, needs SBD).
        cache_dir: where SBD's .mat masks are decoded to, once (default: under $SEGLIGHT_CACHE).
        crop_size: training crop (H, W); images are about 500x375 and are padded with the ignore
            label where smaller.
        predict_split: the split `predict` runs on.
        **kwargs: batch size, workers and augmentation: see SegmentationDataModule.
    """

    class_names: ClassVar[tuple[str, ...]] = (
        "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
        "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
        "sheep", "sofa", "train", "tvmonitor",
    )  # fmt: skip
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = voc_palette(21)
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "trainval", "train_aug")
    #: the official archives: name -> (url, checksum); class attributes so a mirror can be set
    archives: ClassVar[dict[str, tuple[str, str | None]]] = {
        "voc": (VOC_URL, "md5:6cd6e144f989b92b3379bac3b3de84fd"),
        "sbd": (SBD_URL, "md5:82b4d87ceb2ed10f6038a1cba92111cb"),
    }

    def __init__(
        self,
        root: str | None = None,
        download: bool = False,
        train_split: str = "train",
        cache_dir: str | None = None,
        crop_size: tuple[int, int] | None = (512, 512),
        predict_split: str = "val",
        **kwargs,
    ) -> None:
        super().__init__(crop_size=crop_size, predict_split=predict_split, **kwargs)
        if train_split not in ("train", "trainval", "train_aug"):
            raise ConfigError(
                f"VOC train_split must be 'train', 'trainval' or 'train_aug', got {train_split!r}"
            )
        self.root = dataset_root(root, "voc")
        self.download = download
        self.train_split = train_split
        self.cache_dir = cache_dir

    # ------------------------------------------------------------------ files on disk
    def _needs_sbd(self, split: str) -> bool:
        return split == "train_aug" or (split == "train" and self.train_split == "train_aug")

    def _missing(self, sbd: bool) -> list[str]:
        voc = [VOC_DIR / d for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")]
        wanted = voc + ([SBD_DIR / "cls"] if sbd else [])
        return [str(p) for p in wanted if not (self.root / p).is_dir()]

    def prepare_data(self) -> None:
        sbd = self.train_split == "train_aug"
        if self.download:
            if self._missing(sbd=False):
                self._fetch("voc")
            if sbd and self._missing(sbd=True):
                self._fetch("sbd")
        if sbd and not self._missing(sbd=True):
            self._train_aug_pairs()  # decode the .mat masks here: once, on one process

    def _fetch(self, name: str) -> None:
        from seglight.data.download import download_and_extract

        url, checksum = self.archives[name]
        self.root.mkdir(parents=True, exist_ok=True)
        download_and_extract(url, self.root, Path(url).name, checksum)
        missing = self._missing(sbd=name == "sbd")
        if missing:
            raise DataError(
                f"{self.root / Path(url).name} was extracted but {', '.join(missing)} is still "
                "missing: the archive does not have the official layout"
            )

    def build_dataset(self, split: str, train: bool) -> SegmentationDataset:
        missing = self._missing(self._needs_sbd(split))
        if missing:
            hint = "" if self.download else " or add --data.download true to fetch it"
            raise DataError(
                f"VOC not found at {str(self.root)!r}: missing {', '.join(missing)}. Expected "
                f"{VOC_DIR}/{{JPEGImages,SegmentationClass,ImageSets/Segmentation}} (and "
                f"{SBD_DIR}/cls for train_aug) under root. Point --data.root at the folder "
                f"holding VOCdevkit/ (or set SEGLIGHT_DATA){hint}."
            )
        name = self.train_split if split == "train" else split
        if name == "train_aug":
            pairs = self._train_aug_pairs()
        else:
            voc = self.root / VOC_DIR
            ids = read_ids(voc / "ImageSets" / "Segmentation" / f"{name}.txt")
            pairs = [
                (voc / "JPEGImages" / f"{i}.jpg", voc / "SegmentationClass" / f"{i}.png")
                for i in ids
            ]
            _require_files(pairs, f"{voc / 'ImageSets' / 'Segmentation' / name}.txt")
        transform = self.train_transform() if train else self.eval_transform()
        return SegmentationDataset(pairs, self.num_classes, transform, None, self.ignore_index)

    def _train_aug_pairs(self) -> list[tuple[Path, Path]]:
        """VOC's PNG where the image has one, else SBD's .mat decoded into the cache."""
        voc, sbd = self.root / VOC_DIR, self.root / SBD_DIR
        pairs, from_sbd = [], []
        for i in train_aug_ids(voc, sbd):
            image = voc / "JPEGImages" / f"{i}.jpg"
            if not image.is_file():
                image = sbd / "img" / f"{i}.jpg"
            mask = voc / "SegmentationClass" / f"{i}.png"
            if not mask.is_file():
                mask = sbd / "cls" / f"{i}.mat"
                from_sbd.append(len(pairs))
            pairs.append((image, mask))
        _require_files(pairs, f"the train_aug list ({sbd}/train.txt, val.txt + VOC train - val)")
        if from_sbd:
            mats = [pairs[k][1] for k in from_sbd]
            folder = (
                Path(self.cache_dir).expanduser() / "sbd_masks"
                if self.cache_dir
                else cache_folder("voc-sbd-masks", self.root)
            )
            jobs = [(m.stem, lambda m=m: read_sbd_mask(m)) for m in mats]
            build_cache(folder, source_digest(mats), jobs, "SBD .mat masks")
            for k in from_sbd:
                pairs[k] = (pairs[k][0], folder / f"{pairs[k][1].stem}.png")
        return pairs


def _require_files(pairs: list[tuple[Path, Path]], listed_in: str) -> None:
    """DataError naming the files of `pairs` that are missing (an incomplete copy)."""
    missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
    if missing:
        shown = "\n  ".join(missing[:5]) + ("\n  ..." if len(missing) > 5 else "")
        raise DataError(
            f"{len(missing)} file(s) listed in {listed_in} are missing (an interrupted download or "
            f"extraction?):\n  {shown}"
        )
