"""Tiny fake copies of VOC (+SBD), Cityscapes, ADE20K, COCO-Stuff and COCO in their official
on-disk layouts, a local HTTP server for the download tests, and an image/mask alignment check.

Every image is drawn from its raw mask (conftest.image_from_mask: one distinct colour per raw
label value), so a test can recover the raw labels from any augmented image and check that the
mask it got still lines up with it.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import tarfile
import threading
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from conftest import image_from_mask
from PIL import Image

from seglight.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize


# ------------------------------------------------------------------------------------ masks
def blocky_mask(h: int, w: int, values: Sequence[int], seed: int, block: int = 8) -> np.ndarray:
    """uint8 [h, w] of `block`-sized squares, each a random value of `values` (all appear)."""
    rng = np.random.default_rng(seed)
    gh, gw = -(-h // block), -(-w // block)
    grid = np.resize(rng.permutation(np.asarray(values)), gh * gw)
    rng.shuffle(grid)
    cells = grid.reshape(gh, gw).astype(np.uint8)
    return np.kron(cells, np.ones((block, block), np.uint8))[:h, :w]


def save_image(mask: np.ndarray, path: Path, seed: int) -> None:
    """The colour image of raw `mask` (JPEG without chroma subsampling, so colours survive)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_from_mask(mask, seed)).save(path, quality=98, subsampling=0)


def save_mask(mask: np.ndarray, path: Path, palette: Sequence[tuple[int, int, int]] | None = None):
    """A single-channel PNG (mode L), or mode P with `palette` (256 colours)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask)
    if palette is not None:
        im.putpalette([c for rgb in palette for c in rgb])
    im.save(path)


def assert_aligned(
    sample: dict, lut: np.ndarray, raw_values: Sequence[int], min_agree: float = 0.99
) -> None:
    """The sample's mask equals lut[raw label read back from the image's colours] on at least
    `min_agree` of its labelled pixels. Without rescaling the two agree exactly (a flip or a
    one-pixel shift breaks that); after bilinear rescaling, region edges blend two colours."""
    image = denormalize(sample["image"], IMAGENET_MEAN, IMAGENET_STD).permute(1, 2, 0).numpy()
    raw = np.asarray(raw_values)
    colours = (raw[:, None] * np.array([23, 71, 113]) % 256).astype(int)  # as image_from_mask
    dist = ((image[:, :, None, :].astype(int) - colours[None, None]) ** 2).sum(-1)
    expected = torch.from_numpy(lut[raw[dist.argmin(-1)]].astype(np.int64))
    mask = sample["mask"]
    labelled = mask != 255  # padding is ignore in the mask and mean grey in the image
    assert labelled.float().mean() > 0.3, "too few labelled pixels to check the alignment"
    agree = (mask[labelled] == expected[labelled]).float().mean().item()
    assert agree >= min_agree, f"image and mask disagree on {1 - agree:.1%} of the labelled pixels"


# ------------------------------------------------------------------------------------ archives
@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve `folder` over HTTP on 127.0.0.1; yields the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder))
    )
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def pack(src: Path, members: Sequence[str], archive: Path) -> Path:
    """Put src/<member> (files or folders) into a .zip or .tar/.tgz named `archive`, with paths
    relative to `src` (as the official archives are laid out)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    files = sorted(
        p for m in members for p in ([src / m] if (src / m).is_file() else (src / m).rglob("*"))
    )
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in files:
                zf.write(p, p.relative_to(src))
    else:
        with tarfile.open(archive, "w:gz" if archive.suffix == ".tgz" else "w") as tf:
            for p in files:
                tf.add(p, str(p.relative_to(src)), recursive=False)
    return archive


# ------------------------------------------------------------------------------------ datasets
VOC_VALUES = [*range(21), 255]


