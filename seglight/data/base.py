"""SegmentationDataModule, the base of every dataset, and the image/mask Dataset.

The label contract: a batch is {"image": float32 [B, C, H, W] normalised, "mask": int64 [B, H, W],
"name": list[str]}; mask values are class indices in [0, num_classes) or `ignore_index` (255).
Each dataset maps its own void label to 255 when it reads a mask (a 256-entry lookup table).

Masks are checked before training: every mask of the splits being set up is read once, and a
raw value that is neither a class nor the dataset's ignore value (after its lookup table; an
entry INVALID marks a raw value that must not occur), or a mask whose size differs from its
image's, is an error naming the files and the raw values. The same pass counts the pixels of each
class: when a Trainer fits, a declared class with no pixels in the whole training split is an
error (binary 0/255 masks read with 255 as "ignore" are the usual cause), unless
`allow_empty_classes: true`. A passed check and its counts are remembered (keyed on the files'
paths, sizes and modification times) in ~/.cache/seglight/verified, so the next run starts at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from seglight.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    Prescale,
    TrainTransform,
)
from seglight.errors import DataError
from seglight.threads import default_workers

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")

DATASETS: dict[str, type[SegmentationDataModule]] = {}

Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def data_home() -> Path:
    """Where datasets live by default: $SEGLIGHT_DATA, else ./data."""
    return Path(os.environ.get("SEGLIGHT_DATA", "data")).expanduser()


def dataset_root(root: str | None, name: str) -> Path:
    """A dataset's folder: `root` as given, else data_home() / name."""
    return Path(root).expanduser() if root else data_home() / name


# --------------------------------------------------------------------------------- reading files
def read_image(path: Path) -> torch.Tensor:
    """uint8 [3, H, W] RGB (torchvision's libjpeg-turbo / libpng decoders)."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError for corrupt files
        # torchvision prefixes its C++ source location ("decode_jpeg, /.../decode_jpeg.cpp:171, ",
        # "operator(), /.../decode_png.cpp:79, ")
        reason = re.sub(r"^[\w()]+, \S+:\d+, ", "", str(e).strip())
        raise DataError(f"cannot decode image {str(path)!r}: {reason}") from e


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, after a cheap check that the file is
    whole (`truncation`): a broken or cut-off image is a DataError naming the file, found by the
    data check before training rather than when an epoch reaches it. Nothing is decoded."""
    try:
        with Image.open(path) as im:  # reads the header only
            size = im.size
    except Exception as e:  # noqa: BLE001 - PIL raises several types for broken files
        raise DataError(f"cannot read image {str(path)!r}: {e}") from e
    problem = truncation(path)
    if problem:
        raise DataError(f"image {str(path)!r} is cut off: {problem}")
    return size


def truncation(path: Path) -> str | None:
    """Why an image file is cut off (a partial copy or download), or None: a PNG's chunks,
    walked by their lengths, must reach IEND within the file; a JPEG's image data must end with
    its EOI marker; a WebP's RIFF size must fit. Reads a few bytes per PNG chunk and a JPEG's
    last KiB (the whole file only when the end marker is not there: data appended after the
    image, as phones' motion photos do, or a cut-off file); other formats are not checked."""
    try:
        size = path.stat().st_size
        with open(path, "rb", buffering=0) as f:  # unbuffered: a seek reads nothing
            head = f.read(12)
            if head[:8] == b"\x89PNG\r\n\x1a\n":
                end = 8
                while True:
                    f.seek(end)
                    chunk = f.read(8)
                    if len(chunk) < 8:
                        return f"its PNG data stops after {size} bytes, before the IEND chunk"
                    end += 12 + int.from_bytes(chunk[:4], "big")  # length, type, data, CRC
                    if end > size:
                        return (
                            f"its PNG chunk {chunk[4:8].decode('latin-1')!r} needs {end} bytes, "
                            f"the file has {size}"
                        )
                    if chunk[4:8] == b"IEND":
                        return None
            if head[:3] == b"\xff\xd8\xff":
                f.seek(max(0, size - 1024))
                if b"\xff\xd9" not in f.read():
                    f.seek(0)
                    if not _jpeg_ends(f.read()):
                        return f"its JPEG data ({size} bytes) has no end marker (EOI)"
            elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                declared = int.from_bytes(head[4:8], "little") + 8
                if declared > size:
                    return f"its WebP header declares {declared} bytes, the file has {size}"
    except OSError as e:
        return f"cannot read it: {e.strerror}"
    return None


