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
phase and 0.999 after it, consistency weight 100 with MSE, sigmoid ramp-up), as the released
TensorFlow code (CuriousAI/mean-teacher, tensorflow/mean_teacher/model.py: ema_decay_during_rampup
0.99, ema_decay_after_rampup 0.999, switched by a step function at rampup_length); the ramp-up is
given in optimiser steps and the same `rampup_steps` ends both ramps, as there. Deviations: the EMA's first updates use seglight's warm-up decay min(d, (1 + n)/(10 + n))
instead of the paper's min(d, 1 - 1/(n + 1)) (both follow the student closely at first); the
teacher runs in eval mode (no dropout noise on the teacher, common in segmentation ports);
consistency is applied to unlabelled images only, and the student and teacher see the same
geometric view (pixel correspondence), differing in colour.

Logged (seglight.methods.base): loss_sup, loss_unsup = the ramped weight times the consistency
cost (loss_consistency, unweighted), confident = 1 (no threshold: every valid pixel enters), and,
with held-out masks, the teacher's argmax against them.
"""

from __future__ import annotations

from typing import Any

import torch

from seglight.errors import ConfigError
from seglight.methods.base import (
    NetworkSpec,
    SemiSupervisedModel,
    fraction,
    logits_of,
    sigmoid_rampup,
)


class MeanTeacher(SemiSupervisedModel):
    """Mean Teacher (Tarvainen & Valpola 2017): EMA teacher, MSE consistency on unlabelled images.

    Args:
        network: the segmentation network (see SemiSupervisedModel).
        consistency_weight: the consistency cost's final weight (100, the paper's CIFAR setting).
        rampup_steps: optimiser steps of the sigmoid ramp-up of the consistency weight.
        ema_decay: the teacher's EMA decay during the ramp-up (0.99).
        ema_decay_after_rampup: the teacher's decay from step `rampup_steps` on (0.999); null
            keeps `ema_decay` throughout.
        jitter: give the student a photometrically jittered view (seglight.methods.base).
        **kwargs: see SegmentationModel.
    """

    def __init__(
        self,
        network: NetworkSpec = "DeepLabV3Plus",
        consistency_weight: float = 100.0,
        rampup_steps: int = 1000,
        ema_decay: float = 0.99,
        ema_decay_after_rampup: float | None = 0.999,
        jitter: bool = True,
        **kwargs: Any,
    ) -> None:
        if ema_decay is None:
            raise ConfigError("MeanTeacher: ema_decay is the teacher's decay; it cannot be null")
        if ema_decay_after_rampup is not None and not 0.0 <= ema_decay_after_rampup < 1.0:
            raise ConfigError(
                f"MeanTeacher: ema_decay_after_rampup must be in [0, 1) or null, got "
                f"{ema_decay_after_rampup}"
            )
        super().__init__(network=network, ema_decay=ema_decay, **kwargs)
        self.consistency_weight = consistency_weight
        self.rampup_steps = rampup_steps
        self.ema_decay_during_rampup = ema_decay
        self.ema_decay_after_rampup = ema_decay_after_rampup
        self.jitter = jitter

    def teacher_decay(self, step: int) -> float:
        """The EMA decay of the update after optimiser step `step` (0-based): `ema_decay` during
        the ramp-up, `ema_decay_after_rampup` from step `rampup_steps` on (the release's
        step_rampup)."""
        if self.ema_decay_after_rampup is None or step < self.rampup_steps:
            return self.ema_decay_during_rampup
        return self.ema_decay_after_rampup

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = self.split_batch(batch)
        self._ensure_ema()  # the teacher (created by configure_model under a Trainer)
        self.ema.decay = self.teacher_decay(self.global_step)  # used by this step's update
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
            {
                "loss": loss,
                "loss_sup": sup,
                "loss_unsup": weight * consistency,
                "loss_consistency": consistency,
                "confident": fraction(valid, valid),
                **self.pseudo_label_monitor(teacher.argmax(1), unlabeled),
            },
            len(image),
        )
        self.log("train/ema_decay", self.ema.decay, on_step=True, on_epoch=False)
        return loss
