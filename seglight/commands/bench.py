"""`python -m seglight bench`: training and inference speed and peak memory of a seglight
architecture, side by side with the same network in a hand-written PyTorch loop and with its
segmentation_models_pytorch / torchvision equivalent, in one process, interleaved; and the
throughput of a dataset's DataLoader next to its GPU-resident path.

    python -m seglight bench --model UNet --model.encoder resnet34 --size 256 256 --batch-size 2
    python -m seglight bench --config experiments/unet.yaml --data.root /data/camvid
    python -m seglight bench --loader 0,1,2 --config experiments/unet.yaml --data.root /data/camvid

What is compared, so that the comparison is fair:
- every peer trains on the same batches, already on the device (no loader in the timing), with
  seglight's loss, the same optimiser (AdamW or SGD as the model's options say, weight decay on
  weights only, fused wherever torch has the kernel: CUDA and the CPU), per-step LR schedule,
  precision (autocast, plus a GradScaler for 16-mixed), memory format and torch.compile setting;
- "seglight": `Trainer.fit` of the SegmentationModel. A callback times whole loop iterations (from
  the start of a round's first batch to the start of the batch after its last), so Lightning's
  per-step work (hooks, logging, closure, batch transfer) and the base class's count. No
  progress bar, logger or checkpointing (a raw loop has none either);
- "raw loop": a second instance of the same model (same seed), trained by a plain loop:
  zero_grad, forward, `model.compute_loss`, backward, optimizer.step, scheduler.step;
- smp / torchvision: the same plain loop on their network, seglight's loss on the main output.
  smp builds the encoder from timm ("tu-<name>"), so encoders are identical, and gets the same
  head width and ASPP rates; parameter and FLOP counts are printed side by side. Only matching
  networks make a speed ratio: DeepLabV3+ against smp's needs `--model.separable true` (smp's
  decoder is depthwise-separable after the concatenation and, with it, in ASPP; seglight's
  default is the paper's full 3x3 convs, 40.35M parameters / 34.6 GFLOPs at 256x256 against
  smp's 39.21M / 24.7); a pairing that is not the same network is flagged in the notes;
- rounds are interleaved: `--steps` steps of each peer in turn, `--rounds` times, after
  `--warmup` steps of each. A peer's figure is the median of its rounds (min-max shown); a ratio
  is the median of the per-round ratios (seglight's round k over the peer's round k, which ran
  beside it, so a slow spell of the machine hits both), with a distribution-free 95% confidence
  interval of that median (order statistics): if the interval excludes 1.00 +- 0.02, the
  difference is resolved; if not, add rounds;
- inference: eval mode, inference_mode, the same autocast; forward and argmax of a batch
  (seglight's through predict_step), in interleaved rounds. "ms/batch" is the latency at
  `--batch-size` (use --batch-size 1 for single-image latency);
- peak memory is measured in separate passes after the timed rounds (one round of each peer with
  the meter on), never inside them: the CPU meter's allocator settings slow every peer. It is the
  peer's persistent state (parameters, buffers, gradients, optimiser state) plus the most the
  pass allocated above what was allocated at its start. On CUDA that is
  torch.cuda.max_memory_allocated. On the CPU it is the resident set's high-water mark (VmHWM,
  reset through /proc/self/clear_refs), with glibc set to return freed blocks to the system (a
  fixed mmap threshold and malloc_trim), so memory one peer freed does not hide the next one's;
  Linux only, n/a elsewhere. On the CPU only the training figure is compared: inference
  allocates little beyond the weights, and what the resident set shows there is mostly what the
  allocator kept (identical networks measured 151 vs 244 MB), so no inference memory ratio is
  given on the CPU.
- `--losses ce,dice,...`: forward + backward time of each loss on random logits at
  `--loss-sizes` (e.g. 256,512,1024), batch `--batch-size`, interleaved rounds.
- `--loader 0,1,2` (a dataset, no model): the training loader's per-sample costs (decode,
  transform; median and min-max) and its images/s with each worker count (bench_loader).

Peers are optional: smp comes with `pip install segmentation-models-pytorch` (the `bench` extra);
a missing one is reported and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from seglight.errors import ConfigError
from seglight.threads import configure_threads

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


# ------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryMeter:
    """Peak bytes allocated during a measured section above what was allocated at its start.

    CUDA: max_memory_allocated. CPU (Linux): the resident set's high-water mark (see the module
    docstring); `available` is False elsewhere.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.available = device.type == "cuda" or self._prepare_cpu()
        self._start = 0

    def _prepare_cpu(self) -> bool:
        status = Path("/proc/self/status")
        if not status.exists():
            return False
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            # a fixed mmap threshold (M_MMAP_THRESHOLD = -3): tensor-sized blocks are mapped and
            # unmapped on free, instead of glibc raising the threshold and keeping them in its heap
            self._libc.mallopt(-3, 256 * 1024)
        except (OSError, AttributeError):
            self._libc = None
        return True

    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def start(self) -> None:
        if not self.available:
            return
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if self._libc is not None:
            self._libc.mallopt(-3, 256 * 1024)  # see _prepare_cpu
            self._libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        self._start = self._status_kb("VmRSS") * 1024

    def stop(self) -> int | None:
        """Bytes above the start, at the peak; None when not available."""
        if not self.available:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._start
        peak = max(0, self._status_kb("VmHWM") * 1024 - self._start)
        from seglight.threads import keep_freed_memory

        keep_freed_memory()  # back to the allocator settings the timed rounds run with
        return peak


