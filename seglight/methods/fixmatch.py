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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from seglight.methods.base import (
    NetworkSpec,
    SemiSupervisedModel,
    cutmix_boxes,
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
        **kwargs: see SegmentationModel.
    """

    def __init__(
        self,
        network: NetworkSpec = "DeepLabV3Plus",
        threshold: float = 0.95,
        unsup_weight: float = 1.0,
        cutmix_p: float = 0.5,
        jitter_p: float = 0.8,
        **kwargs: Any,
    ) -> None:
        super().__init__(network=network, **kwargs)
        self.threshold = threshold
        self.unsup_weight = unsup_weight
        self.cutmix_p = cutmix_p
        self.jitter_p = jitter_p

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
        boxes = cutmix_boxes(len(weak), tuple(weak.shape[-2:]), weak.device, self.cutmix_p)
        perm = torch.roll(torch.arange(len(weak), device=weak.device), 1)
        strong = self.strong_view(weak, p=self.jitter_p)
        strong = mix(boxes, strong[perm], strong)
        pseudo, conf, valid = (mix(boxes, t[perm], t) for t in (pseudo, conf, valid))

        pred_s = logits_of(self.net(strong))
        per_pixel = F.cross_entropy(pred_s, pseudo, reduction="none")
        confident = (conf >= self.threshold) & valid
        unsup = (per_pixel * confident).sum() / valid.sum().clamp(min=1)
        loss = (sup + self.unsup_weight * unsup) / 2
        self.log_losses(
            {
                "loss": loss,
                "loss_sup": sup,
                "loss_unsup": unsup,
                "confident": confident.sum() / valid.sum().clamp(min=1),
            },
            len(x),
        )
        return loss
