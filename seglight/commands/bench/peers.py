"""The networks under test and the plain loops that train them.

- "seglight": `Trainer.fit` of the SegmentationModel (seglight.commands.bench.training);
- "raw loop": a second instance of the same model (same seed), trained by a plain loop:
  zero_grad, forward, `model.compute_loss`, backward, optimizer.step, scheduler.step;
- smp / torchvision: the same plain loop on their network, seglight's loss on the main output.
  smp builds the encoder from timm ("tu-<name>"), so encoders are identical, and gets the same
  head width and ASPP rates; parameter and FLOP counts are printed side by side. Only matching
  networks make a speed ratio: DeepLabV3+ against smp's needs `--model.separable true` (smp's
  decoder is depthwise-separable after the concatenation and, with it, in ASPP; seglight's
  default is the paper's full 3x3 convs, 40.35M parameters / 34.6 GFLOPs at 256x256 against
  smp's 39.21M / 24.7); a pairing that is not the same network is flagged in the notes.

Every peer gets seglight's loss, the same optimiser (AdamW or SGD as the model's options say,
weight decay on weights only, fused wherever torch has the kernel: CUDA and the CPU), per-step LR
schedule, precision (autocast, plus a GradScaler for 16-mixed), memory format and torch.compile
setting. Peers are optional: smp comes with `pip install segmentation-models-pytorch` (the
`bench` extra); a missing one is reported and skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from seglight.commands.bench.measure import Measured
from seglight.commands.bench.profiling import phase

PRECISIONS = {"32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}

#: seglight architecture -> (smp class, {seglight option: smp argument}); the encoder maps to
#: smp's "tu-<timm name>". Architectures missing here have no smp peer.
SMP_PEERS: dict[str, tuple[str, dict[str, str]]] = {
    "UNet": ("Unet", {"decoder_channels": "decoder_channels"}),
    "LinkNet": ("Linknet", {}),
    "PSPNet": ("PSPNet", {}),
    "DeepLabV3": (
        "DeepLabV3",
        {
            "output_stride": "encoder_output_stride",
            "rates": "decoder_atrous_rates",
            "separable": "decoder_aspp_separable",
        },
    ),
    "DeepLabV3Plus": (
        "DeepLabV3Plus",
        {
            "output_stride": "encoder_output_stride",
            "rates": "decoder_atrous_rates",
            "separable": "decoder_aspp_separable",
        },
    ),
}
#: caveats shown with an smp peer that is not the same network: name -> (when, note)
SMP_NOTES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "PSPNet": (
        lambda hp: True,
        "smp's PSPNet stops at encoder depth 3 (no dilated stages): not the same network",
    ),
    "DeepLabV3Plus": (
        lambda hp: not hp.get("separable"),
        "NOT the same network: smp's decoder is depthwise-separable after the concatenation; "
        "seglight's default has the paper's two full 3x3 convs (compare per GFLOP, or pair "
        "them fairly with --model.separable true)",
    ),
}
#: seglight architecture -> torchvision segmentation models (ResNet-50, output stride 8)
TORCHVISION_PEERS = {
    "DeepLabV3": ["deeplabv3_resnet50", "fcn_resnet50"],
    "DeepLabV3Plus": ["deeplabv3_resnet50", "fcn_resnet50"],
    "FCN32s": ["fcn_resnet50"],
    "FCN16s": ["fcn_resnet50"],
    "FCN8s": ["fcn_resnet50"],
}


@dataclass
class Peer:
    """One network under test. `step` trains it one step on a batch (None for seglight, which
    Trainer.fit drives); `predict` gives labels [B, H, W] for images [B, C, H, W]."""

    name: str
    module: nn.Module
    predict: Callable[[torch.Tensor], torch.Tensor]
    step: Callable[[dict], None] | None = None
    optimizer: torch.optim.Optimizer | None = None
    gflops: float | None = None  # per image, forward (seglight.profile.count_flops)
    profile: dict | None = None  # the training step's profile (bench --profile)
    train: Measured = field(default_factory=Measured)
    infer: Measured = field(default_factory=Measured)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def main_output(out: Any) -> torch.Tensor:
    return out["out"] if isinstance(out, dict) else out


def make_optimizer(
    groups: list[dict], hparams: Any, total_steps: int, device: torch.device
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimiser and per-step schedule that SegmentationModel.configure_optimizers builds."""
    from seglight.models.base import PolyWithWarmup, fused_option

    fused = fused_option(device)
    if hparams.get("optimizer", "adamw") == "sgd":
        optimizer = torch.optim.SGD(groups, lr=hparams.lr, momentum=hparams.momentum, **fused)
    else:
        optimizer = torch.optim.AdamW(groups, lr=hparams.lr, **fused)
    factor = PolyWithWarmup(
        total_steps, hparams.warmup_steps, hparams.poly_power, hparams.get("scheduler", "poly")
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights, none on norms and biases (for peers without parameter_groups)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


class Runner:
    """Builds the hand-written training loop of a peer, at the bench's device and precision."""

    def __init__(
        self, device: torch.device, precision: str, channels_last: bool, total_steps: int
    ) -> None:
        self.device, self.precision = device, precision
        self.dtype = PRECISIONS[precision]
        self.channels_last = channels_last and device.type == "cuda"
        self.total_steps = total_steps
        self.labels = False  # the plain loops' phases as profiler ranges (bench --profile)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def plain_peer(
        self,
        name: str,
        net: nn.Module,
        loss: Callable[[Any, torch.Tensor], torch.Tensor],
        groups: list[dict],
        hparams: Any,
        compile: bool = False,
    ) -> Peer:
        """`net` trained by a plain loop with `loss`, the model's optimiser and schedule."""
        net.to(self.device)
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        run = torch.compile(net) if compile else net
        optimizer, scheduler = make_optimizer(groups, hparams, self.total_steps, self.device)
        scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None

        def step(batch: dict) -> None:
            labels = self.labels
            with phase(labels, "zero_grad"):
                optimizer.zero_grad(set_to_none=True)
            with phase(labels, "forward + loss"), self.autocast():
                value = loss(run(batch["image"]), batch["mask"])
            with phase(labels, "backward"):
                (value if scaler is None else scaler.scale(value)).backward()
            with phase(labels, "optimizer.step"):
                if scaler is None:
                    optimizer.step()
                else:
                    scaler.step(optimizer)
                    scaler.update()
            with phase(labels, "scheduler.step"):
                scheduler.step()

        def predict(image: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return main_output(run(image)).argmax(1)

        return Peer(name, net, predict, step, optimizer)


def smp_network(name: str, hp: Any, num_classes: int, in_channels: int) -> tuple[nn.Module, str]:
    """segmentation_models_pytorch's equivalent of architecture `name` with the hyperparameters
    `hp`, on the same timm encoder; raises LookupError (why) when there is none."""
    spec = SMP_PEERS.get(name)
    encoder = hp.get("encoder")
    if spec is None:
        raise LookupError(f"no smp equivalent of {name} in seglight.commands.bench.peers.SMP_PEERS")
    if not isinstance(encoder, str) or not _is_timm(encoder):
        raise LookupError(f"{name} with encoder {encoder!r} has no smp equivalent")
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise LookupError(
            "segmentation-models-pytorch is not installed "
            "(pip install segmentation-models-pytorch, or seglight[bench])"
        ) from None
    smp_name, options = spec
    kwargs = {theirs: hp[ours] for ours, theirs in options.items() if hp.get(ours) is not None}
    if "decoder_atrous_rates" in kwargs:  # ours are given at output stride 16
        kwargs["decoder_atrous_rates"] = [
            r * 16 // hp.get("output_stride", 16) for r in kwargs["decoder_atrous_rates"]
        ]
    net = getattr(smp, smp_name)(
        encoder_name=f"tu-{encoder}",
        encoder_weights=None,
        in_channels=in_channels,
        classes=num_classes,
        **kwargs,
    )
    return net, f"smp.{smp_name}(tu-{encoder})"


def _is_timm(name: str) -> bool:
    import timm

    return timm.is_model(name)


def build_peers(
    runner: Runner,
    cls: type,
    model_kwargs: dict,
    num_classes: int,
    in_channels: int,
    wanted: set[str],
    compile: bool,
    raw_label: str = "",
) -> tuple[nn.Module, list[Peer], list[str]]:
    """The seglight model and its peers (raw loop, smp, torchvision), and notes on skipped ones.
    Every network starts from the same seed. `raw_label` follows the raw loop's name (its
    variant, when there are several: raw_variants)."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls(num_classes=num_classes, in_channels=in_channels, **model_kwargs)

    model = build()
    hp, name = model.hparams, cls.__name__
    notes: list[str] = []
    peers: list[Peer] = []

    def loss(out: Any, mask: torch.Tensor) -> torch.Tensor:  # seglight's, on the main output
        return model.criterion(main_output(out), mask)

    if "raw" in wanted:
        twin = build().to(runner.device)
        twin.configure_model()  # the memory format and compilation it gets under the Trainer
        peers.append(
            runner.plain_peer(
                f"raw loop ({name}{raw_label})",
                twin.net,
                twin.compute_loss,
                twin.parameter_groups(),
                hp,
            )
        )
    if "smp" in wanted:
        try:
            torch.manual_seed(0)
            net, label = smp_network(name, hp, num_classes, in_channels)
        except LookupError as e:
            notes.append(f"smp peer skipped: {e}")
        else:
            when, note = SMP_NOTES.get(name, (lambda hp: False, ""))
            if when(hp):
                notes.append(f"{label}: {note}")
            groups = decay_groups(net, hp.weight_decay)
            peers.append(runner.plain_peer(label, net, loss, groups, hp, compile))
    if "torchvision" in wanted:
        from torchvision.models import segmentation

        for tv_name in TORCHVISION_PEERS.get(name, ["deeplabv3_resnet50", "fcn_resnet50"]):
            torch.manual_seed(0)
            # weights=None, weights_backbone=None: nothing is downloaded
            net = getattr(segmentation, tv_name)(
                weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
            )
            groups = decay_groups(net, hp.weight_decay)
            peers.append(
                runner.plain_peer(f"torchvision {tv_name}", net, loss, groups, hp, compile)
            )
    return model, peers, notes


def cpu_precision_notes(device: torch.device, precisions: list[str]) -> list[str]:
    """A note where bf16 runs on a CPU without native bf16 (seglight.hardware.native_bf16)."""
    from seglight.hardware import native_bf16

    if device.type != "cpu" or "bf16-mixed" not in precisions:
        return []
    native = native_bf16()
    if native is not None:
        return [f"bf16-mixed: this CPU has {native} (native bf16)"]
    return [
        "bf16-mixed: this CPU has no native bf16 (no AVX512_BF16, AMX or Arm BF16): oneDNN "
        "emulates it, expect it slower than 32"
    ]


def variant_label(precision: str, compiled: bool) -> str:
    """How a variant (precision, torch.compile) is named after a peer's name."""
    return f", {precision}{', compiled' if compiled else ''}"


def raw_variants(
    variants: list[tuple[Runner, bool]],
    cls: type,
    model_kwargs: dict,
    num_classes: int,
    in_channels: int,
) -> list[Peer]:
    """The model's raw loop at each (runner's precision, torch.compile) variant: `bench
    --precision 32,bf16-mixed --compile false,true` times them all side by side."""
    peers = []
    for runner, compiled in variants:
        torch.manual_seed(0)
        twin = cls(num_classes=num_classes, in_channels=in_channels,
                   **{**model_kwargs, "compile": compiled}).to(runner.device)  # fmt: skip
        twin.configure_model()
        label = variant_label(runner.precision, compiled)
        peers.append(
            runner.plain_peer(
                f"raw loop ({cls.__name__}{label})",
                twin.net,
                twin.compute_loss,
                twin.parameter_groups(),
                twin.hparams,
            )
        )
    return peers


def random_batches(
    n: int, batch_size: int, in_channels: int, size: list[int], num_classes: int, runner: Runner
) -> list[dict]:
    """`n` batches of normal images and random masks (5% ignored), on the device."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        image = torch.randn(batch_size, in_channels, *size, generator=g).to(runner.device)
        mask = torch.randint(0, num_classes, (batch_size, *size), generator=g)
        mask[torch.rand(mask.shape, generator=g) < 0.05] = 255
        if runner.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        batches.append({"image": image, "mask": mask.to(runner.device), "name": [""] * batch_size})
    return batches
