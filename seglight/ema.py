"""Exponential moving average of a network's weights (Polyak averaging), as timm's ModelEmaV3.

After each optimiser step: ema = d * ema + (1 - d) * current, for every floating-point parameter
and buffer (BatchNorm statistics included); integer buffers are copied. With `warmup`, the decay
of update n (counting from 1) is min(decay, (1 + n) / (10 + n)), TensorFlow's
ExponentialMovingAverage(num_updates) rule: early averages are not dominated by the random
initial weights, which matters for short runs (decay 0.999 averages over ~1000 steps).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """A frozen copy of `net` whose weights follow the exponential moving average of `net`'s.

    `module` is the averaged network (eval mode, no gradients); `num_updates` counts updates.
    Both are in the state dict, so checkpoints hold the average.

    Args:
        net: the network being trained (a torch.compile'd network is unwrapped).
        decay: the decay d, e.g. 0.999.
        warmup: use min(decay, (1 + n) / (10 + n)) for update n.
    """

    def __init__(self, net: nn.Module, decay: float, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(getattr(net, "_orig_mod", net)).eval()
        self.module.requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> torch.Tensor:
        """The decay the next update uses (a 0-dim tensor on the weights' device: no host sync)."""
        decay = torch.full((), self.decay, device=self.num_updates.device)
        if not self.warmup:
            return decay
        n = (self.num_updates + 1).float()
        return torch.minimum(decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """Move the average towards `net`'s current weights (same architecture as `module`)."""
        net = getattr(net, "_orig_mod", net)
        decay = self.current_decay()
        ema_float, new_float = [], []
        for ema_t, new_t in zip(
            [*self.module.parameters(), *self.module.buffers()],
            [*net.parameters(), *net.buffers()],
            strict=True,
        ):
            if ema_t.is_floating_point():
                ema_float.append(ema_t)
                new_float.append(new_t.detach().to(ema_t.dtype))
            else:
                ema_t.copy_(new_t)
        if ema_float:
            # d * ema + (1 - d) * new, with fused multi-tensor kernels
            torch._foreach_mul_(ema_float, decay)
            torch._foreach_add_(ema_float, torch._foreach_mul(new_float, 1 - decay))
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMA:
        # the average is only ever evaluated: keep BatchNorm and dropout in eval mode
        super().train(mode)
        self.module.eval()
        return self