def make_fake_voc(
    root: Path, train: Sequence[str], val: Sequence[str], size: tuple[int, int] = (40, 48)
) -> Path:
    """VOCdevkit/VOC2012/{JPEGImages, SegmentationClass (palette PNGs), ImageSets/Segmentation}."""
    from seglight.data.voc import voc_palette

    voc = root / "VOCdevkit" / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    for k, i in enumerate([*train, *val]):
        mask = blocky_mask(*size, VOC_VALUES, seed=k)
        save_image(mask, voc / "JPEGImages" / f"{i}.jpg", k)
        save_mask(mask, voc / "SegmentationClass" / f"{i}.png", voc_palette())
    for name, ids in (("train", train), ("val", val), ("trainval", [*train, *val])):
        (lists / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    # other VOC folders that the loader must not need
    (voc / "Annotations").mkdir(exist_ok=True)
    (voc / "SegmentationObject").mkdir(exist_ok=True)
    return root


def sbd_mat(path: Path, mask: np.ndarray) -> None:
    """An SBD cls/<id>.mat: a struct GTcls with Boundaries (20x1 cell array), Segmentation and
    CategoriesPresent, as SBD writes them."""
    from scipy.io import savemat

    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        boundaries[k, 0] = np.zeros((0, 0))
    present = np.unique(mask[mask > 0]).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    gt = {"Boundaries": boundaries, "Segmentation": mask, "CategoriesPresent": present}
    savemat(path, {"GTcls": gt}, do_compression=True)


def make_fake_sbd(
    root: Path,
    train: Sequence[str],
    val: Sequence[str],
    size: tuple[int, int] = (40, 48),
    voc_images: bool = True,
) -> dict[str, np.ndarray]:
    """benchmark_RELEASE/dataset/{cls/*.mat, img/*.jpg, train.txt, val.txt}; the images also go to
    VOC's JPEGImages (where VOC 2012 has every SBD image) unless that file exists already or
    `voc_images` is False. Returns the SBD masks by id."""
    sbd = root / "benchmark_RELEASE" / "dataset"
    voc_jpegs = root / "VOCdevkit" / "VOC2012" / "JPEGImages"
    masks = {}
    for k, i in enumerate([*train, *val]):
        mask = blocky_mask(*size, range(21), seed=100 + k)  # SBD has no 255 boundary
        masks[i] = mask
        sbd_mat(sbd / "cls" / f"{i}.mat", mask)
        save_image(mask, sbd / "img" / f"{i}.jpg", 100 + k)
        if voc_images and not (voc_jpegs / f"{i}.jpg").exists():
            save_image(mask, voc_jpegs / f"{i}.jpg", 100 + k)
    (sbd / "inst").mkdir(exist_ok=True)
    (sbd / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (sbd / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return masks


CITYSCAPES_VALUES = [0, 1, 4, 6, 7, 8, 11, 17, 21, 23, 24, 26, 29, 33]


def make_fake_cityscapes(
    root: Path, cities: dict[str, dict[str, int]] | None = None, size: tuple[int, int] = (32, 64)
) -> Path:
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png, gtFine/<split>/<city>/*_gtFine_{labelIds,
    color,instanceIds}.png + _polygons.json (test labels all 0, as in the real package)."""
    cities = cities or {
        "train": {"aachen": 2, "bochum": 1},
        "val": {"lindau": 2},
        "test": {"bonn": 1},
    }
    seed = 0
    for split, counts in cities.items():
        for city, n in counts.items():
            for k in range(n):
                stem = f"{city}_{k:06d}_000019"
                mask = blocky_mask(*size, CITYSCAPES_VALUES, seed)
                if split == "test":
                    mask = np.zeros_like(mask)
                save_image(
                    mask, root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", seed
                )
                gt = root / "gtFine" / split / city
                save_mask(mask, gt / f"{stem}_gtFine_labelIds.png")
                Image.new("RGBA", size[::-1]).save(gt / f"{stem}_gtFine_color.png")
                save_mask(mask.astype(np.uint16) * 1000, gt / f"{stem}_gtFine_instanceIds.png")
                (gt / f"{stem}_gtFine_polygons.json").write_text("{}")
                seed += 1
    return root


def make_fake_ade20k(root: Path, n_train: int = 3, n_val: int = 2, size=(40, 56)) -> Path:
    """ADEChallengeData2016/{images,annotations}/{training,validation}/ + the two info files."""
    base = root / "ADEChallengeData2016"
    for split, prefix, n in (("training", "ADE_train", n_train), ("validation", "ADE_val", n_val)):
        for k in range(1, n + 1):
            stem = f"{prefix}_{k:08d}"
            mask = blocky_mask(*size, [0, 1, 2, 13, 77, 149, 150], seed=k + 10 * len(prefix))
            save_image(mask, base / "images" / split / f"{stem}.jpg", k)
            save_mask(mask, base / "annotations" / split / f"{stem}.png")
    (base / "objectInfo150.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n"
    )
    (base / "sceneCategories.txt").write_text("ADE_train_00000001 airport_terminal\n")
    return root


COCOSTUFF_VALUES = [0, 1, 11, 90, 91, 92, 150, 181, 255]  # 11 (street sign) is an unused id


def make_fake_cocostuff(root: Path, counts: dict[str, int] | None = None, size=(40, 48)) -> Path:
    """images/{train,val}2017/*.jpg and annotations/{train,val}2017/*.png (stuffthingmaps)."""
    counts = counts or {"train": 3, "val": 2}
    k = 0
    for split, n in counts.items():
        for _ in range(n):
            k += 1
            stem = f"{k:012d}"
            mask = blocky_mask(*size, COCOSTUFF_VALUES, seed=k)
            save_image(mask, root / "images" / f"{split}2017" / f"{stem}.jpg", k)
            save_mask(mask, root / "annotations" / f"{split}2017" / f"{stem}.png")
    return root


def rle(region: np.ndarray) -> dict:
    """Compressed RLE of a boolean [H, W] region, JSON-ready (as in COCO's files)."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


def uncompressed_rle(region: np.ndarray) -> dict:
    """COCO's uncompressed RLE (used for crowd regions): run lengths in column-major order,
    starting with a run of zeros."""
    flat = region.astype(np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"size": list(region.shape), "counts": runs}


def make_fake_coco(
    root: Path, size: tuple[int, int] = (40, 48)
) -> dict[str, dict[str, np.ndarray]]:
    """{train2017,val2017}/*.jpg and annotations/instances_{train,val}2017.json with COCO's 80
    categories and polygon, RLE and crowd (uncompressed RLE) segmentations.

    Returns the expected semantic masks (COCO category ids; 255 for crowd) by split and stem."""
    from seglight.data.coco import COCO_STUFF_NAMES, THING_IDS

    h, w = size
    categories = [
        {"id": i, "name": COCO_STUFF_NAMES[i - 1], "supercategory": "x"} for i in THING_IDS
    ]

    def box(top: int, left: int, bottom: int, right: int) -> np.ndarray:
        region = np.zeros(size, bool)
        region[top:bottom, left:right] = True
        return region

    expected: dict[str, dict[str, np.ndarray]] = {}
    next_ann = 1
    for split, image_ids in (("train", [9, 25, 30]), ("val", [139, 285])):
        images, anns, expected[split] = [], [], {}
        for n, image_id in enumerate(image_ids):
            name = f"{image_id:012d}"
            images.append({"id": image_id, "file_name": f"{name}.jpg", "height": h, "width": w})
            sem = np.zeros(size, np.uint8)
            if n == len(image_ids) - 1:  # the last image of a split has no annotations
                objects = []
            else:
                # (category id, region, iscrowd, encoding); the small dog comes first in the
                # file but lies on the big person: smaller wins
                objects = [
                    (18, box(6, 6, 14, 14), 0, "rle"),
                    (1, box(2, 2, 22, 30), 0, "rle"),
                    (90, box(4, 34, 20, 46), 0, "polygon"),
                    (1, box(26, 0, 38, 20), 1, "crowd"),
                    (3, box(30, 10, 36, 16), 0, "rle"),  # a car inside the crowd region
                ]
            for cat, region, crowd, kind in objects:
                if kind == "polygon":
                    ys, xs = np.nonzero(region)
                    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                    segm = [[float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]]
                else:
                    segm = uncompressed_rle(region) if crowd else rle(region)
                anns.append(
                    {"id": next_ann, "image_id": image_id, "category_id": cat, "segmentation": segm,
                     "area": float(region.sum()), "bbox": [0, 0, 1, 1], "iscrowd": crowd}
                )  # fmt: skip
                next_ann += 1
            for _, region, crowd, _ in objects:  # paint the expectation: crowd, big, small
                if crowd:
                    sem[region] = 255
            for cat, region, crowd, _ in sorted(objects, key=lambda o: -o[1].sum()):
                if not crowd:
                    sem[region] = cat
            expected[split][name] = sem
            save_image(sem, root / f"{split}2017" / f"{name}.jpg", image_id)
        data = {
            "info": {},
            "licenses": [],
            "images": images,
            "annotations": anns,
            "categories": categories,
        }
        path = root / "annotations" / f"instances_{split}2017.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    return expected
