"""FixMatch for segmentation in UniMatch's single-stream form (Sohn et al., "FixMatch", NeurIPS
2020; Yang, Qi, Feng, Zhang and Shi, "Revisiting weak-to-strong consistency in semi-supervised
semantic segmentation" (UniMatch), CVPR 2023, whose Table 1-3 baseline "FixMatch" this is).

On unlabelled images the network's prediction on the weak view (the loader's augmentation:
scale, crop, flip) gives hard pseudo-labels; the strong view (photometric jitter, grayscale,
blur, then CutMix with another image of the batch) is trained with cross-entropy towards the
pseudo-labels (mixed with the same box) on pixels whose confidence is at least `threshold`
(0.95), the loss divided by all valid pixels, as in UniMatch's fixmatch.py. The total is
(L_sup + unsup_weight * L_unsup) / 2, their (loss_x + loss_u_s) / 2 at unsup_weight 1.

Settings follow UniMatch's released code (fixmatch.py, configs/pascal.yaml): threshold 0.95,
colour jitter (0.5, 0.5, 0.5, 0.25) with p 0.8, grayscale p 0.2, blur p 0.5 (sigma 0.1-2),
CutMix p 0.5 with box area 2-40% and aspect 0.3-3.3; labelled and weak unlabelled images in one
forward pass (train mode), the weak prediction detached. Deviation: UniMatch takes the CutMix
source from a second unlabelled loader and predicts its pseudo-labels in eval mode; here the
source is another image of the same batch (rolled by one), whose weak prediction is at hand.

Option (not in FixMatch or UniMatch, whose threshold is 0.95 throughout): `threshold_schedule:
{start: 0.7, steps: N}` raises the threshold linearly from `start` to `end` (default `threshold`)
over the first N optimiser steps, then keeps it; logged as train/threshold. A remedy for a
network too weak for 0.95 (from random weights on CamVid no pixel reaches it, README, Results):
the simplest form of the curriculum thresholds of FlexMatch (Zhang et al., NeurIPS 2021: low
thresholds while a class is poorly learnt, rising to the fixed one) and Dash (Xu et al., ICML
2021: a selection that tightens as training goes on); neither is reproduced.

Logged (seglight.methods.base): loss_sup = L_sup / 2, loss_unsup = unsup_weight * L_unsup / 2,
confident = the fraction of valid pixels of the (mixed) strong view at or over the threshold,
and, with held-out masks, the weak view's argmax (the pseudo-labels, before mixing) against them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from seglight.errors import ConfigError
from seglight.methods.base import (
    NetworkSpec,
    SemiSupervisedModel,
    cutmix_boxes,
    fraction,
    logits_of,
    mix,
)


def take(output: torch.Tensor | dict, rows: slice) -> torch.Tensor | dict:
    """The rows `rows` of a network output (a tensor or {"out", "aux"} dict) of a joint batch."""
    if isinstance(output, torch.Tensor):
        return output[rows]
    aux = output.get("aux")
    aux = aux[rows] if isinstance(aux, torch.Tensor) else [a[rows] for a in aux or []]
    return {"out": output["out"][rows], "aux": aux}


class FixMatch(SemiSupervisedModel):
    """FixMatch (Sohn et al. 2020) as UniMatch's single-stream baseline (Yang et al. 2023):
    confident weak-view pseudo-labels supervise a strong, CutMixed view.

    Args:
        network: the segmentation network (see SemiSupervisedModel).
        threshold: confidence threshold of the pseudo-labels (0.95).
        unsup_weight: weight of the unlabelled loss (1; the total is halved as in UniMatch).
        cutmix_p: probability of a CutMix box per image (0.5).
        jitter_p: probability of colour jitter per image in the strong view (0.8).
        threshold_schedule: {start, steps, end (default: threshold)}: a linear ramp of the
            threshold from `start` to `end` over the first `steps` optimiser steps (a remedy, not
            the paper's; see the module docstring); null: `threshold` throughout.
        **kwargs: see SegmentationModel.
    """

    def __init__(
        self,
        network: NetworkSpec = "DeepLabV3Plus",
        threshold: float = 0.95,
        unsup_weight: float = 1.0,
        cutmix_p: float = 0.5,
        jitter_p: float = 0.8,
        threshold_schedule: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(network=network, **kwargs)
        self.threshold = threshold
        self.unsup_weight = unsup_weight
        self.cutmix_p = cutmix_p
        self.jitter_p = jitter_p
        self.schedule = threshold_ramp(threshold_schedule, threshold)

    def current_threshold(self) -> float:
        """The confidence threshold of this step: `threshold`, or the ramp's value at
        global_step (restored on resume)."""
        if self.schedule is None:
            return self.threshold
        start, end, steps = self.schedule
        return start + (end - start) * min(max(self.global_step, 0), steps) / steps

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = self.split_batch(batch)
        x, weak = self._input(labeled), self._input(unlabeled)
        n = len(x)
        if x.shape[1:] == weak.shape[1:]:
            out = self.net(torch.cat([x, weak]))
            out_x, pred_w = take(out, slice(0, n)), logits_of(take(out, slice(n, None)))
        else:  # images of different sizes (no crop): two passes
            out_x, pred_w = self.net(x), logits_of(self.net(weak))
        sup = self.compute_loss(out_x, labeled["mask"])

        conf, pseudo = pred_w.detach().softmax(1).max(1)  # [B, H, W]
        valid = unlabeled["valid"]
        monitor = self.pseudo_label_monitor(pseudo, unlabeled)  # {} without held-out masks
        boxes = cutmix_boxes(len(weak), tuple(weak.shape[-2:]), weak.device, self.cutmix_p)
        perm = torch.roll(torch.arange(len(weak), device=weak.device), 1)
        strong = self.strong_view(weak, p=self.jitter_p)
        strong = mix(boxes, strong[perm], strong)
        pseudo, conf, valid = (mix(boxes, t[perm], t) for t in (pseudo, conf, valid))

        pred_s = logits_of(self.net(strong))
        per_pixel = F.cross_entropy(pred_s, pseudo, reduction="none")
        threshold = self.current_threshold()
        confident = (conf >= threshold) & valid
        unsup = (per_pixel * confident).sum() / valid.sum().clamp(min=1)
        loss = (sup + self.unsup_weight * unsup) / 2
        self.log_losses(
            {
                "loss": loss,
                "loss_sup": sup / 2,
                "loss_unsup": self.unsup_weight * unsup / 2,
                "confident": fraction(confident, valid),
                **monitor,
            },
            len(x),
        )
        if self.schedule is not None:
            self.log("train/threshold", threshold, on_step=True, on_epoch=False)
        return loss


def threshold_ramp(
    schedule: dict[str, float] | None, threshold: float
) -> tuple[float, float, int] | None:
    """(start, end, steps) of a `threshold_schedule` option ({start, steps, end}; end defaults to
    `threshold`), checked; None for none."""
    if schedule is None:
        return None
    if not isinstance(schedule, dict) or not {"start", "steps"} <= set(schedule):
        raise ConfigError(
            f"FixMatch: threshold_schedule must be {{start, steps}} or {{start, end, steps}} "
            f"(a linear ramp of the threshold), got {schedule!r}"
        )
    unknown = sorted(set(schedule) - {"start", "end", "steps"})
    if unknown:
        raise ConfigError(
            f"FixMatch: threshold_schedule has unknown key(s) {', '.join(unknown)}; "
            "known: start, end, steps"
        )
    try:
        start, end, steps = (float(schedule.get(k, threshold)) for k in ("start", "end", "steps"))
    except (TypeError, ValueError):
        start = end = steps = math.nan  # not numbers: the error below
    if not (steps >= 1 and steps.is_integer() and 0 <= start <= 1 and 0 <= end <= 1):
        raise ConfigError(
            f"FixMatch: threshold_schedule needs start and end in [0, 1] and steps a whole "
            f"number >= 1, got {schedule!r}"
        )
    return start, end, int(steps)
