"""Mean Teacher (Tarvainen and Valpola, "Mean teachers are better role models", NeurIPS 2017),
for segmentation.

The teacher is an exponential moving average of the student's weights (seglight.ema.EMA, the
base model's `ema_decay`: so validation, test, predict and checkpoints use the teacher, as the
paper reports its EMA model). On unlabelled images the student, fed a photometrically jittered
view, is pulled towards the teacher's softmax on the plain view by the paper's consistency cost,
the mean squared error between the two class-probability vectors (mean over classes, as their
`softmax_mse_loss` / num_classes; here averaged over valid pixels), weighted by
`consistency_weight` times a sigmoid ramp-up exp(-5 (1 - t)^2) over `rampup_steps`.

Defaults follow the paper's CIFAR-10 settings (Appendix B.1: EMA decay 0.99 in the ramp-up
phase, consistency weight 100 with MSE, sigmoid ramp-up); the ramp-up is given in optimiser
steps. Deviations: the EMA's first updates use seglight's warm-up decay min(d, (1 + n)/(10 + n))
instead of the paper's min(d, 1 - 1/(n + 1)) (both follow the student closely at first); the
teacher runs in eval mode (no dropout noise on the teacher, common in segmentation ports);
consistency is applied to unlabelled images only, and the student and teacher see the same
geometric view (pixel correspondence), differing in colour.
"""

from __future__ import annotations

from typing import Any

import torch

from seglight.errors import ConfigError
from seglight.methods.base import NetworkSpec, SemiSupervisedModel, logits_of, sigmoid_rampup


class MeanTeacher(SemiSupervisedModel):
    """Mean Teacher (Tarvainen & Valpola 2017): EMA teacher, MSE consistency on unlabelled images.

    Args:
        network: the segmentation network (see SemiSupervisedModel).
        consistency_weight: the consistency cost's final weight (100, the paper's CIFAR setting).
        rampup_steps: optimiser steps of the sigmoid ramp-up of the consistency weight.
        ema_decay: the teacher's EMA decay (0.99).
        jitter: give the student a photometrically jittered view (seglight.methods.base).
        **kwargs: see SegmentationModel.
    """

    def __init__(
        self,
        network: NetworkSpec = "DeepLabV3Plus",
        consistency_weight: float = 100.0,
        rampup_steps: int = 1000,
        ema_decay: float = 0.99,
        jitter: bool = True,
        **kwargs: Any,
    ) -> None:
        if ema_decay is None:
            raise ConfigError("MeanTeacher: ema_decay is the teacher's decay; it cannot be null")
        super().__init__(network=network, ema_decay=ema_decay, **kwargs)
        self.consistency_weight = consistency_weight
        self.rampup_steps = rampup_steps
        self.jitter = jitter

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = self.split_batch(batch)
        self._ensure_ema()  # the teacher (created by configure_model under a Trainer)
        sup = self.compute_loss(self.net(self._input(labeled)), labeled["mask"])
        image = self._input(unlabeled)
        with torch.no_grad():
            teacher = logits_of(self.ema.module(image)).softmax(1)
        student_in = self.strong_view(image) if self.jitter else image
        student = logits_of(self.net(student_in)).softmax(1)
        valid = unlabeled["valid"]
        squared = (student - teacher).pow(2).mean(1)  # [B, H, W], mean over classes
        consistency = (squared * valid).sum() / valid.sum().clamp(min=1)
        weight = self.consistency_weight * sigmoid_rampup(self.global_step, self.rampup_steps)
        loss = sup + weight * consistency
        self.log_losses(
            {"loss": loss, "loss_sup": sup, "loss_consistency": consistency}, len(image)
        )
        return loss
