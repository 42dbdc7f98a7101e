"""Mask helpers shared by the datasets: colour masks <-> class indices, one-hot encoding, a
default colour map, and a cache of decoded masks.

Colour conversion is exact and vectorised: each RGB triple is packed into one 24-bit integer and
looked up with a binary search in the sorted palette codes, so a 960x720 mask converts in a few
milliseconds and a colour that is not in the palette is never silently matched to a neighbour.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from seglight.data.base import check_all
from seglight.errors import ConfigError, DataError

Palette = Sequence[Sequence[int]]


def _codes(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> int64 [...] with r << 16 | g << 8 | b."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _palette_array(palette: Palette) -> np.ndarray:
    try:
        colours = np.asarray(palette, dtype=np.int64)
    except (TypeError, ValueError):  # ragged or non-numeric
        colours = np.zeros((0, 0), np.int64)
    if colours.ndim != 2 or colours.shape[1:] != (3,) or not len(colours):
        raise ConfigError(f"palette must be a non-empty list of [r, g, b], got {palette}")
    if colours.min() < 0 or colours.max() > 255:
        raise ConfigError(f"palette colours must be in 0..255, got {colours.tolist()}")
    return colours


def rgb_to_index(
    mask_rgb: np.ndarray,
    palette: Palette,
    ignore_index: int = 255,
    strict: bool = True,
    where: str = "mask",
) -> np.ndarray:
    """Colour-coded mask -> class indices: pixel colour palette[i] -> i.

    Args:
        mask_rgb: uint8 [H, W, 3] (an RGBA mask's alpha channel is ignored).
        palette: one (r, g, b) per class; colours must be distinct.
        ignore_index: the value given to unknown colours when not `strict`.
        strict: an unknown colour is a DataError naming it and its pixel count (else -> ignore).
        where: what to call the mask in error messages (e.g. its file name).

    Returns:
        uint8 [H, W] (int64 if the palette has more than 255 entries).
    """
    mask_rgb = np.asarray(mask_rgb)
    if mask_rgb.ndim != 3 or mask_rgb.shape[-1] not in (3, 4):
        raise DataError(f"{where}: expected a colour mask [H, W, 3], got shape {mask_rgb.shape}")
    colours = _palette_array(palette)
    codes = _codes(colours)
    if len(np.unique(codes)) != len(codes):
        raise ConfigError(f"palette has repeated colours: {colours.tolist()}")
    order = np.argsort(codes)
    sorted_codes = codes[order]
    pixels = _codes(mask_rgb[..., :3])
    pos = np.searchsorted(sorted_codes, pixels).clip(0, len(codes) - 1)
    known = sorted_codes[pos] == pixels
    dtype = np.uint8 if len(codes) <= 255 and 0 <= ignore_index <= 255 else np.int64
    out = order[pos].astype(dtype)
    if not known.all():
        unknown, counts = np.unique(pixels[~known], return_counts=True)
        if strict:
            shown = ", ".join(
                f"({c >> 16}, {(c >> 8) & 255}, {c & 255}) x {n} px"
                for c, n in zip(unknown[:5].tolist(), counts[:5].tolist(), strict=True)
            )
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise DataError(
                f"{where}: {int(counts.sum())} pixels have colours that are not in the palette: "
                f"{shown}{more}"
            )
        out[~known] = ignore_index
    return out


def index_to_rgb(
    mask: np.ndarray | torch.Tensor,
    palette: Palette,
    ignore_color: Sequence[int] = (0, 0, 0),
) -> np.ndarray:
    """Class indices [...] -> uint8 colours [..., 3]; values outside the palette (the ignore
    index included) get `ignore_color`."""
    mask = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    colours = _palette_array(palette).astype(np.uint8)
    table = np.concatenate([colours, np.asarray(ignore_color, np.uint8).reshape(1, 3)])
    index = np.where((mask >= 0) & (mask < len(colours)), mask, len(colours))
    return table[index]


def one_hot(
    mask: torch.Tensor, num_classes: int, ignore_index: int = 255, dtype=torch.float32
) -> torch.Tensor:
    """int [B, H, W] -> [B, C, H, W] of 0/1; ignored pixels are all zeros.

    A value that is neither a class nor `ignore_index` is a DataError (it would otherwise be an
    index error deep inside torch, or a silently wrong target).
    """
    valid = mask != ignore_index
    bad = valid & ((mask < 0) | (mask >= num_classes))
    if bad.any():
        values = sorted(set(mask[bad].unique().tolist()))[:10]
        raise DataError(
            f"one_hot: mask values {values} are outside [0, {num_classes}) and not the ignore "
            f"index {ignore_index}"
        )
    index = torch.where(valid, mask, torch.zeros_like(mask)).long()
    out = torch.nn.functional.one_hot(index, num_classes).movedim(-1, -3).to(dtype)
    return out * valid.unsqueeze(-3).to(dtype)


def label_colormap(n: int) -> tuple[tuple[int, int, int], ...]:
    """n distinct colours from the PASCAL VOC bit-interleaving scheme, skipping its black entry 0
    (black reads as "unlabelled"): colour i of the result is VOC's colour i + 1."""
    colours = []
    for i in range(1, n + 1):
        r = g = b = 0
        c = i
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


def shift_labels(num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Lookup table for masks that store 0 = unlabelled and 1..N = classes (NYUDv2, SUN-RGBD):
    0 -> ignore_index, k -> k - 1 for k in 1..N; larger values stay as they are (invalid, so the
    mask check reports them)."""
    lut = np.arange(256, dtype=np.uint8)
    lut[1 : num_classes + 1] -= 1
    lut[0] = ignore_index
    return lut


# ------------------------------------------------------------------------------- decoded caches
def cache_home() -> Path:
    """seglight's cache folder: $SEGLIGHT_CACHE, else ~/.cache/seglight."""
    return Path(os.environ.get("SEGLIGHT_CACHE", Path.home() / ".cache" / "seglight"))


def source_digest(files: Sequence[Path], *extra: object) -> str:
    """A digest of files' paths, sizes and modification times (and `extra` values): it changes
    whenever a source file changes, so a cache keyed on it is never stale."""
    digest = hashlib.sha256(json.dumps([str(e) for e in extra]).encode())
    for p in files:
        st = p.stat()
        digest.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cache_is_current(folder: Path, digest: str) -> bool:
    """Whether `folder` holds a complete cache built from sources with this digest."""
    try:
        return json.loads((folder / "manifest.json").read_text()).get("digest") == digest
    except (OSError, ValueError, AttributeError):
        return False


def build_cache(
    folder: Path,
    digest: str,
    jobs: Sequence[tuple[str, Callable[[], np.ndarray]]],
    what: str,
) -> Path:
    """Write each job's array as `folder/<name>.png` once, and return `folder`.

    `jobs` are (file name without suffix, function returning uint8 [H, W] or [H, W, 3]). The
    folder is built under a temporary name and renamed into place when complete, with a
    manifest holding `digest`; a folder whose manifest matches is reused as is, one that does not
    is rebuilt. Two processes building at once (DDP ranks) both finish; one copy wins.
    """
    manifest = folder / "manifest.json"
    if cache_is_current(folder, digest):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as e:
        raise DataError(f"cannot create the {what} cache in {str(folder.parent)!r}: {e}") from e

    def write(job: tuple[str, Callable[[], np.ndarray]]) -> str | None:
        name, make = job
        try:
            array = make()
            # compress_level 1: this is a cache; a fast write matters more than 20% of disk
            Image.fromarray(array).save(tmp / f"{name}.png", compress_level=1)
        except DataError as e:
            return str(e)
        except OSError as e:
            return f"cannot write {str(tmp / name)!r}.png: {e}"
        return None

    try:
        check_all(write, jobs, f"{what} could not be decoded")
        (tmp / "manifest.json").write_text(json.dumps({"digest": digest, "files": len(jobs)}))
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process put a complete copy there first
            if not manifest.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def cache_folder(name: str, root: Path, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where a dataset at `root` keeps what it decodes: `cache_dir` if given, else
    <cache_home>/decoded/<name>-<hash of root's absolute path>."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    key = hashlib.sha256(str(Path(root).expanduser().resolve()).encode()).hexdigest()[:12]
    return cache_home() / "decoded" / f"{name}-{key}"


def read_colour_mask(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] from a colour-coded mask (RGB, RGBA, or a palette PNG shown in colour).

    A single-channel mask (class indices) is a DataError: it is not a colour map."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "RGBA", "P"):
                raise DataError(
                    f"mask {str(path)!r} is a single-channel {im.mode} image; expected an RGB "
                    "colour-coded mask. Are these class-index masks?"
                )
            return np.array(im.convert("RGB"))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises several types for broken files
        raise DataError(f"cannot read mask {str(path)!r}: {e}") from e


def decode_colour_masks(
    pairs: Sequence[tuple[Path, Path]],
    palette: Palette,
    folder: Path,
    lut: np.ndarray | None = None,
    strict: bool = True,
) -> list[tuple[Path, Path]]:
    """Convert colour-coded masks to class-index PNGs in `folder` (once; see build_cache) and
    return the pairs with the converted masks, which the standard loader and mask check read.

    Colour palette[i] becomes index i, then `lut` (256 entries) if given, e.g. to group classes
    or send some colours to 255. `strict`: an unknown colour is an error naming the file, the
    colour and its pixel count; otherwise it becomes 255.
    """
    table = None if lut is None else np.asarray(lut, dtype=np.uint8)

    def job(path: Path) -> Callable[[], np.ndarray]:
        def make() -> np.ndarray:
            index = rgb_to_index(
                read_colour_mask(path), palette, 255, strict, f"mask {str(path)!r}"
            )
            return index if table is None else table[index]

        return make

    masks = [m for _, m in pairs]
    extra = (np.asarray(palette).tolist(), None if table is None else table.tolist(), strict)
    digest = source_digest(masks, *extra)
    build_cache(folder, digest, [(m.stem, job(m)) for m in masks], "colour masks")
    return [(image, folder / f"{mask.stem}.png") for image, mask in pairs]
