"""AdvSemiSeg (Hung, Tsai, Liou, Lin and Yang, BMVC 2018, "Adversarial Learning for
Semi-supervised Semantic Segmentation").

A fully convolutional discriminator D tells, per pixel, a segmentation network's class
probabilities from one-hot ground truth. The segmentation network is trained with

    L_seg = L_ce + lambda_adv * L_adv + lambda_semi * L_semi (+ lambda_semi_adv * L_adv on unlabelled)

- L_ce: the base model's loss (cross-entropy) on the labelled images;
- L_adv: BCE pushing D(softmax(S(x))) towards "ground truth" (1), on labelled images (0.01) and,
  with a smaller weight, on unlabelled images (0.001) (paper Sec. 3.2 / 4.2);
- L_semi: self-training on the unlabelled images: the argmax of S is the target wherever D's
  confidence sigmoid(D) exceeds T_semi = 0.2, other pixels are ignored; switched on after
  `semi_start` steps (5000 of 20000 in the released code), when D has learned something.

D is trained with BCE: softmax predictions (of labelled and, as the released code's `D_remain`,
unlabelled images) -> 0, one-hot labels -> 1, each half of its loss; ignored pixels are left out.
D is optimised by Adam (lr 1e-4, betas 0.9 / 0.99) with the same poly decay as the segmentation
network (released code). Manual optimisation: one optimiser per player, each with its schedule.

Reference numbers (VOC 2012 val, DeepLab-v2 ResNet-101, no CRF): 68.8 mean IoU with 1/8 of the
labels (the released model `semi0.125`), 73.6 fully supervised (the released code's README;
the paper's Table 1 and 5 give the protocol).

Details that follow the released code (hfslyc/AdvSemiSeg, model/discriminator.py, train.py):
- D: five 4x4 stride-2 convs (64-128-256-512-1), LeakyReLU 0.2 after all but the last, no
  normalisation, no sigmoid; its map is upsampled bilinearly (align_corners=True) to the input.
- ignored pixels of the labels are all-zero in the one-hot map and excluded from D's losses.
- the lambdas: 0.01 (labelled adversarial), 0.001 (unlabelled adversarial, from step 0), 0.1 and
  T = 0.2 for L_semi (README's training command, Table 5 of the paper).
Deviations: D's "real" batch is the labelled batch's own masks (the released code draws a second,
independently shuffled batch of the same labelled images); any seglight network replaces
DeepLab-v2 (the paper's); inputs smaller than 32 pixels are upsampled before D (its five stride-2
convs need 32).

Logged (seglight.methods.base): loss_sup = L_ce + lambda_adv * L_adv (the labelled images' terms),
loss_unsup = lambda_semi_adv * L_adv (unlabelled) + lambda_semi * L_semi (the paper's split by
data, Sec. 3.2), each part also unweighted (loss_ce, loss_adv, loss_adv_unlabeled, loss_semi);
confident = the fraction of valid unlabelled pixels whose target enters L_semi (D's confidence
>= T_semi; 0 before `semi_start`); d_acc = D's pixel accuracy in its update (sigmoid(D) >= 0.5
read as "ground truth"), on the predictions it is trained on (fake) and the one-hot labels
(real), ignored and padding pixels left out; with held-out masks, the argmax of S on the
unlabelled images (the self-taught targets, before D's gate) against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seglight.methods.base import (
    SemiSupervisedModel,
    decision_accuracy,
    fraction,
    logits_of,
)


class FCDiscriminator(nn.Module):
    """Hung et al.'s fully convolutional discriminator.

    Args:
        num_classes: channels of the input probability maps.
        channels: channels of the first conv (64); then doubled up to 8x.

    Shapes: probabilities [B, num_classes, H, W] -> logits [B, 1, H, W] ("is ground truth"),
    computed at 1/32 and upsampled bilinearly to H, W.
    """

    min_size = 32

    def __init__(self, num_classes: int, channels: int = 64) -> None:
        super().__init__()
        widths = [num_classes, channels, 2 * channels, 4 * channels, 8 * channels]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, 2, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        size = probs.shape[-2:]
        if min(size) < self.min_size:  # five stride-2 convs need 32 pixels
            scale = self.min_size / min(size)
            target = (
                max(self.min_size, round(size[0] * scale)),
                max(self.min_size, round(size[1] * scale)),
            )
            probs = F.interpolate(probs, size=target, mode="bilinear", align_corners=True)
        out = self.layers(probs)
        return F.interpolate(out, size=size, mode="bilinear", align_corners=True)


def one_hot_labels(mask: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """int64 [B, H, W] -> float [B, num_classes, H, W]; ignored pixels all zero (released code)."""
    valid = mask != ignore_index
    onehot = F.one_hot(torch.where(valid, mask, 0), num_classes).permute(0, 3, 1, 2)
    return (onehot * valid[:, None]).float()


def masked_bce(
    logits: torch.Tensor, target: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean BCE-with-logits of D's map [B, 1, H, W] against a constant target (1 = ground truth,
    0 = prediction) over the `valid` pixels [B, H, W] (all when None); 0 when none is valid."""
    logits = logits[:, 0]
    if valid is not None:
        logits = logits[valid]
    if logits.numel() == 0:
        return logits.sum()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def confident_pseudo_labels(
    logits: torch.Tensor, d_logits: torch.Tensor, threshold: float, ignore_index: int
) -> torch.Tensor:
    """L_semi's targets: argmax of the logits [B, K, H, W] where sigmoid(D) [B, 1, H, W] >=
    `threshold`, `ignore_index` elsewhere -> int64 [B, H, W] (no gradient)."""
    pseudo = logits.detach().argmax(1)
    confident = torch.sigmoid(d_logits.detach()[:, 0]) >= threshold
    return torch.where(confident, pseudo, torch.full_like(pseudo, ignore_index))


