"""Building blocks shared by the architectures in seglight.models."""

from seglight.nn.blocks import (
    ConvNormAct,
    DoubleConv,
    FCNHead,
    classifier_conv,
    init_classifier,
    init_weights,
    pad_or_crop_to,
    pad_to_multiple,
    resize_to,
    unpad,
)
from seglight.nn.context import ASPP, KernelSharingASPP, PyramidPooling, SeparableConv2d
from seglight.nn.dense import DenseBlock, DenseLayer
from seglight.nn.encoders import EncoderWeightsError, TimmEncoder
from seglight.nn.vgg import VGG16, VGGFC, BilinearUpsample, bilinear_kernel, load_vgg16_weights

__all__ = [
    "ASPP",
    "bilinear_kernel",
    "BilinearUpsample",
    "ConvNormAct",
    "DenseBlock",
    "DenseLayer",
    "DoubleConv",
    "FCNHead",
    "EncoderWeightsError",
    "classifier_conv",
    "init_classifier",
    "init_weights",
    "KernelSharingASPP",
    "load_vgg16_weights",
    "pad_or_crop_to",
    "pad_to_multiple",
    "PyramidPooling",
    "resize_to",
    "SeparableConv2d",
    "TimmEncoder",
    "unpad",
    "VGG16",
    "VGGFC",
]
