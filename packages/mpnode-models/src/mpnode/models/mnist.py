"""ODE-Net for MNIST (Chen et al. 2018): downsampling stem, one ODE block, classifier head.

Shapes for a ``(B, 1, 28, 28)`` input and ``width = 64``:

* [`downsampling_stem`][mpnode.models.mnist.downsampling_stem]: ``(B, 1, 28, 28) -> (B, 64, 6, 6)`` (3x3 conv, then two
  4x4 stride-2 convs, GroupNorm + ReLU in between);
* [`ODEBlock`][mpnode.models.mnist.ODEBlock]: ``(B, 64, 6, 6) -> (B, 64, 6, 6)``, the solution at ``T`` of
  ``dh/dt = ODEFunc(t, h)`` solved by ``mpnode.core.odeint`` (or any solver with
  torchdiffeq's calling convention);
* [`classifier_head`][mpnode.models.mnist.classifier_head]: ``(B, 64, 6, 6) -> (B, 10)`` logits (GroupNorm, ReLU,
  global average pooling, linear).

With the defaults the network has 208,266 parameters (the paper's "0.22 M").
The MNIST data helpers live in [`mpnode.models.mnist_data`][mpnode.models.mnist_data] (they need
torchvision, the ``mnist`` extra) and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .mnist_data import load_mnist, mnist_loaders, write_idx_mnist

__all__ = [
    "ConcatConv2d",
    "ODEFunc",
    "ODEBlock",
    "ODENet",
    "downsampling_stem",
    "classifier_head",
    "group_norm",
    "load_mnist",
    "mnist_loaders",
    "write_idx_mnist",
]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with ``min(32, channels)`` groups (the ODE-Net convention)."""
    return nn.GroupNorm(min(32, channels), channels)


class ConcatConv2d(nn.Module):
    """A 2-D convolution that sees time as one extra input channel.

    ``forward(t, x)``: ``x`` is ``(B, C_in, H, W)``, ``t`` a scalar tensor; the
    constant image ``t`` is prepended to the channels, so the weight is
    ``(C_out, C_in + 1, k, k)``.  Under autocast the convolution runs in the
    autocast dtype like any ``nn.Conv2d``.
    """

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim_in + 1, dim_out, kernel_size, stride=stride, padding=padding)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0], 1, *x.shape[2:])
        return self.conv(torch.cat([tt, x], dim=1))


class ODEFunc(nn.Module):
    """The vector field ``f(t, h)`` of the ODE block: norm-ReLU-conv twice, then a norm.

    ``forward(t, h)`` maps ``(B, C, H, W)`` to ``(B, C, H, W)``; both
    convolutions are [`ConcatConv2d`][mpnode.models.mnist.ConcatConv2d] (3x3, padding 1).  ``nfe`` counts
    calls (forward evaluations and, with mpnode, the recomputations of backward).
    """

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.norm1 = group_norm(width)
        self.conv1 = ConcatConv2d(width, width)
        self.norm2 = group_norm(width)
        self.conv2 = ConcatConv2d(width, width)
        self.norm3 = group_norm(width)
        self.nfe = 0

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        out = self.conv1(t, torch.relu(self.norm1(h)))
        out = self.conv2(t, torch.relu(self.norm2(out)))
        return self.norm3(out)


class ODEBlock(nn.Module):
    """``h(0) = x  ->  h(T)`` with ``dh/dt = func(t, h)`` on ``n_steps`` fixed steps.

    Args:
        func: the vector field (an ``nn.Module``; its parameters get gradients).
        n_steps: number of Runge-Kutta steps on ``[0, T]`` (step size ``T / n_steps``).
        method: tableau name understood by ``odeint`` (``"rk4"`` is the 3/8 rule).
        T: final time.
        odeint: the solver; default ``mpnode.core.odeint``.  ``torchdiffeq.odeint``
            works too (same calling convention and options).
        options: extra solver options merged into ``{"step_size": T / n_steps}``,
            e.g. ``{"stats": SolverStats()}`` for mpnode.
        state_dtype: dtype of the ODE state.  A low-precision input (the output of
            a stem run under autocast) is cast to it, because mpnode keeps the
            state in high precision and accepts only float32/float64 ``y0``.

    ``forward(x)`` returns a tensor shaped like ``x`` in ``state_dtype``.  With
    mpnode, backward stores one checkpoint of ``x``'s size per step (in the
    autocast dtype under autocast), nothing per stage.
    """

    def __init__(
        self,
        func: nn.Module,
        n_steps: int = 4,
        method: str = "rk4",
        T: float = 1.0,
        odeint: Callable[..., Any] | None = None,
        options: Mapping[str, Any] | None = None,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if n_steps < 1:
            raise ValueError(f"ODEBlock: n_steps must be >= 1, got {n_steps}")
        if odeint is None:
            from mpnode.core import odeint
        self.func = func
        self.n_steps = n_steps
        self.method = method
        self.T = float(T)
        self.odeint = odeint
        self.options = dict(options or {})
        self.state_dtype = state_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = x if x.dtype == self.state_dtype else x.to(self.state_dtype)
        t = torch.tensor([0.0, self.T], dtype=self.state_dtype, device=x.device)
        options = {"step_size": self.T / self.n_steps, **self.options}
        return self.odeint(self.func, y0, t, method=self.method, options=options)[-1]


def downsampling_stem(width: int = 64, in_channels: int = 1) -> nn.Sequential:
    """``(B, in_channels, 28, 28) -> (B, width, 6, 6)``.

    conv3x3 without padding (26x26), GN, ReLU, conv4x4/2 (13x13), GN, ReLU, conv4x4/2 (6x6).
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, 1),
        group_norm(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 4, 2, 1),
        group_norm(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 4, 2, 1),
    )


def classifier_head(width: int = 64, n_classes: int = 10) -> nn.Sequential:
    """``(B, width, H, W) -> (B, n_classes)``: GN, ReLU, global average pool, linear."""
    return nn.Sequential(
        group_norm(width),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, n_classes),
    )


class ODENet(nn.Module):
    """Stem, [`ODEBlock`][mpnode.models.mnist.ODEBlock] and head: ``(B, 1, 28, 28)`` images to ``(B, 10)`` logits.

    The keyword arguments after ``width`` go to [`ODEBlock`][mpnode.models.mnist.ODEBlock].  Run it inside
    ``torch.autocast`` for low precision: the stem and head run in the autocast
    dtype, the ODE state stays float32 (mpnode) and the logits are in whatever
    dtype the head's linear layer produced (cast them to float32 for the loss).
    """

    def __init__(
        self,
        width: int = 64,
        n_steps: int = 4,
        method: str = "rk4",
        T: float = 1.0,
        odeint: Callable[..., Any] | None = None,
        options: Mapping[str, Any] | None = None,
        in_channels: int = 1,
        n_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = downsampling_stem(width, in_channels)
        self.block = ODEBlock(ODEFunc(width), n_steps=n_steps, method=method, T=T, odeint=odeint, options=options)
        self.head = classifier_head(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))

    @property
    def nfe(self) -> int:
        """Calls of the ODE function so far (reset with ``model.block.func.nfe = 0``)."""
        func = self.block.func
        assert isinstance(func, ODEFunc)
        return func.nfe
