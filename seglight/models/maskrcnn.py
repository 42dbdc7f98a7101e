"""Mask R-CNN (He, Gkioxari, Dollár and Girshick, "Mask R-CNN", ICCV 2017), on torchvision.

The network is torchvision's Mask R-CNN in its "v2" recipe (maskrcnn_resnet50_fpn_v2, after Li
et al., "Benchmarking Detection Transfer Learning with Vision Transformers", 2021): ResNet-50-FPN,
BatchNorm in the FPN and the heads, a two-convolution RPN head, a 4-conv + 1-fc box head and a
4-conv mask head, RoIAlign (7x7 boxes, 14x14 masks, 28x28 mask targets), 512 sampled RoIs per
image. Its COCO weights (torchvision's model card: 46.4M parameters, 47.4 box AP and 41.8 mask AP
on COCO val2017; the paper's ResNet-50-FPN: 33.6 mask AP, Table 2a) load from a local file
(`weights`). Where the paper and torchvision differ, torchvision's code is followed: the v2 heads
above (the paper: a 2-fc box head, no BatchNorm) and the loss (the sum of its five terms, as in
the paper's L = L_cls + L_box + L_mask plus the RPN's two terms).

Any timm model can replace ResNet-50 (`encoder`): an FPN (256 channels, BatchNorm, max-pooled
extra level, as torchvision's) is built over its last four feature levels of stride >= 4, with
anchor sizes 8 x stride per level (32..512 for strides 4..64, as for ResNet-50-FPN).

The instance -> semantic bridge (`instances_to_semantic`): every instance model also gives a
semantic map, so it is scored by the same val/mIoU, per-class IoU and compare tables as every
other model. Class c's score at a pixel is the maximum over the detected instances of class c
(score >= semantic_score_thresh) of score x mask probability, where that probability is >=
mask_threshold; the background's score is 1 where no instance is, else 0. `forward(image)`
returns these scores [B, num_classes, H, W] at the input's size.

Deviation from the official COCO evaluation: crowd regions are not in the targets (the data
excludes them), so a detection on a crowd counts as a false positive where COCOeval would ignore
it; AP on COCO val2017 is therefore slightly lower than the official figure.

Data: class 0 is the background (torchvision's convention too); the DataModule must carry
instances (COCOInstances, CityscapesInstances, FolderInstances, SyntheticInstances). Images
arrive normalised by the DataModule, so the detector's own normalisation is the identity; it
resizes images to `min_size` / `max_size` (the paper: shorter side 800, longer at most 1333) and
maps its outputs back.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNConvFCHead, RPNHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.resnet import resnet50
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from seglight.errors import ConfigError
from seglight.models.base import SegmentationModel
from seglight.nn.encoders import TimmEncoder

#: where torchvision publishes the weights `weights` expects (never downloaded here)
COCO_WEIGHTS_URL = "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth"
#: the predictor tensors whose rows are per class (re-mapped or re-initialised on loading)
PREDICTOR_KEYS = (
    "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.box_predictor.cls_score.bias",
    "roi_heads.box_predictor.bbox_pred.weight",
    "roi_heads.box_predictor.bbox_pred.bias",
    "roi_heads.mask_predictor.mask_fcn_logits.weight",
    "roi_heads.mask_predictor.mask_fcn_logits.bias",
)
#: torchmetrics' key -> our suffix (val/mask_mAP, val/mask_mAP50, ..., val/bbox_mAP_large)
MAP_KEYS = {
    "map": "",
    "map_50": "50",
    "map_75": "75",
    "map_small": "_small",
    "map_medium": "_medium",
    "map_large": "_large",
}


def instances_to_semantic(
    masks: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    num_classes: int,
    mask_threshold: float = 0.5,
    score_threshold: float = 0.5,
) -> torch.Tensor:
    """Semantic scores [num_classes, H, W] of one image's instances.

    Args:
        masks: mask probabilities [N, H, W] or [N, 1, H, W] (torchvision's output).
        labels: class indices int64 [N] in 1..num_classes-1 (0 is the background).
        scores: detection scores [N].
    Class c >= 1 at a pixel: max over instances i of class c with scores[i] >= score_threshold
    and masks[i] >= mask_threshold there of scores[i] * masks[i]; 0 where there is none. Class 0:
    1 where no class has a positive score, else 0. The argmax is the semantic prediction.
    """
    h, w = masks.shape[-2:]
    out = torch.zeros((num_classes, h, w), dtype=torch.float32, device=masks.device)
    keep = scores >= score_threshold
    if not keep.any():
        out[0] = 1.0
        return out
    probs = masks[keep].reshape(-1, h, w).float()
    values = torch.where(probs >= mask_threshold, probs * scores[keep].float().view(-1, 1, 1), 0.0)
    labels = labels[keep]
    for c in labels.unique().tolist():  # a few classes per image: one max each
        out[c] = values[labels == c].amax(0)
    # the background where no instance is: from the N kept instances, not the C class maps
    out[0] = (values.amax(0) <= 0).float()
    return out


class TimmFPNBackbone(nn.Module):
    """A timm encoder's last four feature levels of stride >= 4 through an FPN.

    Shapes: [B, C, H, W] -> OrderedDict of [B, 256, H/s, W/s] for each level ("0", "1", ...)
    and "pool" (a max-pooled level of twice the last stride). Attributes: `out_channels` (what
    torchvision's detectors read), `strides` (of the levels, "pool" included), `body` (the
    encoder)."""

    def __init__(
        self, name: str, weights: str | None, in_channels: int, out_channels: int = 256
    ) -> None:
        super().__init__()
        self.body = TimmEncoder(name, weights, in_channels)
        self.levels = [i for i, r in enumerate(self.body.reductions) if r >= 4][-4:]
        if not self.levels:
            raise ConfigError(f"encoder {name!r} has no feature level of stride >= 4 for an FPN")
        self.fpn = FeaturePyramidNetwork(
            [self.body.channels[i] for i in self.levels],
            out_channels,
            extra_blocks=LastLevelMaxPool(),
            norm_layer=nn.BatchNorm2d,
        )
        self.out_channels = out_channels
        last = self.body.reductions[self.levels[-1]]
        self.strides = [self.body.reductions[i] for i in self.levels] + [2 * last]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(k), features[i]) for k, i in enumerate(self.levels)))


class MaskRCNNNetwork(nn.Module):
    """Mask R-CNN as a plain module (see the module docstring).

    Args:
        num_classes: classes including the background (index 0).
        in_channels: image channels (the ResNet-50 stem is replaced when not 3).
        encoder: "resnet50" (torchvision's ResNet-50-FPN v2) or a timm model name.
        encoder_weights: a timm encoder's weights (see seglight.nn.encoders); null for none.
        min_size, max_size: the detector resizes each image so that its shorter side is
            min_size and its longer at most max_size, and maps its outputs back.
        box_score_thresh: detections below this score are dropped (0.05: COCO evaluation).
        detections_per_img: at most this many detections per image.
        mask_threshold: a mask probability at or above this is inside the instance.
        semantic_score_thresh: detections below this score are not painted into the semantic map.
        trainable_backbone_layers: ResNet-50 stages (0..5) that are trained (default: 5 from
            scratch, 3 with COCO weights, as torchvision).
        pretrained: whether COCO weights will be loaded (for the trainable-layers default).
        detector_options: further options of torchvision's MaskRCNN by their names, e.g.
            {rpn_post_nms_top_n_test: 300, box_batch_size_per_image: 128} (cheaper heads).

    forward(images [B, C, H, W], targets=None): in training, with targets (a list of {"boxes",
    "labels", "masks"}), torchvision's loss dict; otherwise {"out": semantic scores [B,
    num_classes, H, W], "detections": [{"boxes" [N, 4], "labels" [N], "scores" [N], "masks" [N, 1,
    H, W] probabilities}]}.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str = "resnet50",
        encoder_weights: str | None = None,
        min_size: int = 800,
        max_size: int = 1333,
        box_score_thresh: float = 0.05,
        detections_per_img: int = 100,
        mask_threshold: float = 0.5,
        semantic_score_thresh: float = 0.5,
        trainable_backbone_layers: int | None = None,
        pretrained: bool = False,
        detector_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(
                f"Mask R-CNN needs the background and at least one object class, got "
                f"num_classes={num_classes}"
            )
        self.num_classes = num_classes
        self.mask_threshold = mask_threshold
        self.semantic_score_thresh = semantic_score_thresh
        if encoder == "resnet50":
            if encoder_weights not in (None, "none"):
                raise ConfigError(
                    "encoder resnet50 is torchvision's ResNet-50-FPN: load its COCO weights with "
                    "`weights: PATH`; encoder_weights is for timm encoders"
                )
            layers = trainable_backbone_layers
            layers = (3 if pretrained else 5) if layers is None else layers
            if not 0 <= layers <= 5:
                raise ConfigError(f"trainable_backbone_layers must be in 0..5, got {layers}")
            backbone = _resnet_fpn_extractor(resnet50(), layers, norm_layer=nn.BatchNorm2d)
            if in_channels != 3:
                backbone.body.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            strides = [4, 8, 16, 32, 64]
        else:
            backbone = TimmFPNBackbone(encoder, encoder_weights, in_channels)
            strides = backbone.strides
        anchors = AnchorGenerator(
            tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides)
        )
        levels = [str(k) for k in range(len(strides) - 1)]  # "pool" is for the RPN only
        channels = backbone.out_channels
        heads = {
            "rpn_anchor_generator": anchors,
            "rpn_head": RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2),
            "box_roi_pool": MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
            "box_head": FastRCNNConvFCHead(
                (channels, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d
            ),
            "mask_roi_pool": MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
            "mask_head": MaskRCNNHeads(
                channels, [256, 256, 256, 256], 1, norm_layer=nn.BatchNorm2d
            ),
        }
        known = {
            *inspect.signature(TorchvisionMaskRCNN.__init__).parameters,
            *inspect.signature(FasterRCNN.__init__).parameters,
        } - {"self", "kwargs", "backbone", "num_classes"}
        unknown = sorted(set(detector_options or {}) - known)
        if unknown:  # torchvision would ignore them silently
            raise ConfigError(
                f"detector_options: unknown option(s) {unknown}; torchvision's MaskRCNN takes "
                f"{', '.join(sorted(known))}"
            )
        try:
            self.detector = TorchvisionMaskRCNN(
                backbone,
                num_classes=num_classes,
                min_size=min_size,
                max_size=max_size,
                image_mean=[0.0] * in_channels,  # the DataModule normalises
                image_std=[1.0] * in_channels,
                box_score_thresh=box_score_thresh,
                box_detections_per_img=detections_per_img,
                **heads,
                **(detector_options or {}),
            )
        except TypeError as e:  # a name in detector_options that is also set here
            raise ConfigError(f"detector_options: {e} (see torchvision's MaskRCNN)") from e

    @property
    def encoder(self) -> nn.Module:
        """The backbone (a property, not a second registration: its weights are saved once)."""
        return self.detector.backbone.body

    def forward(
        self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None
    ) -> dict[str, Any]:
        if self.training:
            if targets is None:
                raise ConfigError(
                    "Mask R-CNN trains on instance targets: call the network with targets (a "
                    "list of {boxes, labels, masks}), or put it in eval mode to predict"
                )
            return self.detector(list(images), targets)
        detections = self.detector(list(images))
        semantic = torch.stack(
            [
                instances_to_semantic(
                    d["masks"],
                    d["labels"],
                    d["scores"],
                    self.num_classes,
                    self.mask_threshold,
                    self.semantic_score_thresh,
                )
                for d in detections
            ]
        )
        return {"out": semantic, "detections": detections}


