"""Performance habits that tests can hold: no host synchronisation in the training step and the
metric updates (on the CPU by counting the calls that would sync on a GPU; on a GPU with
torch.cuda.set_sync_debug_mode("error")), and the fast-path options doing what they say."""

from __future__ import annotations

import collections
import contextlib
import traceback
from collections.abc import Iterator

import lightning as L
import pytest
import torch
from torch import nn

from seglight.models import UNet

# Tensor methods that copy to the host or branch on a value: each waits for the GPU
READBACKS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
# operators whose output size depends on the data: the GPU must finish before it is allocated
DYNAMIC_SHAPE = ("nonzero", "unique", "bincount", "masked_select", "argwhere")


class SyncCounter:
    """Counts, while `active`, the calls that sync a GPU (with where they came from)."""

    def __init__(self) -> None:
        self.active = False
        self.ignore: str | None = None  # calls from files whose path holds this are not counted
        self.calls: collections.Counter[str] = collections.Counter()

    def record(self, name: str) -> None:
        if not self.active:
            return
        stack = traceback.extract_stack()[:-2]
        if self.ignore and any(self.ignore in f.filename for f in stack):
            return
        frame = stack[-1]
        self.calls[f"{name} at {frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}"] += 1

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        self.active = True
        try:
            yield
        finally:
            self.active = False


@contextlib.contextmanager
def count_host_syncs() -> Iterator[SyncCounter]:
    """Patch torch so that the counter sees read-backs, boolean-mask indexing and dynamic-shape
    operators (method and function forms). (`.to(device)` is not counted: on a CPU-only machine
    a move to the model's device cannot be told from a move to the host.)"""
    counter = SyncCounter()
    patches: list[tuple[object, str, object]] = []

    def patch(owner: object, name: str, check=None) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if check is None or check(*args, **kwargs):
                counter.record(name)
            return original(*args, **kwargs)

        patches.append((owner, name, original))
        setattr(owner, name, wrapper)

    def bool_index(self, index, *args) -> bool:
        items = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

    for name in READBACKS:
        patch(torch.Tensor, name)
    patch(torch.Tensor, "__getitem__", bool_index)
    for name in DYNAMIC_SHAPE:
        patch(torch.Tensor, name)
        patch(torch, name)
    try:
        yield counter
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


def test_the_counter_sees_each_kind_of_sync():
    x = torch.arange(6.0)
    with count_host_syncs() as counter:
        x.sum().item()  # not counted: outside the scope
        with counter.scope():
            x.sum().item()
            bool(x.sum() > 0)
            x.tolist()
            x[x > 2]
            torch.bincount(x.long())
            x.nonzero()
            _ = x * 2, x.argmax(), torch.where(x > 2, x, 0.0), x[1:3]  # sync-free: not counted
    kinds = sorted(key.split(" ")[0] for key in counter.calls)
    assert kinds == ["__bool__", "__getitem__", "bincount", "item", "nonzero", "tolist"], kinds


