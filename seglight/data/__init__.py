"""Datasets. Each module defines a SegmentationDataModule subclass; importing it registers it in
`DATASETS` (short name -> class)."""

from seglight.data.ade20k import ADE20K
from seglight.data.base import DATASETS, SegmentationDataModule, SegmentationDataset
from seglight.data.camvid import CamVid
from seglight.data.camvid_full import CamVidFull
from seglight.data.cityscapes import Cityscapes, CityscapesInstances
from seglight.data.coco import COCO, COCOInstances, COCOStuff
from seglight.data.folder import Folder
from seglight.data.folder_instances import FolderInstances
from seglight.data.nyudv2 import NYUDv2
from seglight.data.semi import SemiSupervised
from seglight.data.sunrgbd import SUNRGBD
from seglight.data.synthetic import Synthetic
from seglight.data.synthetic_instances import SyntheticInstances
from seglight.data.voc import VOC

__all__ = [
    "ADE20K",
    "COCO",
    "DATASETS",
    "SUNRGBD",
    "CamVid",
    "CamVidFull",
    "Cityscapes",
    "CityscapesInstances",
    "COCOInstances",
    "COCOStuff",
    "Folder",
    "FolderInstances",
    "NYUDv2",
    "SegmentationDataModule",
    "SegmentationDataset",
    "SemiSupervised",
    "Synthetic",
    "SyntheticInstances",
    "VOC",
]
