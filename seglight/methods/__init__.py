"""Training methods that are more than one network and one loss (semi- and weakly supervised).

Each is a SegmentationModel subclass (seglight.methods.base.SemiSupervisedModel), so importing
its module registers it in seglight.models.MODELS: `model: MeanTeacher` works like `model: UNet`.
"""

from seglight.methods.advsemiseg import AdvSemiSeg
from seglight.methods.base import SemiSupervisedModel, build_network
from seglight.methods.cps import CPS
from seglight.methods.decoupled import DecoupledNet
from seglight.methods.fixmatch import FixMatch
from seglight.methods.gansemiseg import GANSemiSeg
from seglight.methods.mean_teacher import MeanTeacher

__all__ = [
    "AdvSemiSeg",
    "CPS",
    "DecoupledNet",
    "FixMatch",
    "GANSemiSeg",
    "MeanTeacher",
    "SemiSupervisedModel",
    "build_network",
]