def _jpeg_ends(data: bytes) -> bool:
    """Whether a JPEG's image data reaches its EOI marker: after the first SOS segment (the
    segments before it, EXIF thumbnails included, are skipped by their lengths), the entropy-
    coded data holds no FF D9 except the end marker."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False  # not a marker where one belongs: damaged
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        if marker == 0xDA:  # start of scan: the image data follows
            return data.find(b"\xff\xd9", pos) >= 0
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


def _png_kind(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk, or None when it is not a PNG."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return None
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def read_mask(path: Path, label_map: np.ndarray | None = None) -> np.ndarray:
    """Class-index mask [H, W] from a single-channel image (mode L, P, I;16 or I).

    `label_map`, a 256-entry lookup table, remaps 8-bit values (e.g. a void label to 255).
    8-bit grey and palette PNGs (the common case) are decoded by torchvision (libpng: about half
    PIL's time; a palette PNG gives its indices, as PIL's mode P does); other files by PIL.
    """
    if _png_kind(path) in ((8, 0), (8, 3)):  # 8-bit greyscale or palette
        from torchvision.io import ImageReadMode, decode_image

        try:
            mask = decode_image(str(path), mode=ImageReadMode.UNCHANGED)[0].numpy()
        except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError for corrupt files
            raise DataError(f"cannot read mask {str(path)!r}: {e}") from e
        return label_map[mask] if label_map is not None else mask
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I;16", "I", "1"):
                raise DataError(
                    f"mask {str(path)!r} is a {im.mode} image; expected single-channel class indices "
                    "(mode L or P). Is it a colour-coded mask?"
                )
            mask = np.array(im)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises several types for broken files
        raise DataError(f"cannot read mask {str(path)!r}: {e}") from e
    if label_map is not None:
        if mask.dtype != np.uint8:
            raise DataError(f"mask {str(path)!r} is {mask.dtype}; this dataset expects 8-bit masks")
        mask = label_map[mask]
    return mask


def invalid_values(mask: np.ndarray, num_classes: int, ignore_index: int) -> list[int]:
    """The values of `mask` that are neither a class index nor the ignore index."""
    values = np.unique(mask)
    return [int(v) for v in values if not (0 <= v < num_classes or v == ignore_index)]


_MASKS_OPTIONAL: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "masks_optional", default=False
)


@contextlib.contextmanager
def masks_optional() -> Iterator[None]:
    """Within this context find_pairs pairs an image that has no mask with None instead of
    failing: the unlabelled images of semi-supervised data (seglight.data.semi) need none."""
    token = _MASKS_OPTIONAL.set(True)
    try:
        yield
    finally:
        _MASKS_OPTIONAL.reset(token)


#: a lookup-table entry (tables of dtype int16) for a raw mask value that is neither a class nor
#: the dataset's void value: finding it in a mask is an error that names the raw value
INVALID = -1


def raw_histogram(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of a raw mask and their pixel counts (a bincount for 8-bit masks)."""
    if mask.dtype == np.uint8:
        counts = np.bincount(mask.ravel(), minlength=256)
        values = np.flatnonzero(counts)
        return values, counts[values]
    return np.unique(mask, return_counts=True)


def _span(values: Sequence[int]) -> str:
    values = [int(v) for v in values]
    if not values:
        return "none"
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")


def describe_values(num_classes: int, ignore_index: int, label_map: np.ndarray | None) -> str:
    """What a raw mask value may be, for error messages: the raw values of the classes and of
    "ignore" (after the dataset's lookup table: e.g. CamVid's void is 11, a Folder's may be 0)."""
    if label_map is None:
        classes, ignored = range(num_classes), [ignore_index]
    else:
        classes = np.flatnonzero((label_map >= 0) & (label_map < num_classes))
        ignored = np.flatnonzero(label_map == ignore_index)
    plural = "s" if len(ignored) > 1 else ""
    return f"a class ({_span(classes)}) or the ignore value{plural} ({_span(ignored)})"


