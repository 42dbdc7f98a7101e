"""Building blocks shared by the architectures in seglight.models."""

from seglight.nn.blocks import ConvNormAct, DoubleConv, init_weights, pad_or_crop_to, resize_to
from seglight.nn.encoders import EncoderWeightsError, TimmEncoder

__all__ = [
    "ConvNormAct",
    "DoubleConv",
    "EncoderWeightsError",
    "TimmEncoder",
    "init_weights",
    "pad_or_crop_to",
    "resize_to",
]
