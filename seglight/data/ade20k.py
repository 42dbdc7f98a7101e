"""ADE20K as the MIT Scene Parsing Benchmark (SceneParsing 2016; Zhou et al., CVPR 2017): 150
classes.

Layout under `root`, as ADEChallengeData2016.zip unpacks into it:

    ADEChallengeData2016/
        images/training/ADE_train_<8 digits>.jpg            20,210
        images/validation/ADE_val_<8 digits>.jpg             2,000
        annotations/training/ADE_train_<8 digits>.png       single-channel, values 0..150
        annotations/validation/ADE_val_<8 digits>.png

Annotation value 0 is "other objects" (unlabelled) and 1..150 are the classes of objectInfo150
(wall, building, sky, ...). As everywhere ("reduce zero label"), 0 is ignored (-> 255) and 1..150
become 0..149. The class names are objectInfo150's first names; the palette is the one
mmsegmentation uses (the benchmark defines none). The test images (release_test.zip) have no
labels and are not handled; report results on validation.

`download: true` fetches ADEChallengeData2016.zip (923 MB) from the benchmark's host
(data.csail.mit.edu), checks its sha1 (as published in GluonCV's ADE20K download script) and
extracts it into `root`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from seglight.data.base import SegmentationDataModule, SegmentationDataset, dataset_root, find_pairs
from seglight.data.utils import shift_labels
from seglight.errors import DataError

BASE = "ADEChallengeData2016"
URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
SHA1 = "sha1:219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"
SPLIT_DIRS = {"train": "training", "val": "validation"}
SPLIT_SIZES = {"train": 20210, "val": 2000}


class ADE20K(SegmentationDataModule):
    """ADE20K (SceneParsing 2016): 150 classes, 20,210 train / 2,000 val; label 0 ignored.

    Annotation values 1..150 become classes 0..149 ("reduce zero label"). Files:
    root/ADEChallengeData2016/{images,annotations}/{training,validation}/ (see the module
    docstring).

    Args:
        root: the folder holding ADEChallengeData2016/ (default: $SEGLIGHT_DATA/ade20k, else
            ./data/ade20k).
        download: fetch and extract the official archive (923 MB) into `root` if it is not there.
        crop_size: training crop (H, W) after random scaling (images vary, about 512 on the
            short side).
        predict_split: the split `predict` runs on.
        **kwargs: batch size, workers and augmentation: see SegmentationDataModule.
    """

    class_names: ClassVar[tuple[str, ...]] = (
        "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
        "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
        "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
        "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
        "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers",
        "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
        "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
        "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book",
        "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
        "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
        "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
        "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
        "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
        "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
        "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
        "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
        "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan",
        "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
        "glass", "clock", "flag",
    )  # fmt: skip
    # mmsegmentation's colours, as published (road and skyscraper share (140, 140, 140))
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = (
        (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
        (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
        (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82),
        (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250),
        (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
        (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71),
        (255, 41, 10), (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
        (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255),
        (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15), (20, 255, 0),
        (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255), (255, 71, 0),
        (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245),
        (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0),
        (194, 255, 0), (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173),
        (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245),
        (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184), (0, 31, 255), (0, 255, 61),
        (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82), (0, 10, 255), (0, 112, 255),
        (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10),
        (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
        (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255),
        (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160),
        (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163), (255, 204, 0), (255, 0, 143),
        (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255), (255, 0, 122), (255, 245, 0),
        (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255),
        (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
        (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255),
        (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
    )  # fmt: skip
    label_map = shift_labels(150)  # 0 -> 255, 1..150 -> 0..149
    splits: ClassVar[tuple[str, ...]] = ("train", "val")
    #: the official archive and its checksum (class attributes so a mirror can be set)
    url: ClassVar[str] = URL
    checksum: ClassVar[str | None] = SHA1

    def __init__(
        self,
        root: str | None = None,
        download: bool = False,
        crop_size: tuple[int, int] | None = (512, 512),
        predict_split: str = "val",
        **kwargs,
    ) -> None:
        super().__init__(crop_size=crop_size, predict_split=predict_split, **kwargs)
        self.root = dataset_root(root, "ade20k")
        self.download = download

    def _missing(self) -> list[str]:
        folders = [
            f"{BASE}/{kind}/{d}" for kind in ("images", "annotations") for d in SPLIT_DIRS.values()
        ]
        return [f for f in folders if not (self.root / f).is_dir()]

    def prepare_data(self) -> None:
        if self.download and self._missing():
            from seglight.data.download import download_and_extract

            self.root.mkdir(parents=True, exist_ok=True)
            download_and_extract(self.url, self.root, Path(self.url).name, self.checksum)
            if self._missing():
                raise DataError(
                    f"{self.root / Path(self.url).name} was extracted but "
                    f"{', '.join(self._missing())} is still missing: the archive does not have "
                    "the official layout"
                )

    def build_dataset(self, split: str, train: bool) -> SegmentationDataset:
        missing = self._missing()
        if missing:
            hint = "" if self.download else " or add --data.download true to fetch it"
            raise DataError(
                f"ADE20K not found at {str(self.root)!r}: missing folder(s) {', '.join(missing)} "
                f"(expected {BASE}/images/{{training,validation}}/*.jpg and "
                f"{BASE}/annotations/{{training,validation}}/*.png under root). Point "
                f"--data.root at the folder holding {BASE}/ (or set SEGLIGHT_DATA){hint}."
            )
        base = self.root / BASE
        folder = SPLIT_DIRS[split]
        pairs = find_pairs(base / "images" / folder, base / "annotations" / folder)
        transform = self.train_transform() if train else self.eval_transform()
        return SegmentationDataset(
            pairs, self.num_classes, transform, self.label_map, self.ignore_index
        )