def bad_raw_values(
    values: np.ndarray, num_classes: int, ignore_index: int, label_map: np.ndarray | None
) -> list[int]:
    """The raw `values` that map to neither a class nor the ignore index."""
    mapped = values if label_map is None else label_map[np.clip(values, 0, len(label_map) - 1)]
    ok = ((mapped >= 0) & (mapped < num_classes)) | (mapped == ignore_index)
    if label_map is not None:
        ok &= (values >= 0) & (values < len(label_map))
    return [int(v) for v in values[~ok]]


def find_pairs(
    image_dir: Path,
    mask_dir: Path,
    image_exts: Sequence[str] = IMAGE_EXTENSIONS,
    mask_exts: Sequence[str] = MASK_EXTENSIONS,
) -> list[tuple[Path, Path | None]]:
    """Match images and masks by file stem, whatever the image's extension (.png, .jpg, ...);
    every image needs its mask (except within `masks_optional()`)."""
    for d, what in ((image_dir, "image"), (mask_dir, "mask")):
        if not d.is_dir():
            raise DataError(f"{what} folder {str(d)!r} does not exist")
    images = _files_by_stem(image_dir, image_exts)
    masks = _files_by_stem(mask_dir, mask_exts)
    if not images:
        raise DataError(f"no images ({', '.join(image_exts)}) in {str(image_dir)!r}")
    unmatched = sorted(set(images) - set(masks))
    if unmatched and not _MASKS_OPTIONAL.get():
        shown = ", ".join(images[s].name for s in unmatched[:5])
        raise DataError(
            f"{len(unmatched)} image(s) in {str(image_dir)!r} have no mask of the same name in "
            f"{str(mask_dir)!r}: {shown}{' ...' if len(unmatched) > 5 else ''}"
        )
    return [(images[s], masks.get(s)) for s in sorted(images)]


