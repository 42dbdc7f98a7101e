"""GANSemiSeg (Souly, Spampinato and Shah, ICCV 2017, "Semi Supervised Semantic Segmentation
Using Generative Adversarial Network").

The segmentation network is the discriminator of a GAN: it outputs K + 1 channels per pixel, the
K classes and "fake". A generator G maps noise to images. The segmentation network is trained on

- labelled pixels: cross-entropy over the K classes (the base model's loss on the first K
  channels);
- unlabelled images: pushed to "real", -log(1 - p_fake) per pixel;
- generated images: pushed to "fake", -log p_fake per pixel;

and G to make the network call its images real, -log(1 - p_fake(G(z))) (the non-saturating
form). With logits s [K + 1], log(1 - p_fake) = logsumexp(s_1..K) - logsumexp(s) (Salimans et
al. 2016, whose K+1-class semi-supervised GAN the paper extends to pixels). forward() and the
metrics see the K class channels only.

The paper evaluates on PASCAL VOC 2012, SiftFlow, Stanford Background and CamVid; no code was
released, so the details below are our choices, stated as such.

The generator is DCGAN's (Radford et al. 2016; our choice of a standard noise-to-image GAN): noise z [B, 100] is projected and
reshaped to [8c, h/16, w/16], then four fractionally-strided 4x4 convolutions (BN-ReLU) double
the resolution up to `image_size` (the crop; resized to a batch of another size), the last
with tanh; its output, in [0, 1] after
(tanh + 1) / 2, is normalised like the data (ImageNet mean / std). G is optimised by Adam at a
constant lr 2e-4, betas 0.5 / 0.999 (DCGAN's; the paper does not give G's optimiser), while the
segmentation network follows the model's own schedule.
Deviations: the labelled loss is the K-way cross-entropy (the paper's K+1-way one differs
only by the fake channel's share of the softmax); generated images are normalised with their own batch statistics by the network's
BatchNorm layers but do not enter the running statistics used at evaluation (they would pull
them towards G's images); the paper does not say.

Logged (seglight.methods.base): loss_sup = the labelled cross-entropy (also loss_ce), loss_unsup =
lambda_unlabeled * loss_real + lambda_fake * loss_fake (the unlabelled and generated images'
terms); confident = 1 (every valid unlabelled pixel enters); d_acc = the network's pixel accuracy
as the discriminator in its update: unlabelled pixels called real (p_fake < 0.5) and generated
ones called fake; with held-out masks, the argmax of its K class channels on the unlabelled
images (its classification of them; the method has no pseudo-labels) against them.

A warm start (`init_from`) from a supervised checkpoint of the same architecture, whose network
has K output channels: its class channels are copied and the "fake" channel keeps its
initialisation (`init_networks`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from seglight.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from seglight.methods.base import (
    SemiSupervisedModel,
    build_network,
    decision_accuracy,
    fraction,
    logits_of,
)
from seglight.nn import resize_to


class DCGANGenerator(nn.Module):
    """DCGAN generator: noise [B, z_dim] -> images [B, 3, H, W], normalised with mean / std.

    Args:
        image_size: (H, W) of the generated images (the training crop).
        z_dim: noise dimension (100).
        channels: channels of the last hidden layer (64); the first has 8x.
        stages: fractionally-strided convolutions (4: from 1/16 of the size).
        mean, std: the data's normalisation of [0, 1] images (ImageNet's by default).
    """

    def __init__(
        self,
        image_size: Sequence[int] = (64, 64),
        z_dim: int = 100,
        channels: int = 64,
        stages: int = 4,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.z_dim = z_dim
        f = 2**stages
        self.base = (math.ceil(self.image_size[0] / f), math.ceil(self.image_size[1] / f))
        c0 = channels * 2 ** (stages - 1)
        self.project = nn.Sequential(
            nn.Linear(z_dim, c0 * self.base[0] * self.base[1], bias=False),
            nn.Unflatten(1, (c0, *self.base)),
            nn.BatchNorm2d(c0),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        c = c0
        for _ in range(stages - 1):
            layers += [
                nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c // 2),
                nn.ReLU(inplace=True),
            ]
            c //= 2
        layers += [nn.ConvTranspose2d(c, len(mean), 4, 2, 1), nn.Tanh()]
        self.layers = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        for m in self.modules():  # DCGAN's initialisation
            if isinstance(m, (nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def sample_noise(self, n: int, device: torch.device) -> torch.Tensor:
        """z ~ U(-1, 1) [n, z_dim] (DCGAN's)."""
        return torch.rand(n, self.z_dim, device=device) * 2 - 1

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.project(z))[..., : self.image_size[0], : self.image_size[1]]
        return ((x + 1) / 2 - self.mean) / self.std