def _tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def persistent_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Parameters, buffers, existing gradients and optimiser state of a peer."""
    tensors: list[torch.Tensor] = [*module.parameters(), *module.buffers()]
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values()]
    return _tensor_bytes(iter(tensors))


@dataclass
class Measured:
    """Seconds and peak bytes per round of one peer, for training or inference."""

    seconds: list[float] = field(default_factory=list)
    peak: list[int] = field(default_factory=list)

    def add(self, seconds: float, peak: int | None) -> None:
        self.seconds.append(seconds)
        if peak is not None:
            self.peak.append(peak)


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
    train: Measured = field(default_factory=Measured)
    infer: Measured = field(default_factory=Measured)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


# ------------------------------------------------------------------------------- peers
def _main_output(out: Any) -> torch.Tensor:
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
            # zero_grad first, as Lightning does: gradients live between steps in both
            optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                value = loss(run(batch["image"]), batch["mask"])
            if scaler is None:
                value.backward()
                optimizer.step()
            else:
                scaler.scale(value).backward()
                scaler.step(optimizer)
                scaler.update()
            scheduler.step()

        def predict(image: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return _main_output(run(image)).argmax(1)

        return Peer(name, net, predict, step, optimizer)


def smp_network(name: str, hp: Any, num_classes: int, in_channels: int) -> tuple[nn.Module, str]:
    """segmentation_models_pytorch's equivalent of architecture `name` with the hyperparameters
    `hp`, on the same timm encoder; raises LookupError (why) when there is none."""
    spec = SMP_PEERS.get(name)
    encoder = hp.get("encoder")
    if spec is None:
        raise LookupError(f"no smp equivalent of {name} in seglight.commands.bench.SMP_PEERS")
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
) -> tuple[nn.Module, list[Peer], list[str]]:
    """The seglight model and its peers (raw loop, smp, torchvision), and notes on skipped ones.
    Every network starts from the same seed."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls(num_classes=num_classes, in_channels=in_channels, **model_kwargs)

    model = build()
    hp, name = model.hparams, cls.__name__
    notes: list[str] = []
    peers: list[Peer] = []

    def loss(out: Any, mask: torch.Tensor) -> torch.Tensor:  # seglight's, on the main output
        return model.criterion(_main_output(out), mask)

    if "raw" in wanted:
        twin = build().to(runner.device)
        twin.configure_model()  # the memory format and compilation it gets under the Trainer
        peers.append(
            runner.plain_peer(
                f"raw loop ({name})", twin.net, twin.compute_loss, twin.parameter_groups(), hp
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


# ------------------------------------------------------------------------------- the runs
class _Batches:
    """`length` batches cycling over a few fixed ones (a loader for Trainer.fit)."""

    def __init__(self, batches: list[dict], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict]:
        return (self.batches[i % len(self.batches)] for i in range(self.length))


def _plus(peak: int | None, state: int) -> int | None:
    return None if peak is None else peak + state


#: the clock of the timed rounds: wall time, or with `--clock cpu` the process's CPU time (with
#: one thread on a CPU shared with other work, the work a step does, whatever else runs)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def _timed(work: Callable[[int], Any], steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls of work(i)."""
    _sync(device)
    t0 = _clock()
    for i in range(steps):
        work(i)
    _sync(device)
    return _clock() - t0


def _peak(work: Callable[[int], Any], steps: int, meter: MemoryMeter) -> int | None:
    """Peak bytes above the start during `steps` calls of work(i) (a memory pass, not timed)."""
    meter.start()
    for i in range(steps):
        work(i)
    return meter.stop()


def bench_training(
    model: Any,
    peers: list[Peer],
    batches: list[dict],
    runner: Runner,
    rounds: int,
    steps: int,
    warmup: int,
    cudnn_benchmark: bool = True,
    memory: bool = True,
) -> Measured:
    """Interleaved training rounds of seglight (inside Trainer.fit) and its peers: at each round
    boundary a callback closes seglight's round, runs one round of every peer, and opens the next.
    After the timed rounds, one memory pass of each (`memory`). Returns seglight's rounds; the
    peers' are recorded in them."""
    import lightning as L

    device = runner.device
    meter = MemoryMeter(device) if memory else None
    own = Measured()
    # round k starts at step warmup + k * steps; round `rounds` is the memory pass
    passes = rounds + (1 if meter is not None else 0)
    boundaries = {warmup + k * steps: k for k in range(passes + 1)}

    def batch(i: int) -> dict:
        return batches[i % len(batches)]

    def peers_round(k: int) -> None:
        for peer in peers:
            assert peer.step is not None
            work = lambda i, p=peer: p.step(batch(i))  # noqa: E731
            if k == 0:
                for i in range(warmup):
                    work(i)
            if k < rounds:
                peer.train.seconds.append(_timed(work, steps, device))
            else:
                assert meter is not None
                peak = _peak(work, steps, meter)
                if peak is not None:
                    peer.train.peak.append(peak + persistent_bytes(peer.module, peer.optimizer))

    class Interleave(L.Callback):
        calls, t0 = 0, 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            k = boundaries.get(self.calls)
            self.calls += 1
            if k is None:
                return
            _sync(device)
            if 0 < k <= rounds:  # close seglight's timed round k - 1
                own.seconds.append(_clock() - self.t0)
            elif k > rounds and meter is not None:  # close its memory pass
                state = persistent_bytes(pl_module, trainer.optimizers[0])
                peak = _plus(meter.stop(), state)
                if peak is not None:
                    own.peak.append(peak)
            if k < passes:
                peers_round(k)
                if k == rounds and meter is not None:
                    meter.start()
                _sync(device)
                self.t0 = _clock()

    total = warmup + passes * steps + 1  # the last step only closes the last round
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=runner.precision,
        max_steps=total,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        benchmark=cudnn_benchmark if device.type == "cuda" else None,
        default_root_dir=tempfile.mkdtemp(prefix="seglight-bench-"),
        callbacks=[Interleave()],
    )
    trainer.fit(model, train_dataloaders=_Batches(batches, total))
    return own


def bench_inference(
    peers: list[Peer],
    images: torch.Tensor,
    device: torch.device,
    rounds: int,
    steps: int,
    warmup: int,
    memory: bool = True,
) -> None:
    """Interleaved inference rounds (eval mode, inference_mode) of every peer, then one memory
    pass of each (`memory`)."""
    for peer in peers:
        peer.module.eval()
    with torch.inference_mode():
        for peer in peers:
            for _ in range(warmup):
                peer.predict(images)
        for _ in range(rounds):
            for peer in peers:
                peer.infer.seconds.append(
                    _timed(lambda i, p=peer: p.predict(images), steps, device)
                )
        meter = MemoryMeter(device) if memory else None
        for peer in peers if meter is not None else []:
            peak = _peak(lambda i, p=peer: p.predict(images), steps, meter)
            if peak is not None:
                peer.infer.peak.append(peak + persistent_bytes(peer.module, None))


def bench_losses(
    names: list[str],
    sizes: list[int],
    batch_size: int,
    num_classes: int,
    device: torch.device,
    rounds: int,
    steps: int,
    warmup: int,
) -> list[dict]:
    """Forward + backward milliseconds of each loss (seglight.losses, by `loss:` name) on random
    float32 logits [batch_size, num_classes, S, S] with 5% ignored pixels, for S in `sizes`;
    interleaved rounds. One row per (loss, size): median ms, min-max, and ms per megapixel (a
    loss that scales linearly keeps it constant across sizes)."""
    from seglight.losses import build_loss

    losses = {name: build_loss(name).to(device) for name in names}
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for size in sizes:
        logits = torch.randn(batch_size, num_classes, size, size, generator=g)
        target = torch.randint(0, num_classes, (batch_size, size, size), generator=g)
        target[torch.rand(target.shape, generator=g) < 0.05] = 255
        inputs[size] = (logits.to(device).requires_grad_(), target.to(device))
    seconds: dict[tuple[str, int], list[float]] = {(n, s): [] for n in names for s in sizes}

    def work(name: str, size: int) -> Callable[[int], None]:
        logits, target = inputs[size]

        def step(i: int) -> None:
            logits.grad = None
            losses[name](logits, target).backward()

        return step

    for key in seconds:
        for i in range(warmup):
            work(*key)(i)
    for _ in range(rounds):
        for key in seconds:
            seconds[key].append(_timed(work(*key), steps, device) / steps)
    rows = []
    for (name, size), secs in seconds.items():
        ms = 1000 * statistics.median(secs)
        megapixels = batch_size * size * size / 1e6
        rows.append(
            {"loss": name, "size": size, "ms": ms, "min": 1000 * min(secs),
             "max": 1000 * max(secs), "ms_per_mpixel": ms / megapixels}
        )  # fmt: skip
    return rows


def bench_data(
    datamodule: Any, device: torch.device, rounds: int, max_batches: int | None = None
) -> list[dict]:
    """Images/s of the training split through the DataLoader (batches moved to `device`) and
    through the GPU-resident path (decoded once: `setup_s`), a whole epoch (or `max_batches`)
    per round, interleaved. Whole epochs, because loader workers stopped mid-epoch would go on
    prefetching during the other path's round."""
    from seglight.data.gpu import ResidentLoader, load_split

    datamodule.setup("fit")
    datamodule.gpu_resident = False  # the DataLoader row, whatever the config says
    loader = datamodule.train_dataloader()
    t0 = time.perf_counter()
    fill = tuple(round(255 * m) for m in datamodule.mean)
    split = load_split(datamodule.datasets["train"], device, fill, datamodule.ignore_index)
    resident = ResidentLoader(split, datamodule.batch_size, datamodule.train_transform())
    decode_s = time.perf_counter() - t0
    workers = getattr(loader, "num_workers", 0)
    rows = [
        {"path": f"DataLoader ({workers} workers)", "seconds": [], "images": [], "setup_s": None},
        {"path": f"resident ({device.type})", "seconds": [], "images": [], "setup_s": decode_s},
    ]

    def epoch(source: Any) -> int:
        n = 0
        for i, batch in enumerate(source):
            if max_batches is not None and i >= max_batches:
                break
            batch["image"].to(device, non_blocking=True)
            batch["mask"].to(device, non_blocking=True)
            n += len(batch["mask"])
        return n

    epoch(loader)  # warm-up: starts the workers
    for _ in range(rounds):
        for row, source in zip(rows, (loader, resident), strict=True):
            _sync(device)
            t0 = time.perf_counter()
            n = epoch(source)
            _sync(device)
            row["seconds"].append(time.perf_counter() - t0)
            row["images"].append(n)
    for row in rows:
        rates = [n / s for n, s in zip(row["images"], row["seconds"], strict=True)]
        row.update(images_per_s=statistics.median(rates), min=min(rates), max=max(rates))
    return rows


def bench_loader(
    datamodule: Any,
    workers: list[int],
    transforms: dict[str, Callable] | None = None,
    samples: int = 200,
    rounds: int = 3,
    batches: int | None = 20,
) -> dict[str, list[dict]]:
    """The training split's per-sample costs and DataLoader images/s (one torch thread per
    worker, as PyTorch sets it), interleaved, for each of `transforms` (default: the
    datamodule's training transform; pass two to compare them).

    Per sample (the first `samples` of the split, cycled), on `--clock`: the Dataset's `load`
    (decode image and mask, check the values), the image decode alone (`read_image`), then each
    transform on that pair with the same seed, so every transform draws the same random scale and
    crop and their costs pair up sample by sample. Split by the drawn scale s (< 1, >= 1) when
    the transform has a scale_range. Then `rounds` rounds of every (workers, transform) in turn:
    images/s of `batches` batches through the training DataLoader (seglight.data.stats.
    loader_throughput, wall clock, after the start-up and prefetched batches).

    With several transforms, each one's row also gives the median of its per-sample time ratios
    to the first transform's, with a 95% confidence interval (`median_ci`); and each one's images/s, the median of
    its per-round ratios (the rounds ran back to back).

    Returns {"costs": [{"step", "subset", "ms", "min", "max", "n", "ratio", "ratio_ci"}],
    "rates": [{"transform", "workers", "images_per_s", "min", "max", "rounds", "ratio",
    "ratio_ci"}]}.
    """
    from seglight.data.base import read_image
    from seglight.data.stats import loader_throughput

    if "train" not in datamodule.datasets:
        datamodule.datasets["train"] = datamodule.build_dataset("train", train=True)
    dataset = datamodule.datasets["train"]
    transforms = transforms or {type(dataset.transform).__name__: dataset.transform}
    times: dict[tuple[str, str], list[float]] = {}

    def timed(subsets: tuple[tuple[str, str], ...], work: Callable, *args: Any) -> Any:
        t0 = _clock()
        out = work(*args)
        for key in subsets:
            times.setdefault(key, []).append(1000 * (_clock() - t0))
        return out

    with torch.random.fork_rng(devices=[]):  # the seeds below leave the caller's generator be
        for k in range(samples):
            index = k % len(dataset)
            load = ("load: decode image + mask, check", "all")
            image, mask = timed((load,), dataset.load, index)
            timed((("  of which image decode", "all"),), read_image, dataset.pairs[index][0])
            for name, transform in transforms.items():
                subsets = [(name, "all")]
                if getattr(transform, "scale_range", None) and transform.crop_size:
                    lo, hi = transform.scale_range  # TrainTransform's first draw: the scale
                    torch.manual_seed(k)
                    scale = lo + (hi - lo) * torch.rand(()).item()
                    subsets.append((name, "s < 1" if scale < 1 else "s >= 1"))
                torch.manual_seed(k)
                timed(tuple(subsets), transform, image, mask)
    costs = []
    first = next(iter(transforms))
    for (step, subset), values in times.items():
        row = {"step": step, "subset": subset, "ms": statistics.median(values), "min": min(values),
               "max": max(values), "n": len(values), "ratio": None, "ratio_ci": None}  # fmt: skip
        if step in transforms and step != first:  # paired: the same samples and draws
            ratios = [b / a for a, b in zip(times[(first, subset)], values, strict=True)]
            row.update(ratio=statistics.median(ratios), ratio_ci=median_ci(ratios))
        costs.append(row)
    order = ["all", "s < 1", "s >= 1"]  # each transform's rows under one another, per subset
    costs.sort(key=lambda row: (row["step"] in transforms, order.index(row["subset"])))

    original = dataset.transform
    rates: dict[tuple[str, int], list[float]] = {}
    try:
        for _ in range(rounds):
            for n in workers:
                for name, transform in transforms.items():
                    dataset.transform = transform
                    result = loader_throughput(datamodule, n, batches)
                    rates.setdefault((name, n), []).append(result["images_per_s"])
    finally:
        dataset.transform = original
    rows = []
    for (name, n), values in rates.items():
        row = {"transform": name, "workers": n, "images_per_s": statistics.median(values),
               "min": min(values), "max": max(values), "rounds": len(values), "ratio": None,
               "ratio_ci": None}  # fmt: skip
        if name != first:  # per round: the two ran back to back
            ratios = [b / a for a, b in zip(rates[(first, n)], values, strict=True)]
            row.update(ratio=statistics.median(ratios), ratio_ci=median_ci(ratios))
        rows.append(row)
    return {"costs": costs, "rates": rows}


def print_loader_report(results: dict, title: str, console: Any = None) -> None:
    """The tables of bench_loader's results."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=140)
    table = Table(title=f"per sample: {title}")
    paired = any(row["ratio"] is not None for row in results["costs"])

    def ratio(row: dict) -> list[str]:  # the paired-ratio columns, when there are two transforms
        ci = row["ratio_ci"]
        cells = [_fmt(row["ratio"], ".3f"), "-" if ci is None else f"{ci[0]:.3f}-{ci[1]:.3f}"]
        return cells if paired else []

    extra = ["ratio to the first", "95% CI"] if paired else []
    for col in ("step", "samples", "ms (median)", "min-max", "n", *extra):
        table.add_column(col, justify="left" if col in ("step", "samples") else "right")
    for row in results["costs"]:
        table.add_row(
            row["step"], row["subset"], f"{row['ms']:.2f}", f"{row['min']:.2f}-{row['max']:.2f}",
            str(row["n"]), *ratio(row),
        )  # fmt: skip
    console.print(table)
    table = Table(title="training DataLoader, images/s (wall clock; median of rounds)")
    for col in ("transform", "workers", "images/s", "min-max", "rounds", *extra):
        table.add_column(col, justify="left" if col == "transform" else "right")
    for row in results["rates"]:
        table.add_row(
            row["transform"], str(row["workers"]), f"{row['images_per_s']:.1f}",
            f"{row['min']:.1f}-{row['max']:.1f}", str(row["rounds"]), *ratio(row),
        )  # fmt: skip
    console.print(table)


# ------------------------------------------------------------------------------- report
def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median of `values`: the order statistics
    x_(k) and x_(n+1-k) with the largest k whose binomial tail P(Bin(n, 1/2) < k) stays below
    (1 - level) / 2 on each side. With fewer than 6 values no such k exists: min-max."""
    xs, n = sorted(values), len(values)
    tail, k = 0.0, 0
    while True:  # the cumulative binomial probability of k successes or fewer
        tail += math.comb(n, k) / 2**n
        if tail > (1 - level) / 2:
            break
        k += 1
    return (xs[k - 1], xs[n - k]) if k >= 1 else (xs[0], xs[-1])


def summarise(
    own: Peer, peers: list[Peer], batch_size: int, steps: int, device: torch.device | None = None
) -> dict[str, list]:
    """Per kind ("train", "infer"), one row per peer: median images/s and the rounds' min-max,
    ms per batch, peak MB, and the ratios seglight / peer: speed as the median of the per-round
    ratios with its 95% confidence interval; memory (inference memory on CUDA only: see the
    module docstring)."""
    out: dict[str, list] = {}
    for kind in ("train", "infer"):
        rows = []
        for peer in [own, *peers]:
            measured: Measured = getattr(peer, kind)
            if not measured.seconds:
                continue
            rates = [batch_size * steps / s for s in measured.seconds]
            rows.append(
                {
                    "peer": peer.name,
                    "params": peer.params,
                    "gflops": peer.gflops,
                    "images_per_s": statistics.median(rates),
                    "min": min(rates),
                    "max": max(rates),
                    "rates": rates,
                    "ms_per_batch": 1000 * statistics.median(measured.seconds) / steps,
                    "peak_mb": max(measured.peak) / 2**20 if measured.peak else None,
                }
            )
        if rows and own.name == rows[0]["peer"]:
            ref = rows[0]
            memory_comparable = kind == "train" or (device is not None and device.type == "cuda")
            for row in rows:
                ratios = [a / b for a, b in zip(ref["rates"], row["rates"], strict=True)]
                row["speed_ratio"] = statistics.median(ratios)
                row["speed_ratio_ci"] = median_ci(ratios)
                row["memory_ratio"] = (
                    ref["peak_mb"] / row["peak_mb"]
                    if memory_comparable and ref["peak_mb"] and row["peak_mb"]
                    else None
                )
        out[kind] = rows
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_report(results: dict, console: Any = None) -> None:
    """Rich tables of a bench run's results (as `run` returns them)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(Console().width, 140))
    s = results["setup"]
    console.print(
        f"[bold]seglight bench[/] on {s['device_name']}, torch {s['torch']} ({s['threads']} threads)"
    )
    if results.get("train") or results.get("infer"):
        console.print(
            f"{s['model']} {s['model_options']}, input {s['batch_size']}x{s['in_channels']}x"
            f"{s['size'][0]}x{s['size'][1]}, {s['num_classes']} classes, precision {s['precision']}; "
            f"{s['rounds']} interleaved rounds x {s['steps']} steps after {s['warmup']} warm-up; "
            f"{s.get('clock', 'wall')} clock"
        )
    titles = {
        "train": "training: seglight in Trainer.fit, the others in a plain loop",
        "infer": "inference: forward + argmax, eval mode (seglight: predict_step)",
    }
    for kind, title in titles.items():
        if not results.get(kind):
            continue
        table = Table(
            title=title,
            caption="ratio = seglight ÷ peer, median of the per-round ratios [95% CI] "
            "(speed > 1: seglight faster)",
        )
        columns = ["peer", "params", "GFLOPs", "ms/batch", "images/s", "min-max"]
        columns += ["speed ratio", "95% CI", "peak MB", "mem ratio"]
        for col in columns:
            table.add_column(col, justify="left" if col == "peer" else "right", no_wrap=True)
        for row in results[kind]:
            table.add_row(
                row["peer"],
                f"{row['params'] / 1e6:.2f}M",
                _fmt(row["gflops"], ".1f"),
                f"{row['ms_per_batch']:.1f}",
                f"{row['images_per_s']:.2f}",
                f"{row['min']:.2f}-{row['max']:.2f}",
                _fmt(row.get("speed_ratio"), ".3f"),
                "-"
                if row.get("speed_ratio_ci") is None or row is results[kind][0]
                else "{:.3f}-{:.3f}".format(*row["speed_ratio_ci"]),
                _fmt(row["peak_mb"], ".0f"),
                _fmt(row.get("memory_ratio"), ".3f"),
            )
        console.print(table)
    if results.get("data"):
        table = Table(title=f"data: {results['data_name']} training split (batches on the device)")
        for col in ("path", "images/s", "rounds min-max", "setup s"):
            table.add_column(col, justify="left" if col == "path" else "right")
        for row in results["data"]:
            table.add_row(
                row["path"],
                f"{row['images_per_s']:.1f}",
                f"{row['min']:.1f}-{row['max']:.1f}",
                _fmt(row["setup_s"], ".1f"),
            )
        console.print(table)
    for note in results.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


# ------------------------------------------------------------------------------- configuration
def _resolve(spec: Any, registry: dict[str, type], group: str) -> tuple[type, dict]:
    """(class, init_args) from a short name, a class_path or {class_path, init_args}."""
    if isinstance(spec, dict):
        name, kwargs = spec.get("class_path"), dict(spec.get("init_args") or {})
    else:
        name, kwargs = spec, {}
    if not isinstance(name, str):
        raise ConfigError(f"--{group}: expected a class name, got {spec!r}")
    cls = registry.get(name) or registry.get(name.rsplit(".", 1)[-1])
    if cls is None:
        raise ConfigError(f"--{group}: unknown {name!r} (known: {', '.join(sorted(registry))})")
    return cls, kwargs


def _set_dotted(target: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, dict]]:
    """The bench's options, and the --model.X / --data.X overrides as {group: {X: value}}."""
    parser = argparse.ArgumentParser(
        prog="seglight bench",
        description="Training and inference speed and peak memory of a seglight architecture "
        "next to the same network in a raw PyTorch loop, smp and torchvision, interleaved in one "
        "process; and a dataset's loader throughput. Options of the model: --model.OPTION VALUE; "
        "of the data: --data.OPTION VALUE.",
    )
    add = parser.add_argument
    add("--config", help="a YAML file with model: and data: sections (e.g. experiments/unet.yaml)")
    add("--model", help="architecture (see python -m seglight models)")
    add("--data", help="dataset whose training loader to measure (e.g. CamVid)")
    add("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"), help="input size")
    add("--batch-size", type=int, help="batch size of the model runs (default: --data.batch_size, "
        "as fit spells it, else 2)")  # fmt: skip
    add("--num-classes", type=int, help="default: the data's, else 11")
    add("--precision", choices=sorted(PRECISIONS), help="default: bf16-mixed on a GPU, else 32")
    add("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda, cuda:N")
    add("--rounds", type=int, default=10, help="timed rounds per peer (10: a 95%% CI of the "
        "median ratio from the 2nd to the 9th round)")  # fmt: skip
    add("--steps", type=int, default=3, help="steps per round")
    add("--warmup", type=int, default=2, help="untimed steps of each peer first")
    add("--peers", default="auto", help="comma-separated: raw, smp, torchvision, none "
        "(auto: raw, smp, and torchvision for the DeepLab and FCN families)")  # fmt: skip
    add("--skip", default="", help="comma-separated parts to skip: train, infer, data")
    add("--data-rounds", type=int, default=3, help="epochs timed per data path")
    add("--data-batches", type=int, help="batches per data round (default: the whole epoch; "
        "with --loader: 20)")  # fmt: skip
    add("--loader", metavar="WORKERS", help="without a model: the training loader's per-sample "
        "costs (decode, transform) and its images/s with these worker counts, e.g. 0,1,2")  # fmt: skip
    add("--loader-samples", type=int, default=200, help="samples timed one by one for --loader")
    add("--compile", action="store_true", help="torch.compile every network")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="channels_last memory format for every network (on CUDA)")  # fmt: skip
    add("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
        help="torch.backends.cudnn.benchmark (autotuned convolutions for the fixed size)")  # fmt: skip
    add("--threads", type=int, help="torch CPU threads (default: the usable cores, "
        "seglight.threads; use 1 on a shared machine)")  # fmt: skip
    add("--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or the process's CPU "
        "time (with --threads 1 on a shared CPU: the work each step does, not the waiting)")  # fmt: skip
    add("--memory", action=argparse.BooleanOptionalAction, default=True,
        help="a memory pass of each peer after the timed rounds")  # fmt: skip
    add("--losses", help="comma-separated loss names (seglight.losses: ce, dice, focal, lovasz, "
        "ohem, ...): time forward+backward of each")  # fmt: skip
    add("--loss-sizes", default="256,512,1024", help="square sizes for --losses")
    add("--json", help="also write the results to this JSON file")
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, dict] = {"model": {}, "data": {}}
    i = 0
    while i < len(rest):
        arg = rest[i]
        group = arg[2:].split(".", 1)[0] if arg.startswith("--") and "." in arg else None
        if group not in overrides:
            raise ConfigError(
                f"bench: unknown argument {arg!r} (see python -m seglight bench --help)"
            )
        key = arg[len(group) + 3 :]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(rest):
            i += 1
            value = rest[i]
        else:
            raise ConfigError(f"bench: {arg} needs a value")
        _set_dotted(overrides[group], key, yaml.safe_load(value))
        i += 1
    if args.batch_size is None:  # `--data.batch_size 8` as for fit: the model runs' batch too
        args.batch_size = int(overrides["data"].get("batch_size") or 2)
    return args, overrides