def _files_by_stem(folder: Path, exts: Sequence[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in folder.iterdir():
        if p.suffix.lower() in exts and not p.name.startswith("."):
            if p.stem in found:
                raise DataError(
                    f"two files named {p.stem!r} in {str(folder)!r}: {found[p.stem].name}, {p.name}"
                )
            found[p.stem] = p
    return found


# --------------------------------------------------------------------------------- the dataset
class SegmentationDataset(Dataset):
    """Image/mask file pairs -> {"image": float [3, H, W], "mask": int64 [H, W], "name": str}.

    Args:
        pairs: (image path, mask path) tuples; a mask path of None gives an all-ignore mask
            (images without labels, for predict).
        num_classes: valid mask values are [0, num_classes) and ignore_index.
        transform: joint image+mask transform (TrainTransform / EvalTransform).
        label_map: 256-entry lookup table applied to the raw mask values.
        ignore_index: the ignore label.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path | None]],
        num_classes: int,
        transform: Transform,
        label_map: np.ndarray | None = None,
        ignore_index: int = 255,
    ) -> None:
        self.pairs = list(pairs)
        self.num_classes = num_classes
        self.transform = transform
        self.label_map = label_map
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw image uint8 [3, H, W] and checked mask uint8/int [H, W]."""
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        if mask_path is None:
            return image, torch.full(image.shape[-2:], self.ignore_index, dtype=torch.uint8)
        mask = read_mask(mask_path, self.label_map)
        if mask.shape != tuple(image.shape[-2:]):
            raise DataError(
                f"mask {str(mask_path)!r} is {mask.shape[0]}x{mask.shape[1]} but its image "
                f"{str(image_path)!r} is {image.shape[-2]}x{image.shape[-1]}"
            )
        bad = ((mask >= self.num_classes) & (mask != self.ignore_index)) | (mask < 0)
        if bad.any():  # (masks are checked before training; this catches a file changed since)
            values, _ = raw_histogram(read_mask(mask_path))
            bad_values = bad_raw_values(values, self.num_classes, self.ignore_index, self.label_map)
            raise DataError(
                f"mask {str(mask_path)!r} has values {bad_values} outside [0, {self.num_classes}) "
                "that are not ignored (a raw value must be "
                f"{describe_values(self.num_classes, self.ignore_index, self.label_map)})"
            )
        if mask.dtype not in (np.uint8, np.int64):  # 16-bit files, int16 lookup tables
            small = self.num_classes <= 256 and 0 <= self.ignore_index <= 255
            mask = mask.astype(np.uint8 if small else np.int64)  # the values are checked above
        mask = torch.from_numpy(mask)
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self.transform(*self.load(index))
        return {"image": image, "mask": mask, "name": self.pairs[index][0].stem}


def verify_pairs(
    pairs: Sequence[tuple[Path, Path | None]],
    num_classes: int,
    ignore_index: int = 255,
    label_map: np.ndarray | None = None,
    what: str = "dataset",
    use_cache: bool = True,
) -> dict[str, list[int]] | None:
    """Read every mask once, and every image's header (image_size: cut-off files too), and
    raise DataError listing each bad file (values, size, a broken image). Pairs without a mask
    (unlabelled images) get the image check only.

    Returns what the same pass counted: {"class_pixels": pixels per class [num_classes],
    "raw_values": the raw mask values found}, or None when there are no masks.
    """
    if not pairs:
        return None
    cache = _verified_cache_file(pairs, num_classes, ignore_index, label_map) if use_cache else None
    if cache is not None and cache.exists():
        try:
            summary = json.loads(cache.read_text())
            if summary.get("images_only"):
                return None
            return {k: summary[k] for k in ("class_pixels", "raw_values")}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an older or damaged entry: check again
    class_pixels = np.zeros(num_classes, np.int64)
    raw_values: set[int] = set()

    def check(pair: tuple[Path, Path | None]) -> str | None:
        image_path, mask_path = pair
        try:
            width, height = image_size(image_path)
            if mask_path is None:
                return None
            mask = read_mask(mask_path)
        except DataError as e:
            return str(e)
        if label_map is not None and mask.dtype != np.uint8:
            return f"mask {str(mask_path)!r} is {mask.dtype}; this dataset expects 8-bit masks"
        if mask.shape != (height, width):
            return (
                f"mask {str(mask_path)!r} is {mask.shape[0]}x{mask.shape[1]} but its image "
                f"{image_path.name} is {height}x{width}"
            )
        values, counts = raw_histogram(mask)
        bad = bad_raw_values(values, num_classes, ignore_index, label_map)
        if bad:
            return (
                f"mask {str(mask_path)!r} has values {bad} outside [0, {num_classes}) that are "
                f"not ignored (a raw value must be "
                f"{describe_values(num_classes, ignore_index, label_map)})"
            )
        classes = values if label_map is None else label_map[values]
        keep = classes < num_classes  # the rest is ignored
        np.add.at(class_pixels, classes[keep].astype(np.int64), counts[keep])
        raw_values.update(values.tolist())
        return None

    masked = sum(m is not None for _, m in pairs)
    check_all(check, pairs, f"{what} {'image/mask pairs' if masked else 'images'} are invalid")
    summary = {"class_pixels": class_pixels.tolist(), "raw_values": sorted(raw_values)}
    entry = summary if masked else {"images_only": True}
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"files": len(pairs), "what": what, **entry}))
        except OSError:
            pass  # the cache is an optimisation only
    return summary if masked else None


def check_classes_present(
    class_pixels: Sequence[int],
    class_names: Sequence[str],
    raw_values: Sequence[int],
    ignore_values: Sequence[int],
    what: str,
) -> None:
    """DataError naming each class with no pixels in a training split (with the likely fix when
    the masks hold only 0 and 255 and 255 is read as "ignore": binary masks)."""
    empty = [f"{i} ({class_names[i]})" for i, n in enumerate(class_pixels) if n == 0]
    if not empty:
        return
    hint = ""
    if set(raw_values) <= {0, 255} and 255 in ignore_values:
        hint = (
            " The masks hold only the values 0 and 255, and 255 is read as the ignore value: if "
            "255 marks the foreground (binary masks), map it to class 1 with the Folder option "
            "`value_map: {255: 1}` (or `mask_format: binary`)."
        )
    raise DataError(
        f"{what}: class{'es' if len(empty) > 1 else ''} {', '.join(empty)} "
        f"{'have' if len(empty) > 1 else 'has'} no pixels in any mask of the training split, so "
        f"the model cannot learn {'them' if len(empty) > 1 else 'it'}.{hint} To train anyway "
        "(e.g. on a tiny subset), set allow_empty_classes: true."
    )


