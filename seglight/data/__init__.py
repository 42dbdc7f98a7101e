"""Datasets. Each module defines a SegmentationDataModule subclass; importing it registers it in
`DATASETS` (short name -> class)."""

from seglight.data.base import DATASETS, SegmentationDataModule, SegmentationDataset
from seglight.data.camvid import CamVid
from seglight.data.synthetic import Synthetic

__all__ = ["DATASETS", "CamVid", "SegmentationDataModule", "SegmentationDataset", "Synthetic"]
