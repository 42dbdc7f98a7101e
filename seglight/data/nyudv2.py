"""NYU Depth v2 (Silberman et al. 2012), RGB images with the 40-class labelling of Gupta et al.
(CVPR 2013), on the standard split of the 1,449 densely labelled images: 795 train / 654 test.

Layout under `root` (the official files, as downloaded):

    nyu_depth_v2_labeled.mat   the labelled set, 2.8 GB, MATLAB v7.3 (HDF5)
    splits.mat                 trainNdxs (795) and testNdxs (654), 1-based image numbers
    classMapping40.mat         mapClass: the 894 NYU labels -> the 40 classes
                               (or labels40.mat: labels40 [480, 640, 1449], already mapped)

The .mat file stores MATLAB's column-major arrays, so h5py sees them with the axes reversed:
images [1449, 3, 640, 480] and labels [1449, 640, 480]; image i is images[i].transpose(2, 1, 0)
-> [480, 640, 3]. Label 0 (unlabelled) -> the ignore index 255, labels 1..40 -> classes 0..39.

Decoding: the first use decodes the 1,449 images and 40-class label maps once into PNG files
(under $SEGLIGHT_CACHE or ~/.cache/seglight, in decoded/nyudv2-*/: about 1 GB, a minute or two;
`cache_dir` puts them elsewhere) and trains from those, so the 2.8 GB .mat file is never opened
by loader workers (h5py handles do not survive a fork) and each sample is one PNG read. A
changed .mat or mapping file is detected and decoded again.

NYUDv2 has no validation split: `val` is the test set, as in the papers that report on it
(choose epochs and hyper-parameters with that in mind). `download: true` fetches the three files
from their public locations; none has a published checksum, so the download is checked by
opening it (1,449 images; 795 + 654 split indices). Needs h5py and scipy (pip install h5py scipy).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from seglight.data.base import SegmentationDataModule, SegmentationDataset, dataset_root, find_pairs
from seglight.data.utils import (
    build_cache,
    cache_folder,
    cache_is_current,
    label_colormap,
    shift_labels,
    source_digest,
)
from seglight.errors import DataError

MAT, SPLITS, MAPPING, LABELS40 = (
    "nyu_depth_v2_labeled.mat",
    "splits.mat",
    "classMapping40.mat",
    "labels40.mat",
)
URLS = {
    MAT: "http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat",
    SPLITS: "http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat",
    MAPPING: "https://github.com/ankurhanda/nyuv2-meta-data/raw/master/classMapping40.mat",
}
SPLIT_KEYS = {"train": "trainNdxs", "val": "testNdxs", "test": "testNdxs"}
SIZES = {"images": 1449, "trainNdxs": 795, "testNdxs": 654}  # what a download must hold


def _modules() -> tuple[Any, Any]:
    try:
        import h5py
        import scipy.io
    except ImportError as e:
        raise DataError(
            f"NYUDv2 reads MATLAB files with h5py and scipy: pip install h5py scipy ({e})"
        ) from e
    return h5py, scipy.io


def read_mat(path: Path) -> dict[str, np.ndarray]:
    """Every array of a .mat file, v5 (scipy) or v7.3 (HDF5, axes reversed back to MATLAB's)."""
    h5py, sio = _modules()
    try:
        return {k: v for k, v in sio.loadmat(str(path)).items() if not k.startswith("__")}
    except NotImplementedError:  # a v7.3 file
        with h5py.File(path, "r") as f:
            return {
                k: np.asarray(v).transpose() for k, v in f.items() if isinstance(v, h5py.Dataset)
            }
    except Exception as e:  # noqa: BLE001 - scipy raises several types for broken files
        raise DataError(f"cannot read {str(path)!r}: {e}") from e


class NYUDv2(SegmentationDataModule):
    """NYU Depth v2, 40 classes (Gupta et al.), 795 train / 654 test RGB images at 480x640.

    Args:
        root: the folder holding nyu_depth_v2_labeled.mat, splits.mat and classMapping40.mat
            (default: $SEGLIGHT_DATA/nyudv2, else ./data/nyudv2).
        download: fetch the files into `root` if they are not there.
        crop_size: training crop (H, W).
        cache_dir: where the decoded PNGs go (default: a folder under $SEGLIGHT_CACHE).
        **kwargs: batch size, workers and augmentation: see SegmentationDataModule.
    """

    class_names: ClassVar[tuple[str, ...]] = (
        "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
        "bookshelf", "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser",
        "pillow", "mirror", "floor mat", "clothes", "ceiling", "books", "refrigerator",
        "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person",
        "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure",
        "otherfurniture", "otherprop",
    )  # fmt: skip
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = label_colormap(40)
    label_map = shift_labels(40)

    def __init__(
        self,
        root: str | None = None,
        download: bool = False,
        crop_size: tuple[int, int] | None = (480, 640),
        cache_dir: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(crop_size=crop_size, **kwargs)
        self.root = dataset_root(root, "nyudv2")
        self.download = download
        self.cache_dir = cache_dir

    def _mapping_file(self) -> Path | None:
        for name in (MAPPING, LABELS40):
            if (self.root / name).is_file():
                return self.root / name
        return None

    def _missing(self) -> list[str]:
        missing = [n for n in (MAT, SPLITS) if not (self.root / n).is_file()]
        return missing + ([] if self._mapping_file() else [f"{MAPPING} (or {LABELS40})"])

    def prepare_data(self) -> None:
        if self.download and self._missing():
            from seglight.data.download import download_url

            fetched = []
            for name, url in URLS.items():
                if not (self.root / name).is_file() and not (
                    name == MAPPING and self._mapping_file()
                ):
                    fetched.append(download_url(url, self.root / name, None))
            try:
                self._check_download()
            except DataError:
                for path in fetched:  # so that the next run downloads them again
                    path.unlink()
                raise
        if not self._missing():
            self._decoded()  # decode once, on one process per node

    def _check_download(self) -> None:
        """No checksums are published for these files: check what they hold instead."""
        h5py, _ = _modules()
        try:
            with h5py.File(self.root / MAT, "r") as f:
                found = {"images": f["images"].shape[0] if "images" in f else 0}
        except OSError as e:
            raise DataError(
                f"downloaded {str(self.root / MAT)!r} is not a v7.3 .mat file: {e}"
            ) from e
        splits = read_mat(self.root / SPLITS)
        found.update({k: np.asarray(splits.get(k, [])).size for k in ("trainNdxs", "testNdxs")})
        if found != SIZES:
            raise DataError(
                f"the NYUDv2 files in {str(self.root)!r} hold {found}, expected {SIZES}; the "
                "files just downloaded were deleted: run again, or fetch them by hand (URLs in "
                "seglight/data/nyudv2.py)"
            )

    def _decoded(self) -> tuple[Path, Path]:
        """(image folder, label folder) of the decoded cache, decoding if needed."""
        mapping = self._mapping_file()
        assert mapping is not None
        cache = cache_folder("nyudv2", self.root, self.cache_dir)
        digest = source_digest([self.root / MAT, mapping])
        if all(cache_is_current(cache / d, digest) for d in ("image", "label40")):
            return cache / "image", cache / "label40"  # without opening the 2.8 GB file
        h5py, _ = _modules()
        try:
            f = h5py.File(self.root / MAT, "r")
        except OSError as e:
            raise DataError(
                f"cannot open {str(self.root / MAT)!r} as a MATLAB v7.3 file: {e}"
            ) from e
        with f:
            for key in ("images", "labels"):
                if key not in f:
                    raise DataError(f"{str(self.root / MAT)!r} has no {key!r} array")
            images, labels = f["images"], f["labels"]
            n = images.shape[0]
            if images.ndim != 4 or images.shape[1] != 3 or labels.shape != (n, *images.shape[2:]):
                raise DataError(
                    f"{str(self.root / MAT)!r}: expected images [N, 3, W, H] and labels [N, W, H], "
                    f"got {images.shape} and {labels.shape}"
                )
            read_label = self._label_reader(mapping, labels)

            def image_job(i: int) -> Callable[[], np.ndarray]:
                return lambda: np.ascontiguousarray(images[i].transpose(2, 1, 0))

            def label_job(i: int) -> Callable[[], np.ndarray]:
                return lambda: read_label(i)

            build_cache(
                cache / "image",
                digest,
                [(f"{i + 1:04d}", image_job(i)) for i in range(n)],
                "NYUDv2 images",
            )
            build_cache(
                cache / "label40",
                digest,
                [(f"{i + 1:04d}", label_job(i)) for i in range(n)],
                "NYUDv2 label maps",
            )
        return cache / "image", cache / "label40"

    def _label_reader(self, mapping: Path, labels: Any) -> Callable[[int], np.ndarray]:
        """i -> uint8 [H, W] 40-class labels (0 = unlabelled) of image i (0-based)."""
        arrays = read_mat(mapping)
        if mapping.name == LABELS40:
            labels40 = arrays.get("labels40")
            if labels40 is None or labels40.ndim != 3 or labels40.shape[2] != labels.shape[0]:
                raise DataError(f"{mapping}: expected labels40 [H, W, {labels.shape[0]}]")
            return lambda i: np.ascontiguousarray(labels40[:, :, i], dtype=np.uint8)
        map_class = arrays.get("mapClass")
        if map_class is None:
            raise DataError(f"{mapping}: no mapClass array (the 894 -> 40 class mapping)")
        lut = np.concatenate([[0], np.asarray(map_class).ravel()]).astype(np.uint8)

        def read(i: int) -> np.ndarray:
            raw = np.asarray(labels[i]).T
            if raw.max() >= len(lut):
                raise DataError(
                    f"{self.root / MAT}: image {i + 1} has label {raw.max()}, beyond the "
                    f"{len(lut) - 1} labels that {mapping.name} maps"
                )
            return lut[raw]

        return read

    def _split_numbers(self, split: str, n: int) -> list[int]:
        """1-based image numbers of `split` from splits.mat."""
        arrays = read_mat(self.root / SPLITS)
        key = SPLIT_KEYS[split]
        if key not in arrays:
            raise DataError(f"{self.root / SPLITS}: no {key} array (expected trainNdxs, testNdxs)")
        numbers = [int(v) for v in np.asarray(arrays[key]).ravel()]
        bad = [v for v in numbers if not 1 <= v <= n]
        if bad:
            raise DataError(
                f"{self.root / SPLITS}: {key} holds {bad[:5]}, outside the 1..{n} images of {MAT}"
            )
        return numbers

    def build_dataset(self, split: str, train: bool) -> SegmentationDataset:
        missing = self._missing()
        if missing:
            hint = "" if self.download else " or add --data.download true to fetch them"
            raise DataError(
                f"NYUDv2 not found at {str(self.root)!r}: missing {', '.join(missing)} (expected "
                f"{MAT}, {SPLITS} and {MAPPING} there). Point --data.root at your copy{hint}."
            )
        image_dir, label_dir = self._decoded()
        pairs = find_pairs(image_dir, label_dir)
        wanted = {f"{v:04d}" for v in self._split_numbers(split, len(pairs))}
        transform = self.train_transform() if train else self.eval_transform()
        return SegmentationDataset(
            [p for p in pairs if p[0].stem in wanted],
            self.num_classes,
            transform,
            self.label_map,
            self.ignore_index,
        )