def check_all(check: Callable[[Any], str | None], items: Sequence[Any], what: str) -> None:
    """Run `check` (a problem message, or None) on every item in a thread pool (file reads release
    the GIL) and raise one DataError listing the problems: "<n> of <total> <what>: ..."."""
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        problems = [p for p in pool.map(check, items) if p is not None]
    if len(problems) == 1 and "\n" not in problems[0]:  # one line
        raise DataError(f"1 of {len(items)} {what}: {problems[0]}")
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(f"{len(problems)} of {len(items)} {what}:\n  {shown}{more}")


def _verified_cache_file(pairs, num_classes, ignore_index, label_map) -> Path | None:
    # v2: images are checked for truncation too (entries of earlier checks are redone)
    digest = hashlib.sha256(f"v2:{num_classes}:{ignore_index}".encode())
    if label_map is not None:
        digest.update(label_map.tobytes())
    try:
        for image_path, mask_path in pairs:
            for p in (image_path, mask_path):
                if p is None:  # an unlabelled image
                    digest.update(b"-\n")
                    continue
                st = p.stat()
                digest.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    except OSError:
        return None
    home = Path(os.environ.get("SEGLIGHT_CACHE", Path.home() / ".cache" / "seglight"))
    return home / "verified" / digest.hexdigest()


def collate(samples: list[dict[str, Any]], ignore_index: int = 255) -> dict[str, Any]:
    """Stack samples; images of different sizes are padded (bottom/right) to the largest, with 0
    (the mean colour after normalisation) in the image and the ignore index in the mask.
    Instance data's `instances` (one dict per image) stay a list; their masks are padded with 0."""
    h = max(s["mask"].shape[-2] for s in samples)
    w = max(s["mask"].shape[-1] for s in samples)
    images = samples[0]["image"].new_zeros((len(samples), samples[0]["image"].shape[0], h, w))
    masks = torch.full((len(samples), h, w), ignore_index, dtype=torch.long)
    for i, s in enumerate(samples):
        sh, sw = s["mask"].shape[-2:]
        images[i, :, :sh, :sw] = s["image"]
        masks[i, :sh, :sw] = s["mask"]
    batch = {"image": images, "mask": masks, "name": [s["name"] for s in samples]}
    if "instances" in samples[0]:
        batch["instances"] = [_pad_instances(s["instances"], h, w) for s in samples]
    return batch


def _pad_instances(instances: dict[str, torch.Tensor], h: int, w: int) -> dict[str, torch.Tensor]:
    masks = instances["masks"]
    if masks.shape[-2:] == (h, w):
        return instances
    padded = masks.new_zeros((len(masks), h, w))
    padded[:, : masks.shape[-2], : masks.shape[-1]] = masks
    return {**instances, "masks": padded}