class WithAux(nn.Module):
    """Adds a half-resolution auxiliary output in training, to cover the base's aux-loss path."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        out = self.net(x)
        return {"out": out, "aux": out[..., ::2, ::2]} if self.training else out


class _Batches:
    def __init__(self, n: int, num_classes: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(n):
            mask = torch.randint(0, num_classes, (2, 32, 32), generator=g)
            mask[:, :4] = 255
            self.batches.append({"image": torch.randn(2, 3, 32, 32, generator=g), "mask": mask})

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class CountSteps(L.Callback):
    """Counts host syncs inside training_step and validation_step (loss, logging, metrics)."""

    def __init__(self, counter: SyncCounter) -> None:
        self.counter = counter

    def on_fit_start(self, trainer, pl_module) -> None:
        for name in ("training_step", "validation_step"):
            original = getattr(pl_module, name)

            def counted(*args, _original=original, **kwargs):
                with self.counter.scope():
                    return _original(*args, **kwargs)

            setattr(pl_module, name, counted)


def fit_counting(model: UNet, tmp_path, accelerator: str = "cpu") -> collections.Counter:
    with count_host_syncs() as counter:
        trainer = L.Trainer(
            accelerator=accelerator,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=tmp_path,
            callbacks=[CountSteps(counter)],
        )
        trainer.fit(model, _Batches(3, model.num_classes), _Batches(2, model.num_classes))
    assert trainer.global_step == 3 and "val/mIoU" in trainer.callback_metrics
    return counter.calls


# the "unet" loss computes the paper's distance-based weight maps on the CPU: it syncs by design
@pytest.mark.parametrize("loss", ["ce", "focal", "dice", "lovasz", "ohem", {"ce": 1, "dice": 0.5}])
def test_training_and_validation_steps_never_sync(loss, tmp_path):
    model = UNet(num_classes=4, encoder="original", base_channels=4, loss=loss)
    model.net = WithAux(model.net)
    calls = fit_counting(model, tmp_path)
    assert not calls, f"host syncs in the step: {dict(calls)}"


def test_the_instrumented_fit_catches_a_syncing_loss(tmp_path):
    # the "unet" loss builds the paper's weight maps from the masks on the CPU: a sync by design
    model = UNet(num_classes=4, encoder="original", base_channels=4, loss="unet")
    calls = fit_counting(model, tmp_path)
    assert any(key.startswith("cpu ") for key in calls), dict(calls)


class CountLoop(L.Callback):
    """Counts host syncs in the whole training loop (Lightning's included), except the
    optimiser's: on the CPU its step counters are host tensors (fused CUDA optimisers have none)."""

    def __init__(self, counter: SyncCounter) -> None:
        self.counter = counter

    def on_train_start(self, trainer, pl_module) -> None:
        self.counter.active = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.counter.active = False


def loop_syncs(model: UNet, steps: int, tmp_path) -> int:
    with count_host_syncs() as counter:
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=steps,
            logger=False,
            log_every_n_steps=1000,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=tmp_path,
            callbacks=[CountLoop(counter)],
        )
        counter.ignore = "/torch/optim/"
        trainer.fit(model, _Batches(steps, model.num_classes))
    return sum(counter.calls.values())


def test_the_training_loop_syncs_less_than_once_per_step(tmp_path):
    model = UNet(num_classes=4, encoder="original", base_channels=4)
    assert loop_syncs(model, 8, tmp_path) < 4


def test_gradients_are_freed_between_steps(tmp_path):
    alive: list[int] = []

    class GradsAtBatchStart(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            alive.append(sum(p.grad is not None for p in pl_module.parameters()))

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[GradsAtBatchStart()],
    )
    trainer.fit(UNet(num_classes=4, encoder="original", base_channels=4), _Batches(3, 4))
    assert alive == [0, 0, 0]


@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["ce", "ohem", "lovasz"])
def test_no_sync_on_the_gpu(loss, tmp_path):
    model = UNet(num_classes=4, encoder="resnet18", loss=loss)
    model.net = WithAux(model.net)

    class SyncDebug(L.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            for name in ("training_step", "validation_step"):
                original = getattr(pl_module, name)

                def strict(*args, _original=original, **kwargs):
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        return _original(*args, **kwargs)
                    finally:
                        torch.cuda.set_sync_debug_mode(0)

                setattr(pl_module, name, strict)

    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[SyncDebug()],
    )
    trainer.fit(model, _Batches(3, 4), _Batches(2, 4))
    assert trainer.global_step == 3 and "val/mIoU" in trainer.callback_metrics


def test_compile_option_compiles_the_network():
    model = UNet(num_classes=3, encoder="original", base_channels=4, compile=True)
    model.configure_model()
    assert isinstance(model.net, torch._dynamo.eval_frame.OptimizedModule)
    model.configure_model()  # idempotent
    assert not isinstance(model.net._orig_mod, torch._dynamo.eval_frame.OptimizedModule)


def test_channels_last_only_on_cuda():
    model = UNet(num_classes=3, encoder="original", base_channels=4)
    model.configure_model()  # on the CPU: left as it is (oneDNN prefers its own layouts)
    conv = next(m for m in model.net.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous()


@pytest.mark.gpu
def test_fast_paths_on_the_gpu(tmp_path):
    model = UNet(num_classes=3, encoder="resnet18").cuda()
    model.configure_model()
    conv = next(m for m in model.net.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    image = model._input({"image": torch.randn(1, 3, 32, 32, device="cuda")})
    assert image.is_contiguous(memory_format=torch.channels_last)
    trainer = L.Trainer(
        accelerator="gpu", devices=1, max_steps=1, logger=False, default_root_dir=tmp_path
    )
    trainer.fit(model, _Batches(1, 3))
    assert trainer.optimizers[0].defaults.get("fused") is True
