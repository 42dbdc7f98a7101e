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

Training runs the released two-stage schedule in one run (`stage1_steps`):
- stage 1 (the first `stage1_steps` steps): the classifier learns from image-level labels
  alone, of the labelled and (with `image_labels:` of the data) the unlabelled images; the
  bridge and decoder are not run;
- stage 2 (the rest): the classification network -- every conv and fc layer, conv1_1 to the
  class scores, with its BatchNorm -- is frozen (no gradient, learning rate 0, BatchNorm and
  dropout in eval mode), and the bridge and decoder learn the figure-ground maps of the
  labelled images. This is the released training (HyeonwooNoh/DecoupledNet,
  training/003_train_seg_25_anno/003_train_seg_25_anno.prototxt, 004_train_seg_10_anno/
  004_train_seg_10_anno.prototxt, 005_train_seg_5_anno/005_train_seg_5_anno.prototxt: `blobs_lr:
  0` on conv1_1 ... conv5_3, fc6, fc7 and cls-score-voc, `blobs_lr: 1 / 2` on the bridge and
  decoder, one SOFTMAX_LOSS on the figure-ground scores), started from a classifier trained
  beforehand on image-level labels (model/voc_finetuning_result). `joint: true` trains both
  parts at once from the first step instead (an ablation: the classification loss keeps
  training the classifier while the decoder learns; `segmentation_trains_encoder: true` also
  lets the figure-ground loss train the encoder through the pool5 features).

Inference runs the decoder once per class the classifier detects (sigmoid score > 0.5) and
takes, per pixel, the class whose figure probability is highest; with a background class (VOC's
0) a pixel is background where no detected class's figure probability exceeds its ground
probability, i.e. background score = 1 - max_l figure_l.

Paper numbers (Table 2, VOC 2012 test, mean IoU, image-level labels for all 10,582 images plus
5 / 10 / 25 strong annotations per class): 54.7 / 58.7 / 62.5.

Follows the released code (training/00*_train_seg_*_anno.prototxt and solver.prototxt,
inference/DecoupledNet_inference.m) where the paper is open:
- the class score that is back-propagated is the max over the score map (the released `avg-pool`
  layer that feeds the bp branch is a MAX pooling) scaled by the sigmoid of the class's score
  (`cls-score-masked`), and the gradient is not propagated back into the classifier (its bp
  weights are fixed);
- the class score of the classifier (BCE, detection) is the global average of the score map
  (the classifier was fine-tuned "with avg pool");
- one class per labelled image per step (`classes_per_image`, default 1);
- the two BatchNorms of the bridge's input (pool5-bn, pool5-bp-bn) learn in stage 2 (no
  `blobs_lr` in the prototxt: Caffe's default 1).
Deviations:
- no ImageNet pretraining is available here: stage 1 trains the classifier from scratch, within
  the run's step budget (the paper fine-tunes an ImageNet VGG16 on VOC's image-level labels, on
  320x320 images, before the segmentation training);
- a labelled crop is classified against the classes of its own (cropped) mask; an unlabelled
  crop against its whole image's `image_labels` (no mask to crop), which may name classes the
  crop cut away;
- each stage runs the configured schedule (warm-up, then poly / cosine / constant) over its own
  steps from the peak `lr`, as two runs would (the released stage 2: SGD at 0.01, momentum 0.9,
  weight decay 0.0005, divided by 10 after 4,000 of 5,500 iterations for 5 annotations per
  class; 4 images x iter_size 16 per iteration);
- in stage 2 the unlabelled batches are still loaded (the combined loader is the run's) but not
  used;
- the encoder is VGG16 with BatchNorm, optionally narrower (`width`), instead of VGG16;
- fc6 / fc7 have 1024 channels and the bridge 512 by default (the paper's network has 4096 and
  2048: `fc_channels: 4096, bridge_channels: 2048`), which cuts its 307M parameters to 94M;
- the bridge's 7x7 convolutions use "same" padding, so any input size works (the released net is
  fixed to 320x320 inputs, where fc6 is a valid 7x7 conv and the bridge a deconv back to 10x10);
- inference derives the background from the per-class passes instead of one more decoder pass
  with all detected classes (released code), so the decoder runs exactly once per detected class;
  without a background class (CamVid), every pixel takes a detected class, and an image on which
  nothing is detected takes its best-scoring class.

Under DDP the stages leave parameters without gradients (the decoder in stage 1, the frozen
classifier in stage 2): use `trainer.strategy: ddp_find_unused_parameters_true`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seglight.errors import ConfigError
from seglight.models.base import PolyWithWarmup, SegmentationModel
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
    def classification_network(self) -> list[nn.Module]:
        """The classifier's modules (conv1_1 to the class scores, BatchNorm included): what the
        second training stage freezes. The rest (bridge and decoder) is segmentation."""
        return [self.encoder, self.fc, self.score]

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


