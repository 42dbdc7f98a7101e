"""SemiSupervisedModel: the base of training methods that learn from unlabelled images.

A method is a SegmentationModel (so it registers in MODELS, `model: MeanTeacher` works in YAML,
and it keeps the base model's metrics, logging, checkpoints, inference recipes and EMA) whose
segmentation network is any registered architecture, given as `network: UNet` or
`network: {class_path: DeepLabV3Plus, init_args: {encoder: resnet101}}`; num_classes and
in_channels come from the data. Validation, test and predict run `self.net` (or its EMA).

Training batches come from seglight.data.SemiSupervised: {"labeled": batch, "unlabeled": batch}.
Unlabelled batches carry an all-ignore "mask" (never read from disk) and "valid", bool [B, H, W],
False on the crop's padding.

The helpers below make the strong and weak views the methods need, on whole batches on their
device (no loader round trip): photometric jitter as UniMatch's strong augmentation (colour
jitter, grayscale, Gaussian blur), CutMix boxes (Yun et al. 2019; French et al. BMVC 2020 for
segmentation) and ClassMix masks (Olsson et al. WACV 2021); and the schedules: a sigmoid ramp-up
(Laine and Aila 2017, used by Mean Teacher) and "switch on after step N" (AdvSemiSeg's L_semi).

What every method records (`log_losses`: per step and as epoch means, so in W&B, the console and
metrics.json's history), under the same names:
- train/loss_sup and train/loss_unsup: the network's total split into its terms on the labelled
  images and the rest (unlabelled or generated images), each weighted as in the total, so that
  loss_sup + loss_unsup = loss (CPS: its cross term, which in the paper's plain form covers the
  labelled images too, is loss_unsup);
- train/confident: the fraction of valid unlabelled pixels that enter the unsupervised loss (over
  a confidence threshold; 1 for methods without one);
- train/d_acc (AdvSemiSeg, GANSemiSeg): the discriminator's pixel accuracy on its real / fake
  decision in the step;
- train/pseudo_acc and train/pseudo_mIoU, only when the data carries held-out masks of the
  unlabelled images (`SemiSupervised(monitor_unlabeled_masks=True)`: "heldout_mask", never
  trained on): the method's hard pseudo-labels (its targets' argmax on every valid unlabelled
  pixel, before any confidence gate) against them (`pseudo_label_quality`).
"""

from __future__ import annotations

import copy
import difflib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seglight.data.transforms import IMAGENET_MEAN, IMAGENET_STD, adjust_colour
from seglight.errors import ConfigError
from seglight.metrics import confusion_counts
from seglight.models.base import MODELS, PolyWithWarmup, SegmentationModel

NetworkSpec = str | dict[str, Any]


# ----------------------------------------------------------------------------- the network
def _architectures() -> dict[str, type]:
    """The architectures a method's `network:` can name (MODELS without the training methods and
    the models that do not train on their logits), imported lazily."""
    import seglight.methods  # noqa: F401  (the methods register in MODELS too)

    return {
        n: c
        for n, c in MODELS.items()
        if not issubclass(c, SemiSupervisedModel) and getattr(c, "trains_on_logits", True)
    }


def unknown_architecture(name: str, where: str | None = None) -> ConfigError:
    """The one-line error for an unknown `network:` architecture, with the close names."""
    known = _architectures()
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], list(known), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return ConfigError(
        f"network: unknown architecture {name!r}{f' (in {where})' if where else ''}.{hint} "
        f"Known: {', '.join(sorted(known))}"
    )


