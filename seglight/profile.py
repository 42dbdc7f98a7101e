"""Model size and cost: parameters and FLOPs, as `python -m seglight models --flops` reports them.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode`, which counts the matrix work
only (convolutions, transposed convolutions, matmuls, attention) from the operators' shapes, with
one multiply-accumulate = 2 FLOPs. Normalisation, activations, pooling, interpolation, additions
and biases are not counted (a few percent for these networks). So:

    GFLOPs (this table) = 2 x GMACs (multiply-accumulates, "multiply-adds").

Papers differ: many segmentation papers' "FLOPs" are in fact multiply-adds (half of this
column), others count 2 x MACs as here, and each at its own input size, backbone and number of
classes. So a model's `paper_cost` (a PaperCost) records the paper's figure together with that
setting and unit, and `models --flops` puts beside it our count at the same setting, in the same
unit; the docstring of each model names the table.

The count runs the model once. On the "meta" device it is free of compute: `count_flops` runs on
whatever device the model's parameters are on, and `model_cost` builds the model on "meta" first,
falling back to the CPU when a model cannot be built or run there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def parse_size(text: str) -> tuple[int, int]:
    """ "360x480" -> (360, 480) (height x width), for the command line."""
    import argparse

    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 360x480, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return h, w


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, input_size: Sequence[int] = (1, 3, 360, 480)) -> int:
    """FLOPs (2 x multiply-accumulates, matrix ops only) of one eval-mode forward pass.

    Args:
        model: any module taking one image tensor; a SegmentationModel is run through its
            forward (the logits, no auxiliary heads).
        input_size: (B, C, H, W) of the input.

    The input is created on the device of the model's first parameter (CPU if it has none).
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(tuple(input_size), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def model_cost(
    cls: type[nn.Module],
    input_size: Sequence[int] | None = None,
    **kwargs,
) -> tuple[int, int | None]:
    """(parameters, FLOPs or None) of `cls(**kwargs)`, built on the meta device when possible.

    FLOPs are counted only when `input_size` is given. Errors of the model itself propagate.
    """
    try:
        with torch.device("meta"):
            model = cls(**kwargs)
        flops = count_flops(model, input_size) if input_size is not None else None
        return count_parameters(model), flops
    except Exception:  # noqa: BLE001 - some ops have no meta kernel: measure on the CPU instead
        model = cls(**kwargs)
        flops = count_flops(model, input_size) if input_size is not None else None
        return count_parameters(model), flops


@dataclass(frozen=True)
class PaperCost:
    """A paper's compute figure and the setting it was measured at.

    Attributes:
        value: the figure as printed.
        unit: "GFLOPs" (2 x multiply-accumulates, as this module counts) or "GMACs"
            (multiply-adds, billions).
        size: the input (H, W).
        num_classes: the classes of the paper's model.
        options: the paper's model options where they differ from the defaults (e.g. its backbone).
    """

    value: float
    unit: Literal["GFLOPs", "GMACs"]
    size: tuple[int, int]
    num_classes: int = 11
    options: dict[str, Any] = field(default_factory=dict)

    def setting(self) -> str:
        """E.g. "513x513, 21 classes, encoder=resnet101"."""
        extra = "".join(f", {k}={v}" for k, v in self.options.items())
        return f"{self.size[0]}x{self.size[1]}, {self.num_classes} classes{extra}"

    def ours(self, cls: type[nn.Module]) -> float:
        """Our count for `cls` at the paper's setting, in the paper's unit."""
        _, flops = model_cost(cls, (1, 3, *self.size), num_classes=self.num_classes, **self.options)
        return flops / (2e9 if self.unit == "GMACs" else 1e9)