# --------------------------------------------------------------------------------- the datamodule
class SegmentationDataModule(L.LightningDataModule):
    """Base of every dataset: the splits, the augmentation, the loaders.

    A subclass sets `class_names` and `palette` (class attributes, or in __init__ when they come
    from the data) and implements `build_dataset(split, train)`.

    Args:
        batch_size: training batch size (per device).
        val_batch_size: validation/test/predict batch size (default: batch_size).
        num_workers: loader worker processes (default: min(4, usable cores - 1), leaving a core to
            the training step: seglight.threads); 0 loads in the main process.
        crop_size: training crop (H, W); null trains on full images without scaling.
        scale_range: random scale range before cropping.
        hflip: random horizontal flips in training.
        color_jitter: brightness/contrast/saturation jitter strength in training (0 disables).
        check_masks: read every mask before training and fail on bad values or sizes.
        pin_memory: pinned host memory for faster host-to-GPU copies (default: when CUDA is available).
        predict_split: the split that `predict` runs on.
        gpu_resident: decode each split once into the device's memory and augment whole batches
            there (seglight.data.gpu), so training never waits for loader workers; for small
            datasets (CamVid's train split takes 253 MB).
        image_scale: rescale every image and mask of every split by this factor when it is read,
            before augmentation (e.g. 0.5 for quick studies at half resolution). Evaluation then
            happens at that resolution too: not comparable with full-resolution results.
        allow_empty_classes: fit even when a declared class has no pixels in the training split
            (checked with check_masks when a Trainer fits; e.g. tiny subsets for tests). Without
            it that is an error: usually a mask format mix-up (binary 0/255 masks).
    """

    class_names: ClassVar[tuple[str, ...]] = ()
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = ()
    ignore_index: int = 255
    in_channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    #: 256-entry lookup table applied to raw mask values, or None
    label_map: np.ndarray | None = None
    #: the splits this dataset has
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")

    registry: ClassVar[dict[str, type[SegmentationDataModule]]] = DATASETS

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        DATASETS[cls.__name__] = cls

    def __init__(
        self,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int | None = None,
        crop_size: tuple[int, int] | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: bool = True,
        color_jitter: float = 0.2,
        check_masks: bool = True,
        pin_memory: bool | None = None,
        predict_split: str = "test",
        gpu_resident: bool = False,
        image_scale: float = 1.0,
        allow_empty_classes: bool = False,
    ) -> None:
        super().__init__()
        # `download: true` runs on global rank 0 alone, the other ranks (of every node) waiting:
        # multi-node runs read the data from a filesystem they share (README, "Several nodes")
        self.prepare_data_per_node = False
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if crop_size is not None and (len(crop_size) != 2 or min(crop_size) < 1):
            raise DataError(f"crop_size must be [height, width], got {crop_size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise DataError(
                f"scale_range must be [low, high] with 0 < low <= high, got {scale_range}"
            )
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        # None: seglight.threads' policy (the CLI redoes it per DDP rank: workers_by_policy)
        self.workers_by_policy = num_workers is None
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.crop_size = tuple(crop_size) if crop_size else None
        self.scale_range = tuple(scale_range)
        self.hflip = hflip
        self.color_jitter = color_jitter
        self.check_masks = check_masks
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.predict_split = predict_split
        self.gpu_resident = gpu_resident
        if not 0 < image_scale <= 4:
            raise DataError(f"image_scale must be in (0, 4], got {image_scale}")
        if image_scale != 1.0 and gpu_resident:
            raise DataError("image_scale and gpu_resident cannot be combined; set image_scale: 1.0")
        self.image_scale = image_scale
        self.allow_empty_classes = allow_empty_classes
        self.datasets: dict[str, Dataset] = {}

    # ---------------------------------------------------------------------- what the model sees
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train_transform(self) -> Transform:
        transform = TrainTransform(
            self.crop_size,
            self.scale_range,
            self.hflip,
            self.color_jitter,
            self.mean,
            self.std,
            self.ignore_index,
        )
        return Prescale(transform, self.image_scale) if self.image_scale != 1.0 else transform

    def eval_transform(self) -> Transform:
        transform = EvalTransform(self.mean, self.std)
        return Prescale(transform, self.image_scale) if self.image_scale != 1.0 else transform

    # ---------------------------------------------------------------------- splits
    def build_dataset(self, split: str, train: bool) -> Dataset:
        """The dataset of `split`, with training augmentation if `train`."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        wanted = {
            "fit": ["train", "val"],
            "validate": ["val"],
            "test": ["test"],
            "predict": [self.predict_split],
        }.get(stage or "fit", list(self.splits))
        for split in wanted:
            if split in self.datasets:
                continue
            if split not in self.splits:
                other = "val" if "val" in self.splits else self.splits[-1] if self.splits else None
                hint = f": predict another with --data.predict_split {other}" if other else ""
                raise DataError(
                    f"{type(self).__name__} has no split {split!r} (it has "
                    f"{', '.join(self.splits)}){hint if stage == 'predict' else ''}"
                )
            dataset = self.build_dataset(split, train=split == "train")
            if len(dataset) == 0:
                raise DataError(f"{type(self).__name__}: the {split} split is empty")
            if self.check_masks:
                self.verify(dataset, split)
            self.datasets[split] = dataset

    def verify(self, dataset: Dataset, split: str) -> None:
        """Check a split's labels before use (`check_masks`): every mask's values and size. A
        dataset whose label files are not class-index masks overrides this with its own check."""
        if not isinstance(dataset, SegmentationDataset):
            return
        what = f"{type(self).__name__} {split}"
        summary = verify_pairs(
            dataset.pairs, self.num_classes, self.ignore_index, self.label_map, what
        )
        fitting = self.trainer is not None and self.trainer.state.fn == "fit"
        if split == "train" and fitting and summary and not self.allow_empty_classes:
            lut = self.label_map
            ignored = (
                [self.ignore_index] if lut is None else np.flatnonzero(lut == self.ignore_index)
            )
            check_classes_present(
                summary["class_pixels"], self.class_names, summary["raw_values"],
                list(ignored), what,
            )  # fmt: skip

    # ---------------------------------------------------------------------- loaders
    def resident_loader(self, split: str, batch_size: int, train: bool) -> Iterable[dict]:
        """The loader of `split` with gpu_resident: true (seglight.data.gpu), on the Trainer's
        device (the GPU if there is one without a Trainer)."""
        from seglight.data.gpu import ResidentLoader, resident_split

        trainer = self.trainer
        if trainer is not None:
            device = trainer.strategy.root_device
            rank, world_size = trainer.global_rank, trainer.world_size
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            rank, world_size = 0, 1
        fill = tuple(round(255 * m) for m in self.mean)
        what = f"{type(self).__name__} {split}"
        resident = resident_split(self.datasets[split], device, fill, self.ignore_index, what)
        transform = self.train_transform() if train else self.eval_transform()
        return ResidentLoader(resident, batch_size, transform, rank=rank, world_size=world_size)

    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        if self.gpu_resident:
            return self.resident_loader(split, batch_size, train)
        dataset = self.datasets[split]
        sampler = None
        trainer = self.trainer
        collate_fn = self.collate_fn()
        if train:
            return self._train_loader(split, dataset, batch_size, collate_fn)
        if trainer is not None and trainer.world_size > 1:
            # Lightning's default DistributedSampler pads the split by repeating samples so that
            # every rank gets as many; that would count them twice in the metrics. This one does not.
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_fn,
            generator=torch.Generator(),  # nothing random: do not draw from the global one
        )

    def _train_loader(
        self, split: str, dataset: Dataset, batch_size: int, collate_fn: Callable
    ) -> ResumableLoader:
        """The shuffled, augmented training loader, exactly resumable (ResumableSampler)."""
        trainer = self.trainer
        rank, world, epoch, progress = 0, 1, 0, None
        if trainer is not None:
            # the epoch this loader starts in: the one Lightning gives the samplers (right also
            # when resuming, where trainer.current_epoch is not updated yet)
            loop = trainer.fit_loop
            rank, world = trainer.global_rank, trainer.world_size
            epoch = loop.epoch_progress.current.processed
            batches = loop.epoch_loop.batch_progress

            def progress() -> tuple[int, bool]:
                return batches.current.processed, batches.is_last_batch

        # per split: two training loaders (labelled, unlabelled) never share augmentation draws
        seed = (loader_seed() + zlib.crc32(split.encode())) % 2**62
        return ResumableLoader(
            SeededSamples(dataset),
            batch_size=batch_size,
            sampler=ResumableSampler(dataset, seed, world, rank, epoch),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=len(dataset) > batch_size,
            collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(seed),
            progress=progress,
        )

    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """The loaders' collate function (a hook for data with more keys per sample)."""
        return collate if self.ignore_index == 255 else _Collate(self.ignore_index)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.val_batch_size, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_split, self.val_batch_size, train=False)


