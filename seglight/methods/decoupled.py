"""DecoupledNet (Hong, Noh and Han, NIPS 2015, "Decoupled Deep Neural Network for
Semi-supervised Semantic Segmentation").

Classification and segmentation are decoupled:
- a classification network (VGG16 conv1-pool5, fc6/fc7 as convolutions, a 1x1 class-score
  conv, global average pooling) is trained with image-level labels (multi-label BCE), which are
  plentiful: every training image, labelled or not, has them;
- bridge layers turn the class-specific activation map of a class l -- the gradient of class
  l's score with respect to pool5, as the released code computes it by back-propagating the
  class score (its `*-bp` layers with the transposed weights of the classifier) -- and the pool5
  features into a class-specific input: BN(pool5) || BN(activation) -> 7x7 conv -> 1x1 conv ->
  7x7 conv (BN-ReLU after each);
- a figure-ground (2-class) decoder, SegNet-style (max-unpooling with pool1..pool5's indices,
  each followed by the mirrored 3x3 conv-BN-ReLU layers), trained on the few pixel-labelled
  images: each training sample is one image and one class present in its mask, whose pixels are
  the figure (the released `SELECT_SEG_BINARY` data layer).

Inference runs the decoder once per class the classifier detects (sigmoid score > 0.5) and
takes, per pixel, the class whose figure probability is highest; with a background class (VOC's
0) a pixel is background where no detected class's figure probability exceeds its ground
probability, i.e. background score = 1 - max_l figure_l.

Paper numbers (Table 2, VOC 2012 test, mean IoU, image-level labels for all 10,582 images plus
5 / 10 / 25 strong annotations per class): 54.7 / 58.7 / 62.5.

Follows the released code (HyeonwooNoh/DecoupledNet, training/00*_train_seg_*_anno.prototxt,
inference/DecoupledNet_inference.m) where the paper is open:
- the class score that is back-propagated is the max over the score map (the released `avg-pool`
  layer that feeds the bp branch is a MAX pooling) scaled by the sigmoid of the class's score
  (`cls-score-masked`), and the gradient is not propagated back into the classifier (its bp
  weights are fixed);
- the class score of the classifier (BCE, detection) is the global average of the score map
  (the classifier was fine-tuned "with avg pool");
- one class per labelled image per step (`classes_per_image`, default 1).
Deviations:
- no ImageNet pretraining is available here and the paper trains the classifier first and then
  freezes it; here both are trained jointly from scratch in one run, and by default the
  segmentation loss also trains the encoder through the pool5 features (`segmentation_trains_encoder`;
  False reproduces the paper's frozen features);
- the encoder is VGG16 with BatchNorm, optionally narrower (`width`), instead of VGG16;
- fc6 / fc7 have 1024 channels and the bridge 512 by default (the paper's network has 4096 and
  2048: `fc_channels: 4096, bridge_channels: 2048`), which cuts its 307M parameters to 94M;
- the bridge's 7x7 convolutions use "same" padding, so any input size works (the released net is
  fixed to 320x320 inputs, where fc6 is a valid 7x7 conv and the bridge a deconv back to 10x10);
- inference derives the background from the per-class passes instead of one more decoder pass
  with all detected classes (released code), so the decoder runs exactly once per detected class;
  without a background class (CamVid), every pixel takes a detected class, and an image on which
  nothing is detected takes its best-scoring class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from seglight.errors import ConfigError
from seglight.models.base import SegmentationModel
from seglight.models.segnet import DecoderUpsample
from seglight.nn import VGGFC, ConvNormAct, init_weights
from seglight.nn.vgg import VGG16, VGG16_CHANNELS, VGG16_DEPTHS, load_vgg16_weights


class DecoupledNetNetwork(nn.Module):
    """DecoupledNet as a plain nn.Module.

    Args:
        num_classes: classes of the segmentation, background included when there is one.
        in_channels: image channels.
        background_index: the background class (VOC: 0), which the classifier does not score and
            which takes the pixels no figure-ground map claims; None when every pixel has an
            object class (CamVid).
        width: channels of the first VGG16 stage (64 = VGG16; stages are width x 1, 2, 4, 8, 8).
        fc_channels: channels of the classifier's fc6 / fc7 (VGG16's and the paper's 4096;
            1024 by default, as DeepLab-LargeFOV's reduced fc layers).
        bridge_channels: channels of the bridge's two first convolutions (the released code's
            2048; 512 by default).
        threshold: detection threshold on the sigmoid class scores (0.5, released code).
        encoder_weights: null, "imagenet", a file or a URL (timm's vgg16_bn; width 64 only).

    `forward(image)` returns log-probabilities [B, num_classes, H, W] (see `segment`).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        background_index: int | None = None,
        width: int = 64,
        fc_channels: int = 1024,
        bridge_channels: int = 512,
        threshold: float = 0.5,
        encoder_weights: str | None = None,
    ) -> None:
        super().__init__()
        if background_index is not None and not 0 <= background_index < num_classes:
            raise ConfigError(
                f"background_index must be in [0, {num_classes}) or null, got {background_index}"
            )
        if encoder_weights is not None and width != 64:
            raise ConfigError(f"encoder_weights need width 64 (VGG16's), got width {width}")
        self.num_classes = num_classes
        self.background_index = background_index
        self.threshold = threshold
        #: dataset class index of each classifier output (every class but the background)
        self.register_buffer(
            "object_classes",
            torch.tensor([c for c in range(num_classes) if c != background_index]),
            persistent=False,
        )
        channels = [width * VGG16_CHANNELS[s] // 64 for s in range(5)]
        c5 = channels[-1]
        self.encoder = VGG16(in_channels, batch_norm=True, return_indices=True, channels=channels)
        init_weights(self.encoder)
        load_vgg16_weights(self.encoder, encoder_weights)
        # classification network: fc6 (7x7), fc7 (1x1) as convolutions, then class scores
        self.fc = VGGFC(c5, fc_channels, kernel_size=7)
        self.score = nn.Conv2d(fc_channels, len(self.object_classes), 1)
        nn.init.normal_(self.score.weight, std=0.01)  # released code's filler
        nn.init.zeros_(self.score.bias)
        # bridge layers: BN of the features and of the class-specific activation, concatenated
        self.feature_norm = nn.BatchNorm2d(c5)
        self.activation_norm = nn.BatchNorm2d(c5)
        self.bridge = nn.Sequential(
            ConvNormAct(2 * c5, bridge_channels, 7),
            ConvNormAct(bridge_channels, bridge_channels, 1),
            ConvNormAct(bridge_channels, c5, 7),
        )
        # figure-ground decoder, mirroring the encoder stage by stage (deepest first)
        upsamples, stages = [], []
        for s in reversed(range(5)):
            c, depth = channels[s], VGG16_DEPTHS[s]
            outs = [c] * (depth - 1) + [channels[s - 1] if s else c]
            stages.append(nn.Sequential(*(ConvNormAct(c, c_out) for c_out in outs)))
            upsamples.append(DecoderUpsample(c, "unpool"))
        self.upsamples = nn.ModuleList(upsamples)
        self.decoder = nn.ModuleList(stages)
        self.figure_ground = nn.Conv2d(channels[0], 2, 1)
        init_weights(self.bridge)
        init_weights(self.decoder)
        init_weights(self.figure_ground)

    # ------------------------------------------------------------------------ the three parts
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list, list]:
        """[B, C, H, W] -> (pool5 [B, c5, H/32, W/32], pooling indices, pre-pooling sizes)."""
        indices, sizes = [], []
        for stage, pool in zip(self.encoder.stages, self.encoder.pools, strict=True):
            x = stage(x)
            sizes.append(x.shape[-2:])
            x, idx = pool(x)
            indices.append(idx)
        return x, indices, sizes

    def classify(self, pool5: torch.Tensor) -> torch.Tensor:
        """Class-score maps [B, K', h, w] of the K' object classes (background excluded)."""
        return self.score(self.fc(pool5))

    def class_activation(
        self, pool5: torch.Tensor, classes: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Class-specific activation maps: the gradient of the (max-pooled) score of class
        `classes[n]` with respect to the pool5 features `pool5[n]`, times `weights[n]` (the
        released code seeds the back-propagation with the sigmoid class score).

        pool5 [N, c5, h, w], classes int64 [N] (classifier output indices), weights [N] ->
        [N, c5, h, w]. The gradient itself is a constant of the graph (no second-order term: the
        released bp layers are fixed copies of the classifier's weights); gradients reach the
        classifier only through `weights` (detach them to keep it out, as training does).
        Dropout is off for this pass (the released bp branch is the test-phase network).
        """
        was_training = self.fc.training
        self.fc.eval()
        # validation and test run under inference_mode, which enable_grad alone does not lift
        with torch.inference_mode(False), torch.enable_grad():
            features = pool5.detach().clone().requires_grad_(True)
            scores = self.classify(features)[torch.arange(len(classes)), classes.clone()]
            # samples are independent (no BatchNorm in the classifier): one backward for all
            (grad,) = torch.autograd.grad(scores.flatten(1).amax(1).sum(), features)
        self.fc.train(was_training)
        return grad.detach() * weights.view(-1, 1, 1, 1)

    def decode(
        self,
        pool5: torch.Tensor,
        activation: torch.Tensor,
        indices: Sequence[torch.Tensor],
        sizes: Sequence[torch.Size],
    ) -> torch.Tensor:
        """Figure-ground logits [N, 2, H, W] (channel 1: figure) of N (image, class) pairs.

        pool5, activation: [N, c5, h, w]; indices: each pooling's indices, already selected for
        the N pairs; sizes: the pre-pooling sizes."""
        x = torch.cat([self.feature_norm(pool5), self.activation_norm(activation)], 1)
        x = self.bridge(x)
        for upsample, stage, idx, size in zip(
            self.upsamples, self.decoder, indices[::-1], sizes[::-1], strict=True
        ):
            x = stage(upsample(x, idx, size))
        return self.figure_ground(x)

    # ------------------------------------------------------------------------ inference
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> log-probabilities [B, num_classes, H, W]."""
        pool5, indices, sizes = self.encode(x)
        logits = self.classify(pool5).mean((-2, -1))  # [B, K']
        return self.segment(pool5, indices, sizes, logits)

    def detect(self, logits: torch.Tensor) -> torch.Tensor:
        """Detected classes bool [B, K'] of classifier logits [B, K']: sigmoid > threshold; an
        image without any takes its best class when there is no background to fall back on."""
        detected = torch.sigmoid(logits) > self.threshold
        if self.background_index is None:
            best = F.one_hot(logits.argmax(1), logits.shape[1]).bool()
            detected = detected | (best & ~detected.any(1, keepdim=True))
        return detected

    def segment(
        self,
        pool5: torch.Tensor,
        indices: Sequence[torch.Tensor],
        sizes: Sequence[torch.Size],
        logits: torch.Tensor,
    ) -> torch.Tensor:
        """Runs the decoder once on every (image, detected class) pair and merges the
        figure-ground maps -> log-probabilities [B, num_classes, H, W]."""
        b = pool5.shape[0]
        image_idx, cls_idx = self.detect(logits).nonzero(as_tuple=True)
        probs = pool5.new_zeros(b, self.num_classes, *sizes[0])
        if len(image_idx):
            activation = self.class_activation(
                pool5[image_idx], cls_idx, torch.sigmoid(logits[image_idx, cls_idx])
            )
            figure = self.decode(
                pool5[image_idx], activation, [i[image_idx] for i in indices], sizes
            ).softmax(1)[:, 1]
            probs[image_idx, self.object_classes[cls_idx]] = figure
        if self.background_index is not None:
            others = [c for c in range(self.num_classes) if c != self.background_index]
            probs[:, self.background_index] = 1 - probs[:, others].amax(1)
        probs = probs / probs.sum(1, keepdim=True).clamp_min(1e-8)
        return probs.clamp_min(1e-8).log()


def sample_present_classes(
    present: torch.Tensor, per_image: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `per_image` random classes among those present, per image (the released data
    layer's one class per sample). present bool [B, K'] -> (image indices, class indices), each
    int64 [N]."""
    scores = torch.rand(present.shape, device=present.device).masked_fill(~present, -1.0)
    top, cls_idx = scores.topk(min(per_image, present.shape[1]), dim=1)
    keep = top >= 0
    image_idx = torch.arange(present.shape[0], device=present.device)[:, None].expand_as(cls_idx)
    return image_idx[keep], cls_idx[keep]


class DecoupledNet(SegmentationModel):
    """DecoupledNet (Hong, Noh and Han, NIPS 2015): a multi-label classifier trained with
    image-level labels, bridge layers and a figure-ground decoder trained on the few pixel-labelled
    images; inference segments each detected class once.

    Trains on SemiSupervised data (its labelled batch; the unlabelled batch when it carries
    image-level labels, `image_labels:` of the data) or on any plain dataset (all labelled).
    The network is DecoupledNet's own (a VGG16-style encoder with pooling indices), not a
    registry architecture: its decoder unpools with the encoder's indices.

    Args:
        background_index: the background class (VOC: 0) or null (CamVid: none).
        width: channels of the first encoder stage (64 = VGG16).
        fc_channels: channels of the classifier's fc6 / fc7 (1024; the paper's 4096).
        bridge_channels: channels of the bridge layers (512; the released code's 2048).
        threshold: detection threshold on the sigmoid class scores (0.5).
        classes_per_image: figure-ground samples drawn per labelled image and step (1).
        cls_weight: weight of the classification BCE beside the figure-ground CE (1).
        segmentation_trains_encoder: the figure-ground loss also trains the encoder through the
            pool5 features (the paper keeps the classification network fixed: False).
        encoder_weights: null, "imagenet", a file or a URL (timm's vgg16_bn; width 64 only).
        **kwargs: SegmentationModel's (optimiser, schedule, ...; `loss` is not used: the losses
            are the method's).
    """

    trains_on_logits = False  # see SegmentationModel.trains_on_logits

    def __init__(
        self,
        background_index: int | None = None,
        width: int = 64,
        fc_channels: int = 1024,
        bridge_channels: int = 512,
        threshold: float = 0.5,
        classes_per_image: int = 1,
        cls_weight: float = 1.0,
        segmentation_trains_encoder: bool = True,
        encoder_weights: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if classes_per_image < 1:
            raise ConfigError(f"classes_per_image must be >= 1, got {classes_per_image}")
        self.net = DecoupledNetNetwork(
            self.num_classes,
            self.in_channels,
            background_index=background_index,
            width=width,
            fc_channels=fc_channels,
            bridge_channels=bridge_channels,
            threshold=threshold,
            encoder_weights=encoder_weights,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp, net = self.hparams, self.net
        labeled = batch.get("labeled", batch)
        unlabeled = batch.get("unlabeled")
        mask = labeled["mask"]
        objects = net.object_classes
        # image-level labels: the labelled images' (from their masks), and the unlabelled ones'
        # when the data gives them; one encoder pass for all
        images = [self._input(labeled)]
        targets = [labeled.get("image_labels", _presence(mask, self.num_classes))]
        if unlabeled is not None and "image_labels" in unlabeled:
            images.append(self._input(unlabeled))
            targets.append(unlabeled["image_labels"])
        pool5, indices, sizes = net.encode(torch.cat(images))
        logits = net.classify(pool5).mean((-2, -1))
        target = torch.cat(targets).to(logits.dtype)[:, objects]
        loss_cls = F.binary_cross_entropy_with_logits(logits, target)

        # figure-ground samples: labelled images x classes present in their crop
        present = _presence(mask, self.num_classes)[:, objects].bool()
        image_idx, cls_idx = sample_present_classes(present, hp.classes_per_image)
        if len(image_idx):
            features = pool5[image_idx]
            # the classifier learns from image-level labels only (the paper keeps it fixed here)
            activation = net.class_activation(
                features, cls_idx, torch.sigmoid(logits[image_idx, cls_idx]).detach()
            )
            if not hp.segmentation_trains_encoder:
                features = features.detach()
            figure = net.decode(features, activation, [i[image_idx] for i in indices], sizes)
            sample_mask = mask[image_idx]
            target_fg = (sample_mask == objects[cls_idx][:, None, None]).long()
            target_fg = target_fg.masked_fill(sample_mask == self.ignore_index, self.ignore_index)
            loss_seg = F.cross_entropy(figure, target_fg, ignore_index=self.ignore_index)
        else:  # no object class in these crops: nothing for the decoder this step
            loss_seg = logits.sum() * 0.0

        loss = loss_seg + hp.cls_weight * loss_cls
        n = len(mask)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=n)
        self.log("train/loss_cls", loss_cls, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/loss_fg", loss_seg, on_step=True, on_epoch=False, batch_size=n)
        return loss


def _presence(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """float [B, num_classes]: 1 where the class has a pixel in mask [B, H, W]."""
    valid = (mask >= 0) & (mask < num_classes)
    onehot = F.one_hot(torch.where(valid, mask, 0), num_classes) * valid[..., None]
    return (onehot.flatten(1, 2).sum(1) > 0).float()