def _random_batches(
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


def run(argv: list[str]) -> dict:
    """Run the bench for command-line arguments `argv`; prints the tables, returns the results.
    Lightning's info lines and warnings are quieted for the bench only: the process's logging
    and warning filters are as before afterwards (a notebook or test that benches goes on)."""
    from seglight.utils import silence_known_noise

    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    with warnings.catch_warnings():
        silence_known_noise()  # Lightning's litlogger tip on each Trainer, as in fit
        warnings.filterwarnings("ignore", module="lightning")
        lightning_log.setLevel(logging.WARNING)
        try:
            return _run(argv)
        finally:
            lightning_log.setLevel(level)


def _run(argv: list[str]) -> dict:
    from seglight.data.base import DATASETS
    from seglight.models.base import MODELS
    from seglight.profile import count_flops

    args, overrides = parse_args(argv)
    config: dict = {}
    if args.config:
        if not Path(args.config).is_file():
            raise ConfigError(f"--config {args.config}: no such file")
        config = yaml.safe_load(Path(args.config).read_text()) or {}
    if args.losses and not (args.model or config.get("model")):
        return run_losses(args, argv)
    if args.loader:
        return run_loader(args, argv, config, overrides["data"])
    if not (args.model or config.get("model")):
        raise ConfigError(
            "bench: give --model NAME (or a --config file with a model: section) or --losses"
        )
    model_cls, model_kwargs = _resolve(args.model or config["model"], MODELS, "model")
    model_kwargs.update(overrides["model"])
    shown_options = dict(model_kwargs)
    skip = {s for s in args.skip.split(",") if s}
    datamodule = None
    if (args.data or config.get("data")) and "data" not in skip:
        data_cls, data_kwargs = _resolve(args.data or config["data"], DATASETS, "data")
        datamodule = data_cls(**{**data_kwargs, **overrides["data"]})

    device = _device(args.device)
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32")
    if precision == "16-mixed" and device.type != "cuda":
        raise ConfigError("--precision 16-mixed needs a CUDA GPU; use bf16-mixed or 32 on the CPU")
    wanted = {"raw", "smp", "torchvision"} if args.peers == "auto" else set(args.peers.split(","))
    if wanted - {"raw", "smp", "torchvision", "none"}:
        raise ConfigError(
            f"--peers: unknown {sorted(wanted - {'raw', 'smp', 'torchvision', 'none'})}"
        )
    if args.peers == "auto" and model_cls.__name__ not in TORCHVISION_PEERS:
        wanted.discard("torchvision")
    if {"train", "infer"} <= skip:
        wanted = set()
    model_kwargs.update(channels_last=args.channels_last, compile=args.compile)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    num_classes = args.num_classes or (datamodule.num_classes if datamodule is not None else 11)
    in_channels = datamodule.in_channels if datamodule is not None else 3
    runner = Runner(
        device, precision, args.channels_last, args.warmup + args.rounds * args.steps + 1
    )
    configure_threads(0, requested=args.threads)
    global _clock
    _clock = CLOCKS[args.clock]

    model, peers, notes = build_peers(
        runner, model_cls, model_kwargs, num_classes, in_channels, wanted, args.compile
    )
    batches = _random_batches(2, args.batch_size, in_channels, args.size, num_classes, runner)
    own = Peer(f"seglight {model_cls.__name__}", model.net, model.forward)
    for peer in [own, *peers]:
        peer.gflops = count_flops(peer.module.to(device), (1, in_channels, *args.size)) / 1e9
    if "train" not in skip:
        own.train = bench_training(
            model,
            peers,
            batches,
            runner,
            args.rounds,
            args.steps,
            args.warmup,
            args.cudnn_benchmark,
            args.memory,
        )
    if "infer" not in skip:
        model.to(device)  # Trainer.fit hands the model back on the CPU
        own.predict = lambda image: model.predict_step({"image": image}, 0)["pred"]
        images = batches[0]["image"]
        bench_inference(
            [own, *peers], images, device, args.rounds, args.steps, args.warmup, args.memory
        )
    results: dict[str, Any] = summarise(own, peers, args.batch_size, args.steps, device)
    results["notes"] = notes
    results["setup"] = {
        "model": model_cls.__name__,
        "model_options": shown_options,
        "size": list(args.size),
        "batch_size": args.batch_size,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "precision": precision,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "clock": args.clock,
        "command": "python -m seglight bench " + " ".join(argv),
    }
    if datamodule is not None:
        results["data_name"] = type(datamodule).__name__
        results["data"] = bench_data(datamodule, device, args.data_rounds, args.data_batches)
    print_report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return results


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _ints(value: str, option: str, expected: str) -> list[int]:
    """A comma-separated list of integers, or a ConfigError naming the option."""
    try:
        return [int(v) for v in value.split(",") if v]
    except ValueError:
        raise ConfigError(f"{option}: expected {expected}, got {value!r}") from None


def run_losses(args: argparse.Namespace, argv: list[str]) -> dict:
    """`bench --losses ...` without a model: the loss table only."""
    from rich.console import Console
    from rich.table import Table

    from seglight.losses import LOSSES

    names = [n for n in args.losses.split(",") if n]
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        raise ConfigError(f"--losses: unknown {unknown} (known: {', '.join(LOSSES)})")
    sizes = _ints(args.loss_sizes, "--loss-sizes", "sizes like 256,512")
    device = _device(args.device)
    threads = configure_threads(0, requested=args.threads)
    global _clock
    _clock = CLOCKS[args.clock]
    num_classes = args.num_classes or 11
    rows = bench_losses(
        names, sizes, args.batch_size, num_classes, device, args.rounds, args.steps, args.warmup
    )
    table = Table(
        title=f"losses: forward + backward, float32 logits {args.batch_size}x{num_classes}xSxS, "
        f"{device.type}, {threads} thread(s), median of {args.rounds} rounds x {args.steps}"
    )
    for col in ("loss", "S", "ms", "min-max", "ms / Mpixel"):
        table.add_column(col, justify="left" if col == "loss" else "right")
    for row in rows:
        table.add_row(
            row["loss"], str(row["size"]), f"{row['ms']:.1f}",
            f"{row['min']:.1f}-{row['max']:.1f}", f"{row['ms_per_mpixel']:.1f}",
        )  # fmt: skip
    Console(width=140).print(table)
    results = {"losses": rows, "command": "python -m seglight bench " + " ".join(argv)}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def run_loader(args: argparse.Namespace, argv: list[str], config: dict, overrides: dict) -> dict:
    """`bench --loader 0,1,2 --data NAME ...` (or a --config's data: section): the loader only."""
    from seglight.data.base import DATASETS

    if not (args.data or config.get("data")):
        raise ConfigError(
            "bench --loader: give --data NAME (or a --config file with a data: section)"
        )
    workers = _ints(args.loader, "--loader", "worker counts like 0,1,2")
    data_cls, data_kwargs = _resolve(args.data or config["data"], DATASETS, "data")
    datamodule = data_cls(**{**data_kwargs, **overrides})
    threads = configure_threads(0, requested=args.threads)
    global _clock
    _clock = CLOCKS[args.clock]
    results = bench_loader(
        datamodule, workers, None, args.loader_samples, args.data_rounds, args.data_batches or 20
    )
    crop = "x".join(map(str, datamodule.crop_size)) if datamodule.crop_size else "full images"
    scale = getattr(datamodule, "scale_range", None)
    title = (
        f"{data_cls.__name__} train, crop {crop}, scale {scale}, batch {datamodule.batch_size}; "
        f"{args.clock} clock, {threads} torch thread(s)"
    )
    print_loader_report(results, title)
    results["setup"] = {"title": title, "command": "python -m seglight bench " + " ".join(argv)}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str]) -> None:
    """Entry point of `python -m seglight bench` (seglight.cli.COMMANDS)."""
    run(argv)