@contextmanager
def frozen_norm_statistics(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of `module` normalise with the batch's statistics but leave their
    running statistics unchanged (momentum 0) inside the block."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum


def real_fake_losses(
    logits: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel means (-log(1 - p_fake), -log p_fake) of logits [B, K + 1, H, W] whose last
    channel is "fake", over the `valid` pixels [B, H, W] (all when None)."""
    total = torch.logsumexp(logits, 1)
    real = torch.logsumexp(logits[:, :-1], 1)
    as_real, as_fake = total - real, total - logits[:, -1]
    if valid is not None:
        as_real, as_fake = as_real[valid], as_fake[valid]
    return as_real.mean(), as_fake.mean()


def called_fake(logits: torch.Tensor) -> torch.Tensor:
    """bool [B, H, W]: where logits [B, K + 1, H, W] give p_fake > 0.5 (the fake channel's logit
    over the logsumexp of the K class channels)."""
    return logits[:, -1] > torch.logsumexp(logits[:, :-1], 1)


def class_channels(output: torch.Tensor | dict, k: int) -> torch.Tensor | dict:
    """The first k channels of a network's output (a tensor, or {"out", "aux"} in training)."""
    if not isinstance(output, dict):
        return output[:, :k]
    aux = output.get("aux")
    if isinstance(aux, torch.Tensor):
        aux = aux[:, :k]
    elif aux:
        aux = [a[:, :k] for a in aux]
    return {"out": output["out"][:, :k], "aux": aux}


class GANSemiSeg(SemiSupervisedModel):
    """GANSemiSeg (Souly et al., ICCV 2017): the segmentation network as a (K + 1)-class
    discriminator against a DCGAN generator.

    Args:
        image_size: (H, W) of the generated images: the training crop.
        z_dim: the generator's noise dimension (100).
        g_channels: channels of the generator's last hidden layer (64).
        g_lr: Adam learning rate of the generator (2e-4, constant as DCGAN's).
        g_betas: Adam betas of the generator (0.5, 0.999).
        lambda_unlabeled: weight of the unlabelled images' "real" loss (1).
        lambda_fake: weight of the generated images' "fake" loss (1).
        **kwargs: SemiSupervisedModel's.
    """

    def __init__(
        self,
        image_size: tuple[int, int] = (64, 64),
        z_dim: int = 100,
        g_channels: int = 64,
        g_lr: float = 2e-4,
        g_betas: tuple[float, float] = (0.5, 0.999),
        lambda_unlabeled: float = 1.0,
        lambda_fake: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.generator = DCGANGenerator(image_size, z_dim, g_channels)

    def build_network(self) -> nn.Module:
        """The network with K + 1 output channels: the data's classes and "fake"."""
        return build_network(self.network_spec, self.num_classes + 1, self.in_channels)

    def init_networks(self, state: dict[str, torch.Tensor], where: str) -> None:
        """`init_from`: a network with K output channels (a supervised checkpoint) fills the K
        class channels of this one's K + 1 (tensors one longer along one dimension, as the
        classifiers' weights and biases); the "fake" channel keeps its initialisation."""
        k, ours = self.num_classes, getattr(self.net, "_orig_mod", self.net).state_dict()
        state = dict(state)
        for key, value in state.items():
            mine = ours.get(key)
            if mine is None or mine.dim() != value.dim():
                continue
            grown = [d for d in range(mine.dim()) if (value.shape[d], mine.shape[d]) == (k, k + 1)]
            same = [d for d in range(mine.dim()) if value.shape[d] == mine.shape[d]]
            if len(grown) == 1 and len(same) == mine.dim() - 1:
                state[key] = torch.cat([value, mine.narrow(grown[0], k, 1).cpu()], grown[0])
        super().init_networks(state, where)

    def configure_optimizers(self) -> list[dict]:
        hp = self.hparams
        g_opt = torch.optim.Adam(self.generator.parameters(), lr=hp.g_lr, betas=tuple(hp.g_betas))
        return self.with_auxiliary_optimizer(self.generator, g_opt, schedule=False)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        labeled, unlabeled = self.split_batch(batch)
        opt, g_opt = self.optimizers()
        n_fake, size = len(unlabeled["image"]), tuple(unlabeled["image"].shape[-2:])

        # ---- the segmentation network (the discriminator): K classes, real, fake
        self.toggle_optimizer(opt)
        loss_ce = self.compute_loss(self.net(self._input(labeled)), labeled["mask"])
        logits_u = logits_of(self.net(self._input(unlabeled)))
        loss_real, _ = real_fake_losses(logits_u, unlabeled.get("valid"))
        with torch.no_grad():
            fake_images = self.generate(n_fake, size)
        with frozen_norm_statistics(self.net):
            logits_fake = logits_of(self.net(fake_images))
            _, loss_fake = real_fake_losses(logits_fake)
        loss = loss_ce + hp.lambda_unlabeled * loss_real + hp.lambda_fake * loss_fake
        valid = self.unlabeled_valid(unlabeled)
        with torch.no_grad():
            monitor = {
                "loss_sup": loss_ce.detach(),
                "loss_unsup": (hp.lambda_unlabeled * loss_real + hp.lambda_fake * loss_fake),
                "confident": fraction(valid, valid),
                "d_acc": decision_accuracy(
                    ~called_fake(logits_u), valid, called_fake(logits_fake), None
                ),
                **self.pseudo_label_monitor(logits_u[:, : self.num_classes].argmax(1), unlabeled),
            }
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.step_optimizer(opt)
        self.untoggle_optimizer(opt)

        # ---- the generator: make the network call its images real
        self.toggle_optimizer(g_opt)
        fake_images = self.generate(n_fake, size)
        with frozen_norm_statistics(self.net):
            loss_g, _ = real_fake_losses(logits_of(self.net(fake_images)))
        g_opt.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        self.step_optimizer(g_opt, counted=False)
        self.untoggle_optimizer(g_opt)

        self.log_losses(
            {
                "loss": loss,
                "loss_ce": loss_ce,
                "loss_real": loss_real,
                "loss_fake": loss_fake,
                "loss_g": loss_g,
                **monitor,
            },
            len(labeled["mask"]),
        )
        return loss

    def generate(self, n: int, size: tuple[int, int]) -> torch.Tensor:
        """n generated images [n, 3, *size] (resized when `size`, the real batch's, differs from
        the generator's `image_size`)."""
        return resize_to(self.generator(self.generator.sample_noise(n, self.device)), size)

    def compute_loss(self, output: torch.Tensor | dict, mask: torch.Tensor) -> torch.Tensor:
        """The base model's loss on the K class channels (main and auxiliary heads alike)."""
        return super().compute_loss(class_channels(output, self.num_classes), mask)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes, H, W] of the K classes (the "fake" channel dropped)."""
        return super().forward(image)[:, : self.num_classes]
