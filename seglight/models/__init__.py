"""Architectures. Each module defines a plain nn.Module network and its SegmentationModel
subclass; importing it registers the latter in `MODELS` (short name -> class)."""

from seglight.models.base import MODELS, SegmentationModel
from seglight.models.bisenetv2 import BiSeNetV2, BiSeNetV2Network
from seglight.models.ddrnet import DDRNet, DDRNetNetwork
from seglight.models.deeplab_vgg import DeepLabASPP, DeepLabLargeFOV, DeepLabVGGNetwork
from seglight.models.deeplabv3 import DeepLabV3, DeepLabV3Plus, DeepLabV3PlusNetwork
from seglight.models.dpt import DPT, DPTNetwork
from seglight.models.enet import ENet, ENetNetwork
from seglight.models.fcdensenet import FCDenseNet56, FCDenseNet67, FCDenseNet103, FCDenseNetNetwork
from seglight.models.fcn import FCN8s, FCN16s, FCN32s, FCNNetwork
from seglight.models.gcn import GCN, GCNNetwork
from seglight.models.gfrnet import GFRNet, GFRNetNetwork
from seglight.models.hrnet_ocr import HRNetOCR, HRNetOCRNetwork
from seglight.models.ksac import KSAC
from seglight.models.linear_probe import LinearProbe, LinearProbeNetwork
from seglight.models.linknet import LinkNet, LinkNetNetwork
from seglight.models.mask2former import Mask2Former, Mask2FormerNetwork
from seglight.models.maskrcnn import MaskRCNN, MaskRCNNNetwork
from seglight.models.pspnet import PSPNet, PSPNetNetwork
from seglight.models.refinenet import RefineNet, RefineNetNetwork
from seglight.models.segformer import SegFormer, SegFormerNetwork
from seglight.models.segnet import SegNet, SegNetBasic, SegNetBasicNetwork, SegNetNetwork
from seglight.models.unet import UNet, UNetNetwork
from seglight.models.upernet import UPerNet, UPerNetNetwork

__all__ = [
    "BiSeNetV2",
    "BiSeNetV2Network",
    "DDRNet",
    "DDRNetNetwork",
    "DeepLabASPP",
    "DeepLabLargeFOV",
    "DeepLabV3",
    "DeepLabV3Plus",
    "DeepLabV3PlusNetwork",
    "DeepLabVGGNetwork",
    "DPT",
    "DPTNetwork",
    "ENet",
    "ENetNetwork",
    "FCDenseNet103",
    "FCDenseNet56",
    "FCDenseNet67",
    "FCDenseNetNetwork",
    "FCN16s",
    "FCN32s",
    "FCN8s",
    "FCNNetwork",
    "GCN",
    "GCNNetwork",
    "GFRNet",
    "GFRNetNetwork",
    "HRNetOCR",
    "HRNetOCRNetwork",
    "KSAC",
    "LinearProbe",
    "LinearProbeNetwork",
    "LinkNet",
    "LinkNetNetwork",
    "Mask2Former",
    "Mask2FormerNetwork",
    "MaskRCNN",
    "MaskRCNNNetwork",
    "MODELS",
    "PSPNet",
    "PSPNetNetwork",
    "RefineNet",
    "RefineNetNetwork",
    "SegFormer",
    "SegFormerNetwork",
    "SegmentationModel",
    "SegNet",
    "SegNetBasic",
    "SegNetBasicNetwork",
    "SegNetNetwork",
    "UNet",
    "UPerNet",
    "UPerNetNetwork",
    "UNetNetwork",
]