class StagePoly(PolyWithWarmup):
    """LR factor of one parameter group under DecoupledNet's two-stage schedule: the base
    schedule (warm-up, then poly / cosine / constant) over the steps of its own stage, 0 outside.

    stage 1 covers steps [0, stage1_end), stage 2 [stage1_end, total). Plain numbers only, so
    that LambdaLR's state (checkpointed and restored on resume) holds the stage boundary."""

    def __init__(
        self,
        stage: int,
        stage1_end: int,
        total_steps: int,
        warmup_steps: int = 0,
        power: float = 0.9,
        kind: str = "poly",
    ) -> None:
        self.stage, self.stage1_end = stage, stage1_end
        self.start = 0 if stage == 1 else stage1_end
        self.end = stage1_end if stage == 1 else total_steps
        super().__init__(self.end - self.start, warmup_steps, power, kind)

    def __call__(self, step: int) -> float:
        if not self.start <= step < self.end:
            return 0.0
        return super().__call__(step - self.start)


class DecoupledNet(SegmentationModel):
    """DecoupledNet (Hong, Noh and Han, NIPS 2015): a multi-label classifier trained with
    image-level labels, then, with the classifier frozen, bridge layers and a figure-ground
    decoder trained on the few pixel-labelled images; inference segments each detected class once
    (see the module docstring for the stages and the deviations from the released code).

    Trains on SemiSupervised data (its labelled batch; the unlabelled batch when it carries
    image-level labels, `image_labels:` of the data) or on any plain dataset (all labelled).
    The network is DecoupledNet's own (a VGG16-style encoder with pooling indices), not a
    registry architecture: its decoder unpools with the encoder's indices.

    Logs train/loss (what is trained: stage 1 loss_cls, stage 2 loss_seg, joint their sum),
    train/loss_cls (the classification BCE; in stage 2 that of the frozen classifier on the
    labelled crops, not trained), train/loss_seg (the figure-ground cross-entropy; stage 2 and
    joint) and train/stage (1 or 2; 0 for joint training).

    Args:
        background_index: the background class (VOC: 0) or null (CamVid: none).
        width: channels of the first encoder stage (64 = VGG16).
        fc_channels: channels of the classifier's fc6 / fc7 (1024; the paper's 4096).
        bridge_channels: channels of the bridge layers (512; the released code's 2048).
        threshold: detection threshold on the sigmoid class scores (0.5).
        classes_per_image: figure-ground samples drawn per labelled image and step (1).
        stage1_steps: the steps of stage 1 (the classifier on image-level labels): a count, or a
            fraction in (0, 1) of the run's steps (0.5); stage 2 (bridge and decoder, classifier
            frozen) takes the rest. Both stages need at least one step.
        joint: train the classifier and the decoder together from the first step, each with its
            loss (an ablation of the two-stage schedule; stage1_steps is then unused).
        cls_weight: weight of the classification BCE beside the figure-ground CE (joint only).
        segmentation_trains_encoder: with joint training, the figure-ground loss also trains the
            encoder through the pool5 features (false: the classifier learns from image-level
            labels only, as in the paper).
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
        stage1_steps: int | float = 0.5,
        joint: bool = False,
        cls_weight: float = 1.0,
        segmentation_trains_encoder: bool = False,
        encoder_weights: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if classes_per_image < 1:
            raise ConfigError(f"classes_per_image must be >= 1, got {classes_per_image}")
        if (
            isinstance(stage1_steps, bool)
            or (isinstance(stage1_steps, float) and not 0 < stage1_steps < 1)
            or (isinstance(stage1_steps, int) and stage1_steps < 1)
        ):
            raise ConfigError(
                f"stage1_steps must be a step count >= 1 or a fraction in (0, 1) of the run, "
                f"got {stage1_steps!r}"
            )
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
        #: the first step of stage 2, fixed when the optimiser is configured (and, on resume,
        #: restored with the LR schedule); None before, or with joint training
        self.stage1_end: int | None = None
        self._frozen = False

    # ------------------------------------------------------------------------ the stages
    @property
    def stage(self) -> int:
        """The training stage of the current step: 1 (classifier) or 2 (bridge and decoder);
        0 with joint training."""
        if self.hparams.joint:
            return 0
        if self.stage1_end is None:
            raise RuntimeError("DecoupledNet: the stages are set by configure_optimizers")
        return 1 if self.global_step < self.stage1_end else 2

    def _classifier_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.net.classification_network() for p in m.parameters()]

    def resolve_stage1(self, total: int) -> int:
        """The first step of stage 2 in a run of `total` steps (one line for what cannot be)."""
        value = self.hparams.stage1_steps
        if self._trainer is not None and self.trainer.fast_dev_run:
            return 0  # a smoke run's step(s): stage 2, which runs every part of the network
        if isinstance(value, float):
            steps = round(value * total)
            if not 1 <= steps < total:
                raise ConfigError(
                    f"DecoupledNet: stage1_steps={value} of a {total}-step run gives {steps} "
                    f"classifier step(s) and {total - steps} decoder step(s); both stages need at "
                    "least one (lengthen the run or give a count)"
                )
            return steps
        if value >= total:
            raise ConfigError(
                f"DecoupledNet: stage1_steps={value} is not shorter than the run ({total} steps): "
                "stage 2 (bridge and decoder) would never train; give fewer steps, a fraction "
                "(0.5), or joint: true"
            )
        return value

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.hparams.segmentation_trains_encoder and not self.hparams.joint:
            raise ConfigError(
                "DecoupledNet: segmentation_trains_encoder: true needs joint: true (the two-stage "
                "schedule trains the decoder on the frozen classifier's features)"
            )

    def parameter_groups(self) -> list[dict]:
        """The base model's groups, split into the classifier's ("stage": 1) and the bridge and
        decoder's ("stage": 2), the same whether or not the classifier is frozen yet (so that a
        run resumed in stage 2 loads its optimiser state)."""
        classifier = self._classifier_parameters()
        frozen = [p for p in classifier if not p.requires_grad]
        for p in frozen:
            p.requires_grad_(True)
        try:
            groups = super().parameter_groups()
        finally:
            for p in frozen:
                p.requires_grad_(False)
        if self.hparams.joint:
            return groups
        ids = {id(p) for p in classifier}
        staged = []
        for stage in (1, 2):
            for group in groups:
                params = [p for p in group["params"] if (id(p) in ids) == (stage == 1)]
                if params:
                    staged.append({**group, "params": params, "stage": stage})
        return staged

    def configure_optimizers(self) -> dict:
        """The base optimiser; with two stages, each group's schedule runs over its own stage's
        steps and is 0 in the other stage (the frozen classifier's learning rate is 0)."""
        config = super().configure_optimizers()
        if self.hparams.joint:
            return config
        hp = self.hparams
        total = int(self.trainer.estimated_stepping_batches)
        self.stage1_end = self.resolve_stage1(total)
        optimizer = config["optimizer"]
        factors = [
            StagePoly(
                g["stage"], self.stage1_end, total, hp.warmup_steps, hp.poly_power, hp.scheduler
            )
            for g in optimizer.param_groups
        ]
        # the groups' initial_lr, set by the base schedule, stays the configured peak
        config["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return config

    def on_train_start(self) -> None:
        """Takes the stage boundary from the (restored) schedule, freezes the classifier when
        the run starts in stage 2 (resumed), and says what the run does."""
        super().on_train_start()
        if self.hparams.joint:
            return
        for config in self.trainer.lr_scheduler_configs:
            for factor in getattr(config.scheduler, "lr_lambdas", []):
                if isinstance(factor, StagePoly):
                    self.stage1_end = factor.stage1_end
        total = int(self.trainer.estimated_stepping_batches)
        self._say(
            f"two stages: steps 0-{self.stage1_end - 1} train the classifier on image-level "
            f"labels, steps {self.stage1_end}-{total - 1} the bridge and decoder on the labelled "
            "images with the classifier frozen"
            if self.stage1_end
            else "stage 2 only (fast_dev_run): the bridge and decoder, the classifier frozen"
        )
        self._enter_stage()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._enter_stage()

    def _enter_stage(self) -> None:
        """Freeze the classification network from the first step of stage 2 on (and thaw it
        in stage 1, should a model that ended in stage 2 be fitted again)."""
        if self.hparams.joint or self._frozen == (self.stage == 2):
            return
        self._frozen = not self._frozen
        for module in self.net.classification_network():
            module.requires_grad_(not self._frozen)
            module.train(not self._frozen)
        if self._frozen:
            count = sum(p.numel() for p in self._classifier_parameters())
            resumed = f", resumed at step {self.global_step}" * (self.global_step > self.stage1_end)
            self._say(
                f"stage 2 from step {self.stage1_end}{resumed}: the classifier is frozen ({count:,} "
                "parameters: encoder, fc6/fc7, class scores; BatchNorm in eval mode); the bridge "
                "and decoder train on the labelled images"
            )

    def train(self, mode: bool = True) -> DecoupledNet:
        """As nn.Module's, but a frozen classifier stays in eval mode (BatchNorm statistics)."""
        super().train(mode)
        if mode and getattr(self, "_frozen", False):
            for module in self.net.classification_network():
                module.eval()
        return self

    def _say(self, message: str) -> None:
        if self._trainer is None or self.trainer.is_global_zero:
            print(f"seglight: DecoupledNet {message}", file=sys.stderr)

    # ------------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labeled = batch.get("labeled", batch)
        unlabeled = batch.get("unlabeled")
        stage = self.stage
        losses: dict[str, torch.Tensor] = {}
        if stage == 2:  # the frozen classifier's features and scores of the labelled images
            with torch.no_grad():
                pool5, indices, sizes, logits, losses["loss_cls"] = self._classification(labeled)
            losses["loss_seg"] = self._figure_ground_loss(
                labeled["mask"], pool5, indices, sizes, logits
            )
            losses["loss"] = losses["loss_seg"]
        else:
            pool5, indices, sizes, logits, losses["loss_cls"] = self._classification(
                labeled, unlabeled
            )
            if stage == 1:
                losses["loss"] = losses["loss_cls"]
            else:  # joint
                n = len(labeled["mask"])
                features = pool5[:n]
                if not self.hparams.segmentation_trains_encoder:
                    features = features.detach()
                losses["loss_seg"] = self._figure_ground_loss(
                    labeled["mask"], features, [i[:n] for i in indices], sizes, logits[:n]
                )
                losses["loss"] = losses["loss_seg"] + self.hparams.cls_weight * losses["loss_cls"]
        n = len(labeled["mask"])
        for name, value in losses.items():
            key = "train/loss" if name == "loss" else f"train/{name}"
            self.log(key, value.detach(), on_step=True, on_epoch=True, batch_size=n)
        self.log("train/stage", float(stage), on_step=True, on_epoch=False, batch_size=n)
        return losses["loss"]

    def _classification(self, labeled: dict, unlabeled: dict | None = None) -> tuple:
        """One encoder pass over the labelled images and the unlabelled ones that have
        image-level labels -> (pool5, indices, sizes, class logits [B, K'], BCE). A labelled
        crop's target is the classes present in its own (cropped) mask."""
        net = self.net
        images = [self._input(labeled)]
        targets = [_presence(labeled["mask"], self.num_classes)]
        if unlabeled is not None and "image_labels" in unlabeled:
            images.append(self._input(unlabeled))
            targets.append(unlabeled["image_labels"])
        pool5, indices, sizes = net.encode(torch.cat(images))
        logits = net.classify(pool5).mean((-2, -1))
        target = torch.cat(targets).to(logits.dtype)[:, net.object_classes]
        loss = F.binary_cross_entropy_with_logits(logits, target)
        return pool5, indices, sizes, logits, loss

    def _figure_ground_loss(
        self,
        mask: torch.Tensor,
        pool5: torch.Tensor,
        indices: Sequence[torch.Tensor],
        sizes: Sequence[torch.Size],
        logits: torch.Tensor,
    ) -> torch.Tensor:
        """Figure-ground CE of (labelled image, class present in its crop) samples; pool5,
        indices and logits of the labelled images."""
        net, objects = self.net, self.net.object_classes
        present = _presence(mask, self.num_classes)[:, objects].bool()
        image_idx, cls_idx = sample_present_classes(present, self.hparams.classes_per_image)
        if not len(image_idx):  # no object class in these crops: nothing for the decoder
            return net.figure_ground.weight.sum() * 0.0
        # the classifier learns from image-level labels only (the paper keeps it fixed here)
        activation = net.class_activation(
            pool5[image_idx], cls_idx, torch.sigmoid(logits[image_idx, cls_idx]).detach()
        )
        figure = net.decode(pool5[image_idx], activation, [i[image_idx] for i in indices], sizes)
        sample_mask = mask[image_idx]
        target = (sample_mask == objects[cls_idx][:, None, None]).long()
        target = target.masked_fill(sample_mask == self.ignore_index, self.ignore_index)
        return F.cross_entropy(figure, target, ignore_index=self.ignore_index)


def _presence(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """float [B, num_classes]: 1 where the class has a pixel in mask [B, H, W]."""
    valid = (mask >= 0) & (mask < num_classes)
    onehot = F.one_hot(torch.where(valid, mask, 0), num_classes) * valid[..., None]
    return (onehot.flatten(1, 2).sum(1) > 0).float()