def build_network(spec: NetworkSpec, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A fresh segmentation network (the `.net` of a registered architecture).

    spec: a short name ("UNet"), a dotted class path, or {"class_path": ..., "init_args": {...}}.
    """
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, dict) and "class_path" in spec:
        name, options = str(spec["class_path"]), dict(spec.get("init_args") or {})
    else:
        raise ConfigError(
            f"network: expected an architecture name or {{class_path, init_args}}, got {spec!r}"
        )
    short = name.rsplit(".", 1)[-1]
    cls = MODELS.get(short)
    if cls is None:
        raise unknown_architecture(name)
    if issubclass(cls, SemiSupervisedModel):
        raise ConfigError(f"network: {short} is a training method, not an architecture")
    if not cls.trains_on_logits:  # e.g. Mask2Former: its logits carry no gradient in training
        raise ConfigError(
            f"network: {short} trains with its own objective (trains_on_logits = False), not with "
            "a method's per-pixel losses on its logits; choose another architecture"
        )
    for key in ("num_classes", "in_channels"):
        if key in options:
            raise ConfigError(f"network: {short}'s {key} is taken from the data; remove it")
    return cls(num_classes=num_classes, in_channels=in_channels, **options).net


def logits_of(output: torch.Tensor | dict) -> torch.Tensor:
    """The main logits of a network's output (a tensor, or {"out", "aux"} in training)."""
    return output["out"] if isinstance(output, dict) else output


# ----------------------------------------------------------------------------- views on the device
def _per_image(draw: torch.Tensor, p: float, lo: float, hi: float) -> torch.Tensor:
    """Factors [B] uniform in [lo, hi], or 1 where the draw misses probability p."""
    b = draw.shape[0]
    factor = lo + (hi - lo) * torch.rand(b, device=draw.device)
    return torch.where(draw < p, factor, torch.ones_like(factor))


def _rotate_hue(image: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Hue rotation by `angle` (radians, [B]) in YIQ space; image [B, 3, H, W] in [0, 255]."""
    r, g, b = image.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    i = 0.596 * r - 0.274 * g - 0.322 * b
    q = 0.211 * r - 0.523 * g + 0.312 * b
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    i, q = i * cos - q * sin, i * sin + q * cos
    rgb = torch.stack(
        [y + 0.956 * i + 0.621 * q, y - 0.272 * i - 0.647 * q, y - 1.106 * i + 1.703 * q], 1
    )
    return rgb.clamp(0, 255)


def _blur(image: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with one sigma per image ([B], 0 = none); image [B, C, H, W]."""
    b, c, h, w = image.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    x = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma.clamp(min=1e-3).view(-1, 1) ** 2))  # [B, K]
    kernel = torch.where(sigma.view(-1, 1) > 0, kernel, (x == 0).to(image.dtype).expand(b, -1))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, K]
    flat = image.reshape(1, b * c, h, w)
    flat = F.pad(
        flat,
        (radius, radius, radius, radius),
        mode="reflect" if min(h, w) > radius else "replicate",
    )
    flat = F.conv2d(flat, kernel.view(b * c, 1, 1, -1), groups=b * c)
    flat = F.conv2d(flat, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return flat.view(b, c, h, w)


def photometric_jitter(
    image: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    p: float = 0.8,
    brightness: float = 0.5,
    contrast: float = 0.5,
    saturation: float = 0.5,
    hue: float = 0.25,
    grayscale_p: float = 0.2,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
) -> torch.Tensor:
    """UniMatch's strong photometric augmentation on a normalised batch [B, 3, H, W], per image:
    with probability p colour jitter (brightness, contrast, saturation factors in [1 - s, 1 + s],
    hue rotated by up to hue * 360 degrees: torchvision's hue factor is a fraction of the hue
    circle, so UniMatch's ColorJitter(hue=0.25) shifts up to +-90), grayscale with probability
    grayscale_p, Gaussian
    blur (sigma uniform in blur_sigma) with probability blur_p. Returns the same shape,
    normalised. Images without 3 channels are returned unchanged.

    Deviation: torchvision's ColorJitter applies the four adjustments in a random order and the
    hue shift in HSV space; here the order is fixed and the hue is rotated in YIQ space.
    """
    if image.shape[1] != 3:
        return image
    b = image.shape[0]
    m = torch.tensor(mean[:3], device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std[:3], device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
    x = (image * s + m) * 255
    jitter = torch.rand(b, device=image.device)
    x = adjust_colour(
        x,
        _per_image(jitter, p, 1 - brightness, 1 + brightness),
        _per_image(jitter, p, 1 - contrast, 1 + contrast),
        _per_image(jitter, p, 1 - saturation, 1 + saturation),
    )
    if hue > 0:
        angle = (2 * torch.rand(b, device=image.device) - 1) * hue * 2 * math.pi
        x = _rotate_hue(x, torch.where(jitter < p, angle, torch.zeros_like(angle)))
    gray = torch.rand(b, device=image.device) < grayscale_p
    luma = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
    x = torch.where(gray.view(-1, 1, 1, 1), luma, x)
    if blur_p > 0:
        sigma = blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * torch.rand(b, device=x.device)
        sigma = torch.where(torch.rand(b, device=x.device) < blur_p, sigma, torch.zeros_like(sigma))
        x = _blur(x, sigma)
    return (x / 255 - m) / s


def cutmix_boxes(
    batch: int,
    size: tuple[int, int],
    device: torch.device | str = "cpu",
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """CutMix boxes, bool [B, H, W]: with probability p a box of area fraction uniform in `area`
    and aspect ratio (w/h) uniform in `ratio` at a uniform position (clipped to the image), else
    none; UniMatch's obtain_cutmix_box with its defaults (one box per image)."""
    h, w = size
    boxes = torch.zeros(batch, h, w, dtype=torch.bool, device=device)
    draws = torch.rand(batch, 5).tolist()  # host-side draws: a few numbers per image
    for i, (on, a, r, y, x) in enumerate(draws):
        if on >= p:
            continue
        frac = area[0] + (area[1] - area[0]) * a
        aspect = ratio[0] + (ratio[1] - ratio[0]) * r
        bw = min(w, int(round(math.sqrt(frac * h * w * aspect))))
        bh = min(h, int(round(math.sqrt(frac * h * w / aspect))))
        top, left = int(y * (h - bh + 1)), int(x * (w - bw + 1))
        boxes[i, top : top + bh, left : left + bw] = True
    return boxes


def classmix_masks(labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """ClassMix masks, bool [B, H, W]: for each image of labels [B, H, W] (pseudo-labels),
    the pixels of a random half of the classes present in it (Olsson et al. 2021, Sec. 3.1)."""
    masks = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for i in range(labels.shape[0]):
        classes = labels[i].unique()
        classes = classes[classes != ignore_index]
        if len(classes) == 0:
            continue
        chosen = classes[
            torch.randperm(len(classes), device=classes.device)[: (len(classes) + 1) // 2]
        ]
        masks[i] = torch.isin(labels[i], chosen)
    return masks


def mix(where: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`source` inside the mask `where` ([B, H, W]), `target` elsewhere; tensors [B, H, W] or
    [B, C, H, W]."""
    if source.dim() == where.dim() + 1:
        where = where.unsqueeze(1)
    return torch.where(where, source, target)


def sigmoid_rampup(step: int, length: int) -> float:
    """exp(-5 (1 - t)^2) with t = step / length clipped to [0, 1] (Laine and Aila 2017, used by
    Mean Teacher); 1 when length is 0."""
    if length <= 0:
        return 1.0
    t = min(max(step, 0), length) / length
    return math.exp(-5.0 * (1.0 - t) ** 2)


# ----------------------------------------------------------------------------- what methods record
def fraction(kept: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The fraction of the `valid` pixels that are `kept` (bool tensors of one shape); 0 when
    none is valid. No host sync."""
    return (kept & valid).sum() / valid.sum().clamp(min=1)


def decision_accuracy(
    real_right: torch.Tensor,
    real_valid: torch.Tensor | None,
    fake_right: torch.Tensor,
    fake_valid: torch.Tensor | None,
) -> torch.Tensor:
    """A discriminator's pixel accuracy on its real / fake decision: where it called real pixels
    real (`real_right`, bool [B, H, W]) and fake ones fake (`fake_right`), over their valid
    pixels (all when None); 0 when none is valid. No host sync."""
    if real_valid is None:
        real_valid = torch.ones_like(real_right)
    if fake_valid is None:
        fake_valid = torch.ones_like(fake_right)
    right = (real_right & real_valid).sum() + (fake_right & fake_valid).sum()
    return right / (real_valid.sum() + fake_valid.sum()).clamp(min=1)


def pseudo_label_quality(
    pseudo: torch.Tensor,
    heldout: torch.Tensor,
    valid: torch.Tensor | None,
    num_classes: int,
    ignore_index: int = 255,
) -> dict[str, torch.Tensor]:
    """{"pseudo_acc", "pseudo_mIoU"} of pseudo-labels int [B, H, W] against held-out masks
    [B, H, W], over the `valid` pixels (bool [B, H, W]; all when None) whose held-out label is not
    `ignore_index` (and whose pseudo-label is a class). pseudo_acc is the pixel accuracy;
    pseudo_mIoU the mean IoU over the classes present in the held-out labels or the
    pseudo-labels (seglight.metrics' definitions). NaN when no pixel counts. On the device, no
    host sync (one confusion matrix, seglight.metrics.confusion_counts)."""
    target = heldout.long()
    pseudo = pseudo.long()
    keep = (pseudo >= 0) & (pseudo < num_classes)
    if valid is not None:
        keep = keep & valid
    target = target.masked_fill(~keep, ignore_index)
    m = confusion_counts(pseudo.clamp(0, num_classes - 1), target, num_classes, ignore_index)
    m = m.double()
    hits = m.diagonal()
    union = m.sum(0) + m.sum(1) - hits
    present = union > 0
    iou = hits / union.clamp(min=1)
    return {
        "pseudo_acc": (hits.sum() / m.sum()).float(),  # 0 / 0: NaN
        "pseudo_mIoU": ((iou * present).sum() / present.sum()).float(),
    }


# ----------------------------------------------------------------------------- the base method
class SemiSupervisedModel(SegmentationModel):
    """Base of the semi- and weakly supervised methods (see the module docstring).

    Args:
        network: the segmentation network: a registered architecture's short name, or
            {class_path: NAME, init_args: {...}} (num_classes and in_channels from the data).
        **kwargs: loss, optimiser, schedule, EMA and inference options: see SegmentationModel.
    """

    def __init__(self, network: NetworkSpec = "DeepLabV3Plus", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.network_spec = network
        self.net = self.build_network()

    def build_network(self) -> nn.Module:
        """A fresh network as given by `network` (methods with two networks call it twice)."""
        return build_network(self.network_spec, self.num_classes, self.in_channels)

    # ------------------------------------------------------------------ batches
    def check_data(self, datamodule: Any, stage: str) -> None:
        """A fit needs SemiSupervised data with images left unlabelled (checked at the start,
        before the run directory gets files, rather than at the first training step)."""
        if stage != "fit":
            return
        name = type(self).__name__
        unlabeled = getattr(datamodule, "datasets", {}).get("unlabeled")
        if unlabeled is None:
            raise ConfigError(
                f"{name} trains on labelled and unlabelled images: use `data: SemiSupervised` "
                f"with labeled < all (got {type(datamodule).__name__})"
            )
        if len(unlabeled) == 0:
            labelled = len(datamodule.datasets["train"])
            raise ConfigError(
                f"{name} trains on labelled and unlabelled images, but "
                f"{datamodule.describe_labeled()} labels all {labelled} training images: label "
                "fewer (--data.labeled: a fraction below 1 or a smaller count), or train a plain "
                "model on them"
            )

    def split_batch(self, batch: dict) -> tuple[dict, dict]:
        """(labelled batch, unlabelled batch) of a SemiSupervised training batch."""
        if "labeled" not in batch or "unlabeled" not in batch:
            got = "a plain batch" if "image" in batch else f"keys {sorted(batch)}"
            raise ConfigError(
                f"{type(self).__name__} trains on labelled and unlabelled images: use "
                f"`data: SemiSupervised` with labeled < all (got {got})"
            )
        return batch["labeled"], batch["unlabeled"]

    def data_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The data's normalisation (mean, std), for views made in pixel space."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        return getattr(dm, "mean", IMAGENET_MEAN), getattr(dm, "std", IMAGENET_STD)

    def strong_view(self, image: torch.Tensor, **options: Any) -> torch.Tensor:
        """photometric_jitter of a normalised batch with the data's normalisation."""
        mean, std = self.data_stats()
        return photometric_jitter(image, mean, std, **options)

    def after(self, step: int) -> bool:
        """True from optimiser step `step` on (a term "switched on after step N"); the step
        counter is Lightning's global_step, restored on resume."""
        return self.global_step >= step

    def unlabeled_valid(self, unlabeled: dict) -> torch.Tensor:
        """The unlabelled batch's "valid" pixels (bool [B, H, W]; all when it has none)."""
        valid = unlabeled.get("valid")
        if valid is None:
            valid = torch.ones_like(unlabeled["mask"], dtype=torch.bool)
        return valid

    def pseudo_label_monitor(self, pseudo: torch.Tensor, unlabeled: dict) -> dict:
        """The pseudo-label monitor's values (`pseudo_label_quality` of `pseudo`, the method's
        hard pseudo-labels int [B, H, W] of the unlabelled batch, against its "heldout_mask", on
        its valid pixels) when the batch carries held-out masks, else {}. Only the monitor reads
        "heldout_mask": no loss does."""
        heldout = unlabeled.get("heldout_mask")
        if heldout is None:
            return {}
        with torch.no_grad():
            return pseudo_label_quality(
                pseudo.detach(),
                heldout,
                self.unlabeled_valid(unlabeled),
                self.num_classes,
                self.ignore_index,
            )

    def log_losses(self, losses: dict[str, torch.Tensor], batch_size: int) -> None:
        """Log train/<name> for each loss term and recorded value (train/loss is the total; see
        the module docstring for the names every method shares), per step and epoch."""
        for name, value in losses.items():
            key = "train/loss" if name == "loss" else f"train/{name}"
            self.log(key, value.detach(), on_step=True, on_epoch=True, batch_size=batch_size)

    # ------------------------------------------------------------------ two players
    def with_auxiliary_optimizer(
        self, player: nn.Module, optimizer: torch.optim.Optimizer, schedule: bool = True
    ) -> list[dict]:
        """configure_optimizers of a method with a second player trained by its own optimiser
        (AdvSemiSeg's discriminator, GANSemiSeg's generator; manual optimisation): the base
        model's optimiser and schedule over everything but `player`, then `optimizer` (over
        `player`) with the same schedule's factor (`schedule`) or a constant learning rate."""
        # parameter_groups leaves out parameters without gradients (as it does the EMA copy)
        player.requires_grad_(False)
        try:
            main = super().configure_optimizers()
        finally:
            player.requires_grad_(True)
        factor = main["lr_scheduler"]["scheduler"].lr_lambdas[0]
        factor = copy.copy(factor) if schedule else PolyWithWarmup(1, kind="constant")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return [
            main,
            {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}},
        ]

    # ------------------------------------------------------------------ manual optimisation + DDP
    def _ddp(self) -> nn.parallel.DistributedDataParallel | None:
        """The DDP wrapper of this module in a distributed manual-optimisation run, else None."""
        if self._trainer is None or self.automatic_optimization:
            return None
        wrapped = getattr(self.trainer.strategy, "model", None)
        return wrapped if isinstance(wrapped, nn.parallel.DistributedDataParallel) else None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """With manual optimisation under DDP, the gradients are averaged by `step_optimizer`,
        per optimiser, not by DDP's reducer: a step here has several backward passes over
        different players (the network, then the discriminator or generator), which the reducer
        (one backward over every parameter per forward) rejects as unused parameters, and
        find_unused_parameters would average every player's gradients at each backward. The
        reducer is switched off as `no_sync` does; the buffers (BatchNorm statistics) are still
        broadcast from rank 0 at the step's first forward, as DDP does."""
        super().on_train_batch_start(batch, batch_idx)
        ddp = self._ddp()
        if ddp is not None:
            ddp.require_backward_grad_sync = False
            ddp.require_forward_param_sync = True

    def sync_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Average the gradients of `optimizer`'s parameters over the DDP ranks (manual
        optimisation; see on_train_batch_start). A parameter without a gradient on every rank
        keeps none (the optimiser skips it, as in one process); one with a gradient on some
        ranks only counts zeros for the others. Two collectives per call, whatever the size."""
        ddp = self._ddp()
        if ddp is None or not torch.distributed.is_initialized():
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not params:
            return
        has_grad = torch.tensor(
            [p.grad is not None for p in params], dtype=torch.float32, device=params[0].device
        )
        torch.distributed.all_reduce(has_grad)
        used = [p for p, n in zip(params, has_grad.tolist(), strict=True) if n > 0]
        if not used:
            return
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in used]
        )
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
        for p, grad in zip(used, flat.split([p.numel() for p in used]), strict=True):
            p.grad = grad.view_as(p).clone()

    def step_optimizer(self, optimizer: Any, counted: bool = True) -> None:
        """Manual optimisation: step `optimizer` (one of self.optimizers()) and its schedule.

        Only the network's optimiser is `counted` in global_step, so that a step is a batch as
        for every other model (max_steps, schedules, `after(N)`); the second player's step goes
        through the same strategy and precision plugin (gradient unscaling), uncounted. Under
        DDP the gradients are averaged over the ranks first (sync_gradients)."""
        self.sync_gradients(optimizer.optimizer)
        if counted:
            optimizer.step()
            if self.ema is not None:  # the base model updates it in optimizer_step (automatic only)
                self.ema.update(self.net)
        else:
            self.trainer.strategy.optimizer_step(
                optimizer.optimizer, closure=lambda: None, model=self
            )
        for config in self.trainer.lr_scheduler_configs:
            if config.scheduler.optimizer is optimizer.optimizer:
                config.scheduler.step()


# the base of the methods is not a method of its own: not listed, not parametrised over in tests
del MODELS[SemiSupervisedModel.__name__]