class AdvSemiSeg(SemiSupervisedModel):
    """AdvSemiSeg (Hung et al., BMVC 2018): adversarial training with a fully convolutional
    discriminator and discriminator-gated self-training on unlabelled images.

    Args:
        lambda_adv: weight of the adversarial loss on labelled images (0.01).
        lambda_semi: weight of the self-training loss L_semi (0.1).
        lambda_semi_adv: weight of the adversarial loss on unlabelled images (0.001).
        semi_threshold: T_semi, the discriminator confidence above which a pixel's pseudo-label
            is used by L_semi (0.2).
        semi_start: the step from which L_semi is on (released code: 5000 of 20000 steps).
        d_lr: Adam learning rate of the discriminator (1e-4), with the same decay as the network.
        d_betas: Adam betas of the discriminator (0.9, 0.99).
        d_channels: channels of the discriminator's first conv (64).
        d_on_unlabeled: also train D on the unlabelled images' predictions (released `D_remain`).
        **kwargs: SemiSupervisedModel's (the network, the loss and optimiser of the segmentation
            network, ...).
    """

    def __init__(
        self,
        lambda_adv: float = 0.01,
        lambda_semi: float = 0.1,
        lambda_semi_adv: float = 0.001,
        semi_threshold: float = 0.2,
        semi_start: int = 5000,
        d_lr: float = 1e-4,
        d_betas: tuple[float, float] = (0.9, 0.99),
        d_channels: int = 64,
        d_on_unlabeled: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.discriminator = FCDiscriminator(self.num_classes, d_channels)

    def configure_optimizers(self) -> list[dict]:
        hp = self.hparams
        d_opt = torch.optim.Adam(
            self.discriminator.parameters(), lr=hp.d_lr, betas=tuple(hp.d_betas)
        )
        return self.with_auxiliary_optimizer(self.discriminator, d_opt)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        labeled, unlabeled = self.split_batch(batch)
        opt, d_opt = self.optimizers()
        mask = labeled["mask"]
        valid = mask != self.ignore_index

        # ---- the segmentation network: CE + adversarial (+ self-training) with D frozen
        self.toggle_optimizer(opt)
        output = self.net(self._input(labeled))
        logits = output["out"] if isinstance(output, dict) else output
        loss_ce = self.compute_loss(output, mask)
        probs = logits.softmax(1)
        loss_adv = masked_bce(self.discriminator(probs), 1.0, valid)
        loss = loss_ce + hp.lambda_adv * loss_adv
        losses = {"loss_ce": loss_ce, "loss_adv": loss_adv}
        unsup = loss_ce.new_zeros(())  # the unlabelled images' terms as weighted in `loss`
        monitor = {"loss_sup": loss.detach(), "confident": loss_ce.new_zeros(())}
        probs_u = None
        if hp.lambda_semi > 0 or hp.lambda_semi_adv > 0 or hp.d_on_unlabeled:
            logits_u = logits_of(self.net(self._input(unlabeled)))
            probs_u = logits_u.softmax(1)
            valid_u = unlabeled.get("valid")
            monitor.update(self.pseudo_label_monitor(logits_u.argmax(1), unlabeled))
            d_u = self.discriminator(probs_u)
            losses["loss_adv_unlabeled"] = masked_bce(d_u, 1.0, valid_u)
            loss = loss + hp.lambda_semi_adv * losses["loss_adv_unlabeled"]
            unsup = unsup + hp.lambda_semi_adv * losses["loss_adv_unlabeled"].detach()
            if hp.lambda_semi > 0 and self.after(self.hparams.semi_start):
                pseudo = confident_pseudo_labels(
                    logits_u, d_u, hp.semi_threshold, self.ignore_index
                )
                if valid_u is not None:  # never on the crop's padding
                    pseudo = pseudo.masked_fill(~valid_u, self.ignore_index)
                kept = pseudo != self.ignore_index
                # mean over the kept pixels; no term when D trusts none (released code)
                loss_semi = (
                    F.cross_entropy(logits_u, pseudo, ignore_index=self.ignore_index)
                    if kept.any()
                    else logits_u.sum() * 0.0
                )
                loss = loss + hp.lambda_semi * loss_semi
                unsup = unsup + hp.lambda_semi * loss_semi.detach()
                losses["loss_semi"] = loss_semi
                # the share of unlabelled pixels D trusts (the released code prints it)
                self.log("train/semi_ratio", kept.float().mean(), on_step=True, on_epoch=True)
                monitor["confident"] = fraction(kept, self.unlabeled_valid(unlabeled))
        monitor["loss_unsup"] = unsup
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.step_optimizer(opt)
        self.untoggle_optimizer(opt)
        losses["loss"] = loss

        # ---- the discriminator: predictions -> 0, one-hot labels -> 1 (each half of its loss)
        self.toggle_optimizer(d_opt)
        fake, fake_valid = probs.detach(), valid
        if hp.d_on_unlabeled and probs_u is not None:
            valid_u = unlabeled.get("valid", torch.ones_like(probs_u[:, 0], dtype=torch.bool))
            fake = torch.cat([fake, probs_u.detach()])
            fake_valid = torch.cat([valid, valid_u])
        real = one_hot_labels(mask, self.num_classes, self.ignore_index)
        d_fake, d_real = self.discriminator(fake), self.discriminator(real)
        loss_d = 0.5 * masked_bce(d_fake, 0.0, fake_valid)
        loss_d = loss_d + 0.5 * masked_bce(d_real, 1.0, valid)
        # sigmoid(D) >= 0.5: "ground truth"
        monitor["d_acc"] = decision_accuracy(d_real[:, 0] >= 0, valid, d_fake[:, 0] < 0, fake_valid)
        d_opt.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        self.step_optimizer(d_opt, counted=False)
        self.untoggle_optimizer(d_opt)

        losses["loss_d"] = loss_d
        self.log_losses({**losses, **monitor}, len(mask))
        return loss
