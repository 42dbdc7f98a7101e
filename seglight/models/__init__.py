"""Architectures. Each module defines a plain nn.Module network and its SegmentationModel
subclass; importing it registers the latter in `MODELS` (short name -> class)."""

from seglight.models.base import MODELS, SegmentationModel
from seglight.models.unet import UNet, UNetNetwork

__all__ = ["MODELS", "SegmentationModel", "UNet", "UNetNetwork"]