def check_weights_path(path: str | Path) -> Path:
    """`path` as a Path, or a one-line ConfigError when there is no such file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"weights: no such file {str(path)!r}; seglight never downloads weights: fetch "
            f"torchvision's COCO weights once ({COCO_WEIGHTS_URL}) and pass the local file"
        )
    return path


def load_coco_weights(detector: nn.Module, path: str | Path, class_names: list[str]) -> list[str]:
    """Load torchvision's COCO Mask R-CNN v2 state dict from a local file into `detector`.

    The per-class predictor rows of classes whose name is a COCO category (torchvision's 91-entry
    list, background included) are copied to this model's class order; the other classes' rows
    keep their initialisation (for fine-tuning). Anything else missing, unexpected or mis-shaped
    is an error naming the file. Returns the class names that got COCO rows."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights

    path = check_weights_path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ConfigError(f"weights: cannot read {str(path)!r}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # torchvision's training-reference checkpoints
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights: {str(path)!r} does not hold a state dict")
    own = detector.state_dict()
    body = {k: v for k, v in state.items() if k not in PREDICTOR_KEYS}
    missing = [k for k in own if k not in PREDICTOR_KEYS and k not in body]
    unexpected = [k for k in body if k not in own]
    mismatched = [k for k in body if k in own and body[k].shape != own[k].shape]
    absent = [k for k in PREDICTOR_KEYS if k not in state]
    if missing or unexpected or mismatched or absent:
        shown = missing + unexpected + mismatched + absent
        raise ConfigError(
            f"weights: {str(path)!r} is not a state dict of torchvision's Mask R-CNN "
            f"ResNet-50-FPN v2 ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(mismatched)} mis-shaped, e.g. {', '.join(shown[:3])})"
        )
    coco = list(MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.meta["categories"])
    rows = {k: coco.index(name) for k, name in enumerate(class_names) if name in coco}
    rows[0] = 0  # the background
    for key in PREDICTOR_KEYS:
        target = own[key].clone()
        per_class = 4 if "bbox_pred" in key else 1  # box deltas: 4 rows per class
        for ours, theirs in rows.items():
            target[ours * per_class : (ours + 1) * per_class] = state[key][
                theirs * per_class : (theirs + 1) * per_class
            ]
        body[key] = target
    detector.load_state_dict(body)
    return [class_names[k] for k in sorted(rows) if k > 0]


class MaskRCNN(SegmentationModel):
    """Mask R-CNN (He et al., ICCV 2017) on torchvision's ResNet-50-FPN v2, or a timm encoder.

    Trains on instance data (COCOInstances, CityscapesInstances, FolderInstances,
    SyntheticInstances) with the sum of torchvision's loss dict (each term logged:
    train/loss_classifier, train/loss_box_reg, train/loss_mask, train/loss_objectness,
    train/loss_rpn_box_reg); is scored by the semantic metrics of every model (val/mIoU, ...
    from `instances_to_semantic`) and by COCO box and mask AP (val/mask_mAP, val/mask_mAP50, val/mask_mAP75, val/mask_mAP_small/medium/large, the same
    as val/bbox_*; per class at test: test/mask_AP/<class>), torchmetrics' MeanAveragePrecision
    with the pycocotools backend, over the images of every DDP rank. The semantic-loss options of the base
    model (loss, class_weights, aux_weight, ...) do not apply.

    Args:
        encoder: "resnet50" (torchvision's ResNet-50-FPN v2) or any timm model name (an FPN over
            its feature pyramid).
        encoder_weights: weights of a timm encoder (null, "imagenet", a file or a URL).
        weights: a local file with torchvision's COCO weights of maskrcnn_resnet50_fpn_v2
            (state dict; encoder resnet50, 3 channels); classes named as COCO categories start
            from COCO's predictor rows. Never downloaded.
        min_size, max_size: the detector's own resizing (shorter side, longer side at most).
        box_score_thresh: minimum detection score (0.05 for COCO evaluation).
        detections_per_img: maximum detections per image (100 for COCO evaluation).
        mask_threshold: mask probability threshold (binary masks, the semantic map).
        semantic_score_thresh: minimum score of a detection painted into the semantic map.
        trainable_backbone_layers: trained ResNet-50 stages, 0..5 (default: 5, or 3 with weights).
        detector_options: further options of torchvision's MaskRCNN by name (e.g.
            rpn_post_nms_top_n_test: 300, box_batch_size_per_image: 128: cheaper heads on a CPU).
        **kwargs: optimiser, schedule, EMA, ...: see SegmentationModel.
    """

    #: trained from instance targets by its own training_step, not from logits and a semantic
    #: mask: the registry's generic loss-from-logits test skips it (tests/test_models.py)
    instance_model: ClassVar[bool] = True
    #: the best checkpoint is the best COCO mask AP (val/mIoU scores only the painted semantic map)
    checkpoint_monitor: ClassVar[tuple[str, str]] = ("val/mask_mAP", "max")

    def __init__(
        self,
        encoder: str = "resnet50",
        encoder_weights: str | None = None,
        weights: str | None = None,
        min_size: int = 800,
        max_size: int = 1333,
        box_score_thresh: float = 0.05,
        detections_per_img: int = 100,
        mask_threshold: float = 0.5,
        semantic_score_thresh: float = 0.5,
        trainable_backbone_layers: int | None = None,
        detector_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not self.inference.is_plain:
            raise ConfigError(
                "MaskRCNN predicts whole images: the inference recipes (sliding window, "
                "test-time augmentation, CRF) do not apply; leave model.inference unset"
            )
        if weights is not None and (encoder != "resnet50" or self.in_channels != 3):
            raise ConfigError(
                "weights: torchvision's COCO weights are for encoder resnet50 on 3-channel images"
            )
        if weights is not None:
            check_weights_path(weights)  # before building the network: fail fast
        self.net = MaskRCNNNetwork(
            self.num_classes,
            self.in_channels,
            encoder=encoder,
            encoder_weights=encoder_weights,
            min_size=min_size,
            max_size=max_size,
            box_score_thresh=box_score_thresh,
            detections_per_img=detections_per_img,
            mask_threshold=mask_threshold,
            semantic_score_thresh=semantic_score_thresh,
            trainable_backbone_layers=trainable_backbone_layers,
            pretrained=weights is not None,
            detector_options=detector_options,
        )
        if weights is not None:
            load_coco_weights(self.net.detector, weights, self.class_names)
        self.instance_metrics = nn.ModuleDict(
            {stage: _mean_ap(class_metrics=stage == "test") for stage in ("val", "test")}
        )

    # ----------------------------------------------------------------------------- training
    def compute_loss(self, output: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """The sum of torchvision's loss dict (`output`); the semantic mask is not used."""
        return sum(output.values(), torch.zeros((), device=mask.device))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.net(self._input(batch), self._targets(batch))
        loss = self.compute_loss(losses, batch["mask"])
        n = len(batch["mask"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=n)
        self.log_dict(
            {f"train/{k}": v.detach() for k, v in losses.items()},
            on_step=True,
            on_epoch=True,
            batch_size=n,
        )
        return loss

    def _targets(self, batch: dict) -> list[dict[str, torch.Tensor]]:
        instances = batch.get("instances")
        if instances is None:
            raise ConfigError(
                "MaskRCNN trains on instance data, whose batches carry `instances`: use "
                "COCOInstances, CityscapesInstances, FolderInstances or SyntheticInstances as --data"
            )
        return [
            {"boxes": t["boxes"], "labels": t["labels"], "masks": t["masks"]} for t in instances
        ]

    # ----------------------------------------------------------------------------- evaluation
    def _detect(self, batch: dict) -> dict[str, Any]:
        """{"out": semantic scores [B, C, H, W], "detections": [...]} (the EMA weights when set)."""
        net = self.ema.module if self.ema is not None and not self.training else self.net
        return net(self._input(batch))

    def predict_scores(self, batch: dict, stage: str = "predict") -> torch.Tensor:
        return self._detect(batch)["out"]

    def _eval_step(self, batch: dict, stage: str) -> dict:
        out = self._detect(batch)
        pred = out["out"].argmax(1)
        self.metrics[stage].update(pred, batch["mask"])
        if batch.get("instances") is not None:
            self.instance_metrics[stage].update(
                [self._binary(d) for d in out["detections"]],
                [
                    # area: the mask's, for both box and mask AP, as COCO's annotations give it
                    {
                        "boxes": t["boxes"],
                        "labels": t["labels"],
                        "masks": t["masks"].bool(),
                        "area": t["masks"].flatten(1).sum(1).float(),
                    }
                    for t in batch["instances"]
                ],  # fmt: skip
            )
        return {"pred": pred}

    def _binary(self, detection: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A detection with binary masks [N, H, W] (the threshold torchvision's COCO evaluation
        applies too)."""
        masks = detection["masks"][:, 0] >= self.hparams.mask_threshold
        return {**{k: detection[k] for k in ("boxes", "labels", "scores")}, "masks": masks}

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """{"pred": int64 labels [B, H, W], "name": names, "instances": per image {"boxes",
        "labels", "scores", "masks" bool [N, H, W]} of the detections painted into "pred"}."""
        out = self._detect(batch)
        instances = []
        for d in out["detections"]:
            d = self._binary(d)
            keep = d["scores"] >= self.hparams.semantic_score_thresh
            instances.append({k: v[keep] for k, v in d.items()})
        return {"pred": out["out"].argmax(1), "name": batch.get("name"), "instances": instances}

    def _log_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        logs = super()._log_metrics(stage)
        metric = self.instance_metrics[stage]
        if not metric.groundtruth_labels and not metric.detection_labels:
            return logs  # nothing to score (e.g. data without instances)
        _gather_states(metric)  # every rank now holds every image's detections and targets
        values = metric.compute()
        metric.reset()
        ap: dict[str, torch.Tensor] = {}
        for iou, name in (("segm", "mask"), ("bbox", "bbox")):
            for key, suffix in MAP_KEYS.items():
                ap[f"{stage}/{name}_mAP{suffix}"] = _undefined_to_nan(values[f"{iou}_{key}"])
            per_class = values.get(f"{iou}_map_per_class")
            if per_class is not None and per_class.ndim == 1 and len(per_class) > 0:
                for c, v in zip(values["classes"].tolist(), per_class, strict=True):
                    ap[f"{stage}/{name}_AP/{self.class_names[c]}"] = _undefined_to_nan(v)
        ap = {k: v.float().to(self.device) for k, v in ap.items()}
        self.log_dict(ap, sync_dist=False)  # identical on every rank already
        return {**logs, **ap}

    def print_table(self, stage: str, logs: dict[str, torch.Tensor]) -> None:
        """The semantic table, then COCO AP (box and mask) per class and overall."""
        super().print_table(stage, logs)
        if not self.trainer.is_global_zero or f"{stage}/mask_mAP" not in logs:
            return
        from rich.console import Console
        from rich.table import Table

        def pct(key: str) -> str:
            v = float(logs.get(key, float("nan")))
            return "-" if math.isnan(v) else f"{100 * v:.2f}"

        table = Table(title=f"{stage} COCO AP ({type(self).__name__})")
        for column in ("class", "mask AP %", "box AP %"):
            table.add_column(column, justify="left" if column == "class" else "right")
        for name in self.class_names[1:]:
            if f"{stage}/mask_AP/{name}" in logs:
                table.add_row(name, pct(f"{stage}/mask_AP/{name}"), pct(f"{stage}/bbox_AP/{name}"))
        table.add_section()
        for suffix in MAP_KEYS.values():
            table.add_row(
                f"[bold]AP{suffix.replace('_', ' ')}",
                pct(f"{stage}/mask_mAP{suffix}"),
                pct(f"{stage}/bbox_mAP{suffix}"),
            )
        Console().print(table)
        self._log_ap_table(stage, logs)

    def _log_ap_table(self, stage: str, logs: dict[str, torch.Tensor]) -> None:
        """Per-class AP as a W&B table `<stage>/per_class_AP`, when a W&B logger is active."""
        from seglight.callbacks.wandb import _wandb_active

        rows = [
            [name, float(logs[f"{stage}/mask_AP/{name}"]), float(logs[f"{stage}/bbox_AP/{name}"])]
            for name in self.class_names[1:]
            if f"{stage}/mask_AP/{name}" in logs
        ]
        for logger in self.trainer.loggers:
            if rows and _wandb_active(logger):
                logger.log_table(
                    f"{stage}/per_class_AP", columns=["class", "mask AP", "box AP"], data=rows
                )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule if self._trainer is not None else None
        if stage == "fit" and dm is not None and not getattr(dm, "has_instances", False):
            raise ConfigError(
                f"MaskRCNN trains on instance data; {type(dm).__name__} has no instances: use "
                "COCOInstances, CityscapesInstances, FolderInstances or SyntheticInstances as --data"
            )


def _mean_ap(class_metrics: bool) -> nn.Module:
    """torchmetrics' MeanAveragePrecision with COCOeval's own thresholds: its defaults come from
    a float32 linspace (0.550000011920929, ...), which flips matches whose IoU is exactly a
    threshold (common for masks on a pixel grid) and then differs from COCOeval."""
    import numpy as np
    from torchmetrics.detection import MeanAveragePrecision

    return MeanAveragePrecision(
        box_format="xyxy",
        iou_type=("bbox", "segm"),
        iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(),  # as pycocotools' Params
        rec_thresholds=np.linspace(0.0, 1.0, 101).tolist(),
        backend="pycocotools",
        class_metrics=class_metrics,
        sync_on_compute=False,  # _gather_states does it: ranks may hold different image counts
    )


def _gather_states(metric: nn.Module) -> None:
    """Concatenate the metric's list states (one entry per image) over the DDP ranks, on every
    rank. torchmetrics' own sync gathers list entries one by one, which needs the same number
    of images on every rank; seglight's evaluation sampler gives ranks uneven shares (no sample
    is repeated), so its collectives would not match."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    names = list(metric._defaults)
    local = {
        name: [x.cpu() if isinstance(x, torch.Tensor) else x for x in getattr(metric, name)]
        for name in names
    }
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    device = metric.device
    for name in names:
        setattr(
            metric,
            name,
            [
                x.to(device) if isinstance(x, torch.Tensor) else x
                for rank in gathered
                for x in rank[name]
            ],
        )


def _undefined_to_nan(value: torch.Tensor) -> torch.Tensor:
    """COCOeval reports -1 where an AP is undefined (no ground truth of that class or size)."""
    value = value.float()
    return torch.where(value < 0, torch.full_like(value, float("nan")), value)