# --------------------------------------------------------------------------------- exact resume
def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the sample at `position` of `epoch`'s order (well mixed, 63 bits)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ResumableSampler(DistributedSampler):
    """The training order: a permutation of (`seed`, epoch), this rank's share of it (as
    torch's DistributedSampler, which it is, so Lightning keeps it under DDP), each index paired
    with its sample's augmentation seed, a function of (seed, epoch, position).

    Everything random about an epoch's batches is thus a function of the seed, the epoch and
    the position: not of the loader workers (how many, which one loads what, persistent or not)
    nor of the global random state. A run resumed mid-epoch skips the batches it has seen
    (`skip`) and gets exactly the rest. Without a Trainer calling `set_epoch`, each full pass
    moves to the next epoch.
    """

    def __init__(
        self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0, epoch: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.base_epoch = epoch  # the Trainer's epoch (set_epoch)
        #: full passes made since set_epoch: a shorter loader cycled within one Trainer epoch
        #: (CombinedLoader's max_size_cycle, SemiSupervised's labelled images) makes several;
        #: pass p uses the order of epoch base_epoch + p
        self.passes = 0
        self.skip = 0  # samples of the current pass already consumed (set when resuming)
        self.pass_epoch = epoch  # the epoch of the latest pass

    @property
    def epoch(self) -> int:  # type: ignore[override]  (DistributedSampler's attribute)
        """The epoch whose order the next pass uses."""
        return self.base_epoch + self.passes

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self.base_epoch, self.passes = epoch, 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning's call at each epoch's start; a no-op for the epoch already set (a resumed
        cycled loader keeps its passes)."""
        if epoch != self.base_epoch:
            self.epoch = epoch

    def __iter__(self):
        epoch, skip = self.epoch, self.skip
        self.pass_epoch, self.skip = epoch, 0
        # DistributedSampler's permutation of `self.epoch` (read when the pass starts)
        indices = list(super().__iter__())  # this rank's share: positions rank, rank + W, ...
        for k in range(skip, len(indices)):
            yield indices[k], sample_seed(self.seed, epoch, self.rank + k * self.num_replicas)
        self.passes += 1  # a full pass: the next one takes the next epoch's order


class SeededSamples(Dataset):
    """`dataset`, indexed by (index, seed) pairs (ResumableSampler's): each sample is loaded and
    augmented with torch's global generator seeded with its own seed, then the generator is put
    back as it was (the loader's process draws nothing from it)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class ResumableLoader(DataLoader):
    """The training DataLoader over a ResumableSampler, with the `state_dict` /
    `load_state_dict` by which Lightning resumes it mid-epoch: {"seed", "epoch", "batches",
    "epoch_done"} (the batches consumed in that epoch and whether it ended, from `progress`, the
    Trainer's count). Its own `generator` keeps it from drawing from the global generator when
    it starts (worker seeds)."""

    def __init__(
        self, *args: Any, progress: Callable[[], tuple[int, bool]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        batches, done = self.progress() if self.progress is not None else (0, False)
        # one batch of every loader per step: a loader shorter than the epoch (cycled by
        # CombinedLoader) is in pass batches // len, at batch batches % len
        passes, batches = divmod(int(batches), max(1, len(self)))
        return {
            "seed": sampler.seed, "epoch": sampler.base_epoch, "passes": passes,
            "batches": batches, "epoch_done": int(done),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        sampler.seed = int(state["seed"])
        if state.get("epoch_done"):  # saved after the epoch's last batch: start the next one
            sampler.epoch, sampler.skip = int(state["epoch"]) + 1, 0
        else:
            sampler.epoch = int(state["epoch"])
            sampler.passes = int(state.get("passes", 0))
            sampler.skip = int(state["batches"]) * (self.batch_size or 1)


def loader_seed() -> int:
    """The base seed of the training order and augmentation: the run's seed (seed_everything's
    PL_GLOBAL_SEED), so a resumed run gets the same one; else a draw from torch's generator."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed not in (None, "") else int(torch.randint(0, 2**62, ()))


class _Collate:
    def __init__(self, ignore_index: int) -> None:
        self.ignore_index = ignore_index

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, self.ignore_index)
