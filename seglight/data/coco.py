"""MS COCO 2017 (Lin et al., ECCV 2014) for semantic segmentation, in two label sets.

Layout under `root` (COCOStuff: default data/cocostuff; COCO: default data/coco):

    COCOStuff  images/train2017/<12 digits>.jpg       118,287  (COCO's train2017.zip)
               images/val2017/<12 digits>.jpg           5,000  (val2017.zip)
               annotations/{train2017,val2017}/*.png           (stuffthingmaps_trainval2017.zip)
    COCO       train2017/*.jpg  val2017/*.jpg                  (train2017.zip, val2017.zip)
               annotations/instances_{train,val}2017.json      (annotations_trainval2017.zip)

COCOStuff is COCO-Stuff 164k (Caesar et al., CVPR 2018): 171 classes (80 things + 91 stuff), from
the stuffthingmaps PNGs, laid out as in the COCO-Stuff README (the zips unpacked into images/ and
annotations/; images already unpacked for COCO can be symlinked). Those PNGs store COCO-Stuff id
- 1: values 0..181 and 255 for "unlabeled". 11 of the ids are never used (COCO thing ids without
annotations: street sign, hat, shoe, eye glasses, plate, mirror, window, desk, door, blender, hair
brush); the other 171 values are mapped in order to 0..170 (the common "0-181 -> 0-170" mapping)
and 255 and the unused ids to the ignore index.

COCO builds semantic masks from the instance annotations, in COCO's own layout: 81 classes
(background + 80 things). Category ids 1..90 (with gaps) map to 1..80 in id order; pixels outside
every object are background 0. Where instances overlap, the smaller one (fewer pixels) wins, and
between equal ones the later annotation; crowd regions (iscrowd 1) are ignored (255) except where
a non-crowd instance covers them. Images without annotations are kept (all background). The masks
are built once with pycocotools and cached as PNGs (`cache_dir`, default under $SEGLIGHT_CACHE, so
a read-only data folder is never written to); a changed JSON rebuilds them. Building train2017
takes a while (its JSON alone takes ~20 s and a few GB of memory to load); it happens in
prepare_data, on one process.

Neither label set has an official palette: both use VOC's colour map. `download: true` fetches the
official zips (train2017.zip 18 GB, val2017.zip 1 GB, and annotations_trainval2017.zip 241 MB or
stuffthingmaps_trainval2017.zip 659 MB) and extracts them. The COCO zips are checked against the
sha1 sums published in GluonCV's COCO download script; no checksum is published for
stuffthingmaps_trainval2017.zip, so its PNGs are counted instead.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from seglight.data.base import SegmentationDataModule, SegmentationDataset, dataset_root, find_pairs
from seglight.data.instances import InstanceData, InstanceDataset
from seglight.data.utils import build_cache, cache_folder, source_digest
from seglight.data.voc import voc_palette
from seglight.errors import DataError

#: COCO-Stuff's labels.txt: the name of every id 1..182 (ids 1..91 are COCO's thing ids)
COCO_STUFF_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat",
    "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window",
    "desk", "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush",
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip
#: thing ids that COCO defines but never annotates
UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
USED_IDS = tuple(i for i in range(1, 183) if i not in UNUSED_IDS)  # 171
THING_IDS = tuple(i for i in USED_IDS if i <= 91)  # the 80 categories of instances_*.json
SPLITS = ("train", "val")
#: the official zips and the sha1 sums GluonCV's COCO script publishes for them
TRAIN_ZIP = (
    "http://images.cocodataset.org/zips/train2017.zip",
    "sha1:10ad623668ab00c62c096f0ed636d6aff41faca5",
)
VAL_ZIP = (
    "http://images.cocodataset.org/zips/val2017.zip",
    "sha1:4950dc9d00dbe1c933ee0170f5797584351d2a41",
)
ANNOTATIONS_ZIP = (
    "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
    "sha1:8551ee4bb5860311e79dace7e79cb91e432e78b3",
)
STUFF_URL = (
    "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
    "stuffthingmaps_trainval2017.zip"
)

#: name -> (url, checksum, folder under root to extract into)
Archives = dict[str, tuple[str, str | None, str]]


def stuffthingmap_lut() -> np.ndarray:
    """256-entry lookup table for stuffthingmaps: used values (id - 1) -> 0..170 in order, unused
    ids and 255 -> 255. Values 182..254 do not occur and stay as they are, so the mask check
    reports them."""
    lut = np.arange(256, dtype=np.uint8)
    lut[:182] = 255
    for index, cid in enumerate(USED_IDS):
        lut[cid - 1] = index
    return lut


def _missing(root: Path, parts: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    """The paths under `root` that are missing, by the archive that provides them."""
    absent = {name: [p for p in paths if not (root / p).exists()] for name, paths in parts.items()}
    return {name: paths for name, paths in absent.items() if paths}


def _fetch(archives: Archives, root: Path, names: list[str]) -> None:
    """Download and extract the archives `names` (only those whose contents are missing)."""
    from seglight.data.download import download_and_extract

    for name in names:
        url, checksum, folder = archives[name]
        (root / folder).mkdir(parents=True, exist_ok=True)
        download_and_extract(url, root / folder, Path(url).name, checksum)


def _missing_error(
    name: str, root: Path, missing: list[str], layout: str, download: bool
) -> DataError:
    hint = "" if download else " or add --data.download true to fetch it"
    return DataError(
        f"{name} not found at {str(root)!r}: missing {', '.join(missing)} (expected {layout} under "
        f"root). Point --data.root at your copy (or set SEGLIGHT_DATA){hint}."
    )


class COCOStuff(SegmentationDataModule):
    """COCO-Stuff 164k: 171 classes (80 things + 91 stuff), 118,287 train / 5,000 val.

    stuffthingmap values 0..181 -> 0..170 (11 unused ids and 255 "unlabeled" ignored). Files:
    root/images/{train,val}2017/*.jpg and root/annotations/{train,val}2017/*.png (see the module
    docstring).

    Args:
        root: the folder holding images/ and annotations/ (default: $SEGLIGHT_DATA/cocostuff,
            else ./data/cocostuff). Images already unpacked for COCO can be symlinked there.
        download: fetch and extract train2017.zip, val2017.zip and
            stuffthingmaps_trainval2017.zip (20 GB in all) into `root` if the data is not there.
        crop_size: training crop (H, W) after random scaling (images are about 640x480).
        predict_split: the split `predict` runs on.
        **kwargs: batch size, workers and augmentation: see SegmentationDataModule.
    """

    class_names: ClassVar[tuple[str, ...]] = tuple(COCO_STUFF_NAMES[i - 1] for i in USED_IDS)
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = voc_palette(171)
    label_map = stuffthingmap_lut()
    splits: ClassVar[tuple[str, ...]] = SPLITS
    archives: ClassVar[Archives] = {
        "train": (*TRAIN_ZIP, "images"),
        "val": (*VAL_ZIP, "images"),
        "stuffthingmaps": (STUFF_URL, None, "annotations"),
    }
    #: what each archive provides (relative to root)
    parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": ("images/train2017",),
        "val": ("images/val2017",),
        "stuffthingmaps": ("annotations/train2017", "annotations/val2017"),
    }
    #: label maps counted after a download (their archive has no published checksum)
    split_sizes: ClassVar[dict[str, int]] = {"train": 118287, "val": 5000}

    def __init__(
        self,
        root: str | None = None,
        download: bool = False,
        crop_size: tuple[int, int] | None = (512, 512),
        predict_split: str = "val",
        **kwargs,
    ) -> None:
        super().__init__(crop_size=crop_size, predict_split=predict_split, **kwargs)
        self.root = dataset_root(root, "cocostuff")
        self.download = download

    def prepare_data(self) -> None:
        missing = _missing(self.root, self.parts)
        if not (self.download and missing):
            return
        _fetch(self.archives, self.root, list(missing))
        still = [p for paths in _missing(self.root, self.parts).values() for p in paths]
        if still:
            raise DataError(
                f"the COCO-Stuff archives were extracted into {str(self.root)!r} but "
                f"{', '.join(still)} is still missing: not the official layout"
            )
        for split, expected in self.split_sizes.items():
            found = sum(1 for p in (self.root / "annotations" / f"{split}2017").glob("*.png"))
            if found != expected:
                raise DataError(
                    f"{self.root / 'annotations' / f'{split}2017'}: expected {expected} label maps "
                    f"from stuffthingmaps_trainval2017.zip, found {found} (an incomplete download? "
                    "delete the zip and run again)"
                )

    def build_dataset(self, split: str, train: bool) -> SegmentationDataset:
        missing = [p for paths in _missing(self.root, self.parts).values() for p in paths]
        if missing:
            layout = "images/{train2017,val2017}/*.jpg and annotations/{train2017,val2017}/*.png"
            raise _missing_error("COCO-Stuff", self.root, missing, layout, self.download)
        pairs = find_pairs(
            self.root / "images" / f"{split}2017", self.root / "annotations" / f"{split}2017"
        )
        transform = self.train_transform() if train else self.eval_transform()
        return SegmentationDataset(
            pairs, self.num_classes, transform, self.label_map, self.ignore_index
        )


# ---------------------------------------------------------------------------- instance masks
def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """uint8 [H, W] 0/1 mask of a COCO `segmentation`: polygons, RLE or uncompressed RLE (as
    COCO.annToMask)."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm.get("counts"), list):  # uncompressed RLE (crowd regions)
        rle = mask_utils.frPyObjects(segm, height, width)
    else:  # compressed RLE
        rle = segm
    return mask_utils.decode(rle)


def semantic_mask(
    annotations: list[dict[str, Any]], height: int, width: int, category_index: dict[int, int]
) -> np.ndarray:
    """uint8 [H, W]: 0 background, category_index[category_id] for objects, 255 for crowd regions
    not covered by an object. Smaller objects are painted last, so they win where objects
    overlap; between objects of equal size the later annotation wins."""
    out = np.zeros((height, width), dtype=np.uint8)
    objects = []
    for ann in annotations:
        region = decode_segmentation(ann["segmentation"], height, width).astype(bool)
        if ann.get("iscrowd"):
            out[region] = 255
        else:
            objects.append((region, category_index[ann["category_id"]]))
    for region, index in sorted(objects, key=lambda o: -int(o[0].sum())):  # stable sort
        out[region] = index
    return out


class COCO(SegmentationDataModule):
    """MS COCO 2017 masks from the instance annotations: 81 classes (background + 80 things).

    118,287 train / 5,000 val images; crowd regions ignored; smaller objects win overlaps; masks
    built once and cached. Files: root/{train,val}2017/*.jpg and
    root/annotations/instances_{train,val}2017.json (see the module docstring).

    Args:
        root: the folder holding train2017/, val2017/ and annotations/ (default:
            $SEGLIGHT_DATA/coco, else ./data/coco).
        download: fetch and extract train2017.zip, val2017.zip and annotations_trainval2017.zip
            (19 GB in all) into `root` if the data is not there.
        cache_dir: where the semantic masks are written (default: under $SEGLIGHT_CACHE).
        crop_size: training crop (H, W) after random scaling (images are about 640x480).
        predict_split: the split `predict` runs on.
        **kwargs: batch size, workers and augmentation: see SegmentationDataModule.
    """

    class_names: ClassVar[tuple[str, ...]] = (
        "background",
        *(COCO_STUFF_NAMES[i - 1] for i in THING_IDS),
    )
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = voc_palette(81)
    splits: ClassVar[tuple[str, ...]] = SPLITS
    archives: ClassVar[Archives] = {
        "train": (*TRAIN_ZIP, ""),
        "val": (*VAL_ZIP, ""),
        "annotations": (*ANNOTATIONS_ZIP, ""),
    }
    #: what each archive provides (relative to root)
    parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": ("train2017",),
        "val": ("val2017",),
        "annotations": tuple(f"annotations/instances_{s}2017.json" for s in SPLITS),
    }

    def __init__(
        self,
        root: str | None = None,
        download: bool = False,
        cache_dir: str | None = None,
        crop_size: tuple[int, int] | None = (512, 512),
        predict_split: str = "val",
        **kwargs,
    ) -> None:
        super().__init__(crop_size=crop_size, predict_split=predict_split, **kwargs)
        self.root = dataset_root(root, "coco")
        self.download = download
        self.cache_dir = cache_dir

    def prepare_data(self) -> None:
        if self.download and _missing(self.root, self.parts):
            _fetch(self.archives, self.root, list(_missing(self.root, self.parts)))
        if not _missing(self.root, self.parts):
            for split in SPLITS:
                self._pairs(split)  # build the mask caches here: once, on one process

    def build_dataset(self, split: str, train: bool) -> SegmentationDataset:
        missing = [p for paths in _missing(self.root, self.parts).values() for p in paths]
        if missing:
            layout = "{train2017,val2017}/*.jpg and annotations/instances_{train,val}2017.json"
            raise _missing_error("COCO", self.root, missing, layout, self.download)
        transform = self.train_transform() if train else self.eval_transform()
        return SegmentationDataset(
            self._pairs(split), self.num_classes, transform, None, self.ignore_index
        )

    def _mask_folder(self, split: str) -> Path:
        if self.cache_dir is None:
            return cache_folder(f"coco-semantic-{split}2017", self.root)
        return Path(self.cache_dir).expanduser() / f"semantic_{split}2017"

    def _pairs(self, split: str) -> list[tuple[Path, Path]]:
        """(image, cached semantic mask) pairs, building the masks if they are missing or stale."""
        json_path = self.root / "annotations" / f"instances_{split}2017.json"
        images = self.root / f"{split}2017"
        folder = self._mask_folder(split)
        digest = source_digest([json_path], "semantic masks v1")
        if not _cache_is_current(folder, digest):  # loading the JSON is slow: only when needed
            build_cache(folder, digest, self._mask_jobs(json_path, images), "COCO semantic masks")
        return find_pairs(images, folder)

    def _mask_jobs(
        self, json_path: Path, images: Path
    ) -> list[tuple[str, Callable[[], np.ndarray]]]:
        try:
            with open(json_path) as f:
                data = json.load(f)
            categories = {c["id"] for c in data["categories"]}
            entries, annotations = data["images"], data["annotations"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"cannot read COCO annotations {str(json_path)!r}: {e}") from e
        if categories != set(THING_IDS):
            raise DataError(
                f"{str(json_path)!r} does not have COCO's 80 categories (ids missing: "
                f"{sorted(set(THING_IDS) - categories)}, unexpected: "
                f"{sorted(categories - set(THING_IDS))})"
            )
        absent = [e["file_name"] for e in entries if not (images / e["file_name"]).is_file()]
        if absent:
            shown = ", ".join(absent[:5]) + (" ..." if len(absent) > 5 else "")
            raise DataError(
                f"{len(absent)} image(s) of {str(json_path)!r} are missing from {str(images)!r} "
                f"(an interrupted download or extraction?): {shown}"
            )
        per_image = defaultdict(list)
        for ann in annotations:
            per_image[ann["image_id"]].append(ann)
        index = {cid: k + 1 for k, cid in enumerate(THING_IDS)}
        rank_zero_info(
            f"COCO: building the semantic masks of {len(entries)} images from {json_path.name} "
            "(once; cached)"
        )

        def job(entry: dict[str, Any]) -> Callable[[], np.ndarray]:
            def make() -> np.ndarray:
                try:
                    anns = per_image[entry["id"]]
                    return semantic_mask(anns, entry["height"], entry["width"], index)
                except Exception as e:  # noqa: BLE001 - pycocotools raises several types
                    raise DataError(
                        f"{str(json_path)!r}: cannot rasterise the annotations of image "
                        f"{entry.get('file_name')!r}: {e!r}"
                    ) from e

            return make

        return [(Path(e["file_name"]).stem, job(e)) for e in entries]


def _cache_is_current(folder: Path, digest: str) -> bool:
    """Whether build_cache left a complete folder for `digest` (its manifest.json records it)."""
    try:
        return json.loads((folder / "manifest.json").read_text()).get("digest") == digest
    except (OSError, ValueError, AttributeError):
        return False


class _COCOInstanceReader:
    """Decodes the non-crowd annotations of one image into masks and class indices (picklable,
    for loader workers)."""

    def __init__(self, json_path: Path, stems: list[str], per_image: dict[str, list[tuple]]):
        self.json_path = json_path
        self.stems = stems
        self.per_image = per_image  # stem -> [(class index, segmentation), ...]

    def __call__(self, index: int, height: int, width: int) -> tuple[Any, Any]:
        import torch

        from seglight.data.instances import no_instances

        stem = self.stems[index]
        objects = self.per_image.get(stem, [])
        if not objects:
            return no_instances(height, width)
        try:
            masks = np.stack([decode_segmentation(s, height, width) for _, s in objects])
        except Exception as e:  # noqa: BLE001 - pycocotools raises several types
            raise DataError(
                f"{str(self.json_path)!r}: cannot rasterise the annotations of image {stem!r}: {e!r}"
            ) from e
        labels = torch.tensor([k for k, _ in objects], dtype=torch.long)
        return torch.from_numpy(masks.astype(np.uint8)), labels


class COCOInstances(InstanceData, COCO):
    """MS COCO 2017 instances: the 80 thing classes (+ background 0) as instance targets.

    Each non-crowd annotation is one instance (its polygons or RLE decoded with pycocotools);
    crowd regions (iscrowd 1) are no instances (and ignored, 255, in the semantic mask, as in
    COCO). An annotation whose mask is empty (a zero-area box) is dropped, as torchvision's
    detection reference drops boxes without area. The semantic mask is COCO's (the same files,
    cache and rules). Files and options: as COCO.
    """

    def build_dataset(self, split: str, train: bool) -> InstanceDataset:
        semantic = super().build_dataset(split, train)
        json_path = self.root / "annotations" / f"instances_{split}2017.json"
        stems = [image.stem for image, _ in semantic.pairs]
        return InstanceDataset(
            semantic.pairs,
            self.num_classes,
            semantic.transform,
            _COCOInstanceReader(json_path, stems, self._instances(json_path)),
            None,
            self.ignore_index,
        )

    def _instances(self, json_path: Path) -> dict[str, list[tuple[int, Any]]]:
        """stem -> [(class index 1..80, segmentation)] of the non-crowd annotations."""
        try:
            with open(json_path) as f:
                data = json.load(f)
            names = {e["id"]: Path(e["file_name"]).stem for e in data["images"]}
            annotations = data["annotations"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"cannot read COCO annotations {str(json_path)!r}: {e}") from e
        index = {cid: k + 1 for k, cid in enumerate(THING_IDS)}
        per_image: dict[str, list[tuple[int, Any]]] = defaultdict(list)
        for ann in annotations:
            if not ann.get("iscrowd"):
                per_image[names[ann["image_id"]]].append(
                    (index[ann["category_id"]], ann["segmentation"])
                )
        return dict(per_image)
