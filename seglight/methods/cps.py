"""Cross pseudo supervision (Chen, Yuan, Zeng and Wang, "Semi-supervised semantic segmentation
with cross pseudo supervision", CVPR 2021).

Two networks of the same architecture, initialised differently, each trained with cross-entropy
towards the other's hard pseudo-labels (argmax), on the labelled and unlabelled images together,
plus the supervised cross-entropy of both: L = L_s(1) + L_s(2) + lambda (L_cps(1<-2) +
L_cps(2<-1)). One optimiser over both networks: the authors' code (TorchSemiSeg, train.py) has
two SGD optimisers, one per network, with the same settings and learning rate, stepped together
after one backward pass of the summed loss; SGD (momentum, weight decay) acts on each parameter
alone, so one optimiser over both parameter sets takes the same steps. The first network
(`net`) is evaluated, as their eval uses branch1.

Defaults: lambda as the authors' VOC configs (exp.voc/voc8.res50v3+.CPS/config.py and
.CPS+CutMix/config.py): 1.5 without CutMix (the paper, Sec. 4.1), 1 with it; their Cityscapes
configs use 6 and 5 (`cps_weight` sets it). `cutmix: true`
is the paper's "CPS + CutMix" (Table 1-2, the authors' cutmix code): pseudo-labels are predicted
on two unlabelled images, mixed with a CutMix box, and the networks predict the mixed image; the
CPS term is then on unlabelled images only. Deviations: the CutMix source is another image of
the batch (rolled by one), not a second unlabelled loader, and the box is UniMatch's (one box,
2-40% of the area) rather than their BoxMaskGenerator's; padding pixels of unlabelled crops get
no pseudo-label.

Option (not in the paper, whose weight is constant from step 0 on an ImageNet-pretrained
backbone): `rampup_steps` ramps lambda up with Mean Teacher's sigmoid (exp(-5 (1 - t)^2), from
the Mean Teacher authors' released code, as MeanTeacher here). From random weights the two
networks' first pseudo-labels are one or two classes everywhere, and a constant lambda = 1.5
(on labelled and unlabelled images, against the supervised term on the labelled ones) makes them
agree on those instead of learning the labels: on CamVid at 1/8 labels, 160 steps from scratch,
both collapsed to ~4% mIoU (README, Results).

A warm start (`init_from`, seglight.models.base): `net` takes the checkpoint's network; `net2`
its encoder only (`init_net2: encoder`), keeping its own random decoder, as the paper's two
networks share the ImageNet backbone and differ in their randomly initialised heads (their Sec.
3.1 and TorchSemiSeg's init_weight); `init_net2: all` copies the whole network into both, which
then start identical, and, seeing the same batches, stay so up to floating-point noise: each
trains on its own argmax (self-training), not on a different network's.

Logged (seglight.methods.base): loss_sup (both networks'), loss_unsup = lambda (ramped) times the
cross term (loss_cps, unweighted), confident = 1 (every valid pixel has a pseudo-label), and,
with held-out masks, the pseudo-labels `net` is trained on (net2's argmax on the unlabelled
images, before any CutMix) against them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from seglight.checkpoints import load_network, sub_state
from seglight.errors import ConfigError
from seglight.methods.base import (
    NetworkSpec,
    SemiSupervisedModel,
    cutmix_boxes,
    fraction,
    logits_of,
    mix,
    sigmoid_rampup,
)


class CPS(SemiSupervisedModel):
    """Cross pseudo supervision (Chen et al. 2021): two networks, each supervised by the other's
    hard pseudo-labels.

    Args:
        network: the architecture of both networks (see SemiSupervisedModel).
        cps_weight: lambda, the weight of the cross pseudo supervision loss; default the
            authors' VOC value: 1.5, or 1 with `cutmix` (Cityscapes: 6, or 5 with `cutmix`).
        cutmix: the CutMix variant (CPS + CutMix).
        cutmix_p: probability of a CutMix box per image in that variant.
        rampup_steps: optimiser steps of a sigmoid ramp-up of lambda (0: constant, the paper).
        init_net2: with `init_from`, what net2 takes from the checkpoint: "encoder" (its
            `net.encoder`, the decoder stays random) or "all" (see the module docstring).
        **kwargs: see SegmentationModel.
    """

    def __init__(
        self,
        network: NetworkSpec = "DeepLabV3Plus",
        cps_weight: float | None = None,
        cutmix: bool = False,
        cutmix_p: float = 1.0,
        rampup_steps: int = 0,
        init_net2: Literal["encoder", "all"] = "encoder",
        **kwargs: Any,
    ) -> None:
        if init_net2 not in ("encoder", "all"):
            raise ConfigError(f"CPS: init_net2 must be 'encoder' or 'all', got {init_net2!r}")
        super().__init__(network=network, **kwargs)
        self.net2 = self.build_network()  # a second draw of the initial weights
        self.cps_weight = cps_weight if cps_weight is not None else (1.0 if cutmix else 1.5)
        self.cutmix = cutmix
        self.cutmix_p = cutmix_p
        self.rampup_steps = rampup_steps

    def networks(self) -> list[nn.Module]:
        return [self.net, self.net2]

    def init_networks(self, state: dict[str, torch.Tensor], where: str) -> None:
        """`init_from`: net from the checkpoint's network, net2 from it or its encoder only
        (`init_net2`)."""
        super().init_networks(state, where)
        if self.hparams.init_net2 == "all":
            load_network(self.net2, state, where)
            return
        encoder = getattr(getattr(self.net2, "_orig_mod", self.net2), "encoder", None)
        if not isinstance(encoder, nn.Module):
            raise ConfigError(
                f"CPS: init_net2: encoder needs a network with an `encoder` module "
                f"({type(self.net2).__name__} has none); use init_net2: all"
            )
        load_network(encoder, sub_state(state, "encoder."), f"{where} (its encoder)")

    def _pseudo(self, logits: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        labels = logits.detach().argmax(1)
        return labels if valid is None else labels.masked_fill(~valid, self.ignore_index)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = self.split_batch(batch)
        x, u = self._input(labeled), self._input(unlabeled)
        valid = unlabeled["valid"]
        out1, out2 = self.net(x), self.net2(x)
        sup = self.compute_loss(out1, labeled["mask"]) + self.compute_loss(out2, labeled["mask"])
        if self.cutmix:
            boxes = cutmix_boxes(len(u), tuple(u.shape[-2:]), u.device, self.cutmix_p)
            perm = torch.roll(torch.arange(len(u), device=u.device), 1)
            with torch.no_grad():  # the pseudo-labels of the two source images, then mixed
                t1, t2 = logits_of(self.net(u)), logits_of(self.net2(u))
            pseudo_u = t2  # net2's prediction: net's targets
            mixed_valid = mix(boxes, valid[perm], valid)
            target1 = self._pseudo(mix(boxes, t1[perm], t1), mixed_valid)
            target2 = self._pseudo(mix(boxes, t2[perm], t2), mixed_valid)
            u_mix = mix(boxes, u[perm], u)
            p1, p2 = logits_of(self.net(u_mix)), logits_of(self.net2(u_mix))
        else:
            u1, u2 = logits_of(self.net(u)), logits_of(self.net2(u))
            pseudo_u = u2.detach()  # net2's prediction: net's targets
            if x.shape[-2:] == u.shape[-2:]:  # the paper: labelled and unlabelled together
                p1 = torch.cat([logits_of(out1), u1])
                p2 = torch.cat([logits_of(out2), u2])
                keep = torch.cat([torch.ones_like(labeled["mask"], dtype=torch.bool), valid])
            else:  # images of different sizes (no crop): the unlabelled ones only
                p1, p2, keep = u1, u2, valid
            target1, target2 = self._pseudo(p1, keep), self._pseudo(p2, keep)
        ce = dict(ignore_index=self.ignore_index)
        cps = F.cross_entropy(p1, target2, **ce) + F.cross_entropy(p2, target1, **ce)
        weight = self.cps_weight * sigmoid_rampup(self.global_step, self.rampup_steps)
        loss = sup + weight * cps
        self.log_losses(
            {
                "loss": loss,
                "loss_sup": sup,
                "loss_unsup": weight * cps,
                "loss_cps": cps,
                "confident": fraction(valid, valid),
                **self.pseudo_label_monitor(pseudo_u.argmax(1), unlabeled),
            },
            len(x),
        )
        self.log("train/cps_weight", weight, on_step=True, on_epoch=False)
        return loss
