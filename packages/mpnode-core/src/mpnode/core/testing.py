"""Helpers for tests, demos and benchmarks of ``odeint`` (like ``torch.testing``: public, needs torch only).

Reference problems with exact float64 answers, to measure a solver's error:

* [`LinearODE`][mpnode.core.testing.LinearODE]: ``y' = A y`` with the matrix exponential as ground truth
  for ``y(T)``, ``dL/dy0`` and ``dL/dA``;
* [`DynamicRangeODE`][mpnode.core.testing.DynamicRangeODE]: a scalar decay whose solution and adjoint span
  float16's range, with analytic gradients (the problem adjoint scaling solves).

A standard vector field, [`MLPField`][mpnode.core.testing.MLPField] (a tanh MLP on ``(y, t)``).

Meters for what a solve costs besides time:

* [`HeldMemory`][mpnode.core.meters.HeldMemory] / [`held_memory`][mpnode.core.meters.held_memory]: bytes of the distinct
  storages
  autograd saves for backward (``saved_tensors_hooks``; defined in
  [`mpnode.core.meters`][mpnode.core.meters], which ``AutoAdjoint`` uses, and re-exported here);
* [`SyncCount`][mpnode.core.testing.SyncCount] / [`count_host_syncs`][mpnode.core.testing.count_host_syncs]:
  device-to-host scalar reads
  (``aten._local_scalar_dense``: ``.item()``, ``bool(t)``, ``float(t)``).

See ``docs/tests.md`` for how the test suite uses them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .meters import HeldMemory, held_memory

__all__ = [
    "LinearField",
    "LinearODE",
    "DecayField",
    "DynamicRangeODE",
    "MLPField",
    "HeldMemory",
    "held_memory",
    "SyncCount",
    "count_host_syncs",
    "relative_error",
    "assert_relatively_close",
]

# ---------------------------------------------------------------- comparisons


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """``|result - reference| / |reference|`` in the Frobenius norm (a zero reference divides by 1e-300)."""
    return float((result - reference).norm() / reference.norm().clamp_min(1e-300))


def assert_relatively_close(results, references, tol: float = 1e-8) -> None:
    """Each tensor of ``results`` within relative error ``tol`` of its partner in ``references`` (same length,
    none of them None: a missing gradient fails)."""
    for result, reference in zip(results, references, strict=True):
        assert result is not None and reference is not None
        error = relative_error(result, reference)
        assert error < tol, (error, result, reference)


# ---------------------------------------------------------------- reference problems


class LinearField(torch.nn.Module):
    """``f(t, y) = y A^T`` (an ``nn.Linear`` without bias) for states ``y`` of shape ``(B, d)``.

    The product is a linear layer, so autocast evaluates it in low precision
    and caches the low-precision copy of ``A`` across calls, as for any
    ``nn.Linear``.  ``A`` (``(d, d)``) is the module's only parameter.
    """

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(A.clone())

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(y, self.A)


@dataclass
class LinearODE:
    """``y' = A y`` on ``[0, T]`` with ``y(T) = exp(T A) y0`` and loss ``L = 1/2 ||y(T)||^2``.

    Attributes:
        A: ``(d, d)`` float64 system matrix.
        y0: ``(B, d)`` float64 batch of initial states.
        T: final time.
    """

    A: torch.Tensor
    y0: torch.Tensor
    T: float = 1.0

    @classmethod
    def random(cls, dim: int = 8, batch: int = 4, T: float = 1.0, seed: int = 0) -> LinearODE:
        """A damped rotation-like system: skew-symmetric part plus ``-0.5 I`` and a small random part."""
        g = torch.Generator().manual_seed(seed)
        M = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        A = (M - M.T) / dim**0.5 - 0.5 * torch.eye(dim, dtype=torch.float64) + 0.1 * torch.randn(
            dim, dim, generator=g, dtype=torch.float64
        )
        y0 = torch.randn(batch, dim, generator=g, dtype=torch.float64)
        return cls(A, y0, T)

    @classmethod
    def decaying(cls, dim: int = 8, batch: int = 4, rate: float = 3.0, T: float = 3.0, seed: int = 0,
                 scales: tuple[float, ...] | None = None) -> LinearODE:
        """A decaying system: ``A = -rate I`` plus a skew-symmetric part and a small random part, so its eigenvalues
        lie around ``-rate`` and ``y(T)`` is about ``exp(-rate T)`` times ``y0``.

        ``scales``, if given, multiplies sample ``b`` of ``y0`` by ``scales[b % len(scales)]`` (a batch mixing
        magnitudes, e.g. ``(1e3, 1e-3)``).
        """
        g = torch.Generator().manual_seed(seed)
        M = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        A = -rate * torch.eye(dim, dtype=torch.float64) + (M - M.T) / dim**0.5 + 0.3 * torch.randn(
            dim, dim, generator=g, dtype=torch.float64
        )
        y0 = torch.randn(batch, dim, generator=g, dtype=torch.float64)
        if scales is not None:
            factors = torch.tensor(scales, dtype=torch.float64).repeat(batch // len(scales) + 1)[:batch]
            y0 = y0 * factors[:, None]
        return cls(A, y0, T)

    def exact(self) -> dict[str, torch.Tensor]:
        """Float64 ``yT`` (``(B, d)``), ``dy0`` (``(B, d)``) and ``dA`` (``(d, d)``) through the matrix exponential."""
        A = self.A.clone().requires_grad_(True)
        y0 = self.y0.clone().requires_grad_(True)
        yT = y0 @ torch.linalg.matrix_exp(self.T * A).T
        loss = 0.5 * (yT**2).sum()
        gy0, gA = torch.autograd.grad(loss, (y0, A))
        return {"yT": yT.detach(), "dy0": gy0, "dA": gA}

    def solve(self, odeint: Callable, n_steps: int, method: str = "rk4", dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", **kwargs) -> dict[str, torch.Tensor]:
        """``yT``, ``dy0`` and ``dA`` computed by ``odeint`` (any torchdiffeq-style solver) on ``n_steps`` steps.

        Runs in the caller's autocast context; the state and ``A`` are ``dtype``.
        """
        field = LinearField(self.A.to(device=device, dtype=dtype))
        y0 = self.y0.to(device=device, dtype=dtype).requires_grad_(True)
        t_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        t = torch.linspace(0.0, self.T, n_steps + 1, dtype=t_dtype, device=device)
        yT = odeint(field, y0, t, method=method, **kwargs)[-1]
        loss = 0.5 * (yT.float() ** 2).sum()
        gy0, gA = torch.autograd.grad(loss, (y0, field.A))
        return {"yT": yT.detach(), "dy0": gy0, "dA": gA}

    def errors(self, result: dict[str, torch.Tensor]) -> dict[str, float]:
        """Relative Frobenius errors of a [`solve`][mpnode.core.testing.LinearODE.solve] result against
        [`exact`][mpnode.core.testing.LinearODE.exact]."""
        ref = self.exact()
        return {k: float((result[k].double().cpu() - ref[k]).norm() / ref[k].norm()) for k in ref}


class DecayField(torch.nn.Module):
    """``f(t, y) = -lambda(t) y`` with ``lambda(t) = a t^2 + b t + c``, for ``y`` of shape ``(B, 1)``.

    The product is written as a ``(B, 1) x (1, 1)`` matmul so that autocast
    evaluates it (and its VJP) in low precision.  ``coef = (a, b, c)`` is the parameter.
    """

    def __init__(self, a: float, b: float, c: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.coef = torch.nn.Parameter(torch.tensor([a, b, c], dtype=dtype))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b, c = self.coef
        rate = a * t * t + b * t + c
        return y @ (-rate).reshape(1, 1)


@dataclass
class DynamicRangeODE:
    """Scalar ``y' = -(a t^2 + b t + c) y`` on ``[0, T]`` whose solution spans float16's range; ``coef = (a, b, c)``.

    ``y(T) = y0 exp(-(a T^3/3 + b T^2/2 + c T))``; for ``L = s/2 y(T)^2`` (``s`` =
    ``loss_scale``: tiny values provoke underflow, huge ones overflow) the exact
    gradients are ``dL/dy0 = s y(T)^2 / y0`` and ``dL/d(a, b, c) = -s y(T)^2 (T^3/3, T^2/2, T)``.
    The defaults decay ``y`` from 2e3 to 2.3e-4 (``exp(-16)``), so the adjoint falls
    from 2.3e-4 at ``T`` to 2.5e-11 at 0, far below float16's smallest subnormal (6e-8).
    """

    y0: float = 2.0e3
    coef: tuple[float, float, float] = (6.0, 8.0, 10.0)
    T: float = 1.0
    loss_scale: float = 1.0

    def exact(self) -> dict[str, torch.Tensor]:
        """Float64 ``yT`` (``(1,)``), ``dy0`` (``(1,)``) and ``dcoef`` (``(3,)``: ``dL/da, dL/db, dL/dc``)."""
        T, (a, b, c) = self.T, self.coef
        decay = a * T**3 / 3 + b * T**2 / 2 + c * T
        yT = self.y0 * torch.exp(torch.tensor(-decay, dtype=torch.float64))
        s = self.loss_scale
        return {
            "yT": yT.reshape(1),
            "dy0": (s * yT**2 / self.y0).reshape(1),
            "dcoef": -s * yT**2 * torch.tensor([T**3 / 3, T**2 / 2, T], dtype=torch.float64),
        }

    def solve(self, odeint: Callable, n_steps: int = 200, device: torch.device | str = "cpu", method: str = "rk4",
              dtype: torch.dtype = torch.float32, **kwargs) -> dict[str, torch.Tensor]:
        """Solve with a ``dtype`` state (inside the caller's autocast); returns ``yT``, ``dy0``, ``dcoef``.

        ``n_steps`` intervals of the output times (the grid of a fixed method; pass 1
        for an adaptive ``method``, whose outputs are then ``[0, T]``).
        """
        field = DecayField(*self.coef, dtype=dtype).to(device)
        y0 = torch.full((1, 1), self.y0, device=device, dtype=dtype, requires_grad=True)
        t = torch.linspace(0.0, self.T, n_steps + 1, device=device, dtype=dtype)
        yT = odeint(field, y0, t, method=method, **kwargs)[-1]
        loss = self.loss_scale * 0.5 * (yT.float() ** 2).sum()
        gy0, gcoef = torch.autograd.grad(loss, (y0, field.coef))
        return {"yT": yT.detach().reshape(1), "dy0": gy0.reshape(1), "dcoef": gcoef}

    def errors(self, result: dict[str, torch.Tensor]) -> dict[str, float]:
        """Relative errors ``yT``, ``dy0``, and ``da``, ``db``, ``dc`` (``dcoef`` split)."""
        ref = self.exact()
        out = {}
        for key in ("yT", "dy0"):
            out[key] = float(((result[key].double().cpu() - ref[key]).abs() / ref[key].abs()).max())
        for i, name in enumerate(("da", "db", "dc")):
            r, g = ref["dcoef"][i], result["dcoef"][i].double().cpu()
            out[name] = float((g - r).abs() / r.abs())
        return out


# ---------------------------------------------------------------- a standard field


class MLPField(torch.nn.Module):
    """A tanh MLP field ``f(t, y)`` on states ``(..., dim)`` with the time appended to the input.

    ``hidden_layers`` tanh layers of ``width`` (the first takes ``dim + 1``
    inputs), then a linear output layer back to ``dim`` (weights scaled by ``gain``
    after PyTorch's default initialisation):
    ``f = W_out tanh(... tanh(W_1 [y, t] + b_1) ...) + b_out``.
    The time is cast to ``y``'s dtype before it is appended.
    """

    def __init__(self, dim: int = 4, width: int = 16, hidden_layers: int = 1, gain: float = 1.0) -> None:
        super().__init__()
        if hidden_layers < 1:
            raise ValueError(f"MLPField needs hidden_layers >= 1, got {hidden_layers}")
        sizes = [dim + 1] + [width] * hidden_layers
        hidden = [torch.nn.Linear(i, o) for i, o in itertools.pairwise(sizes)]
        self.hidden = torch.nn.ModuleList(hidden)
        self.out = torch.nn.Linear(width, dim)
        if gain != 1.0:  # larger weights: a more nonlinear field that needs more (adaptive) steps
            with torch.no_grad():
                for layer in (*hidden, self.out):
                    layer.weight.mul_(gain)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([y, t.to(y.dtype).expand(*y.shape[:-1], 1)], dim=-1)
        for layer in self.hidden:
            h = torch.tanh(layer(h))
        return self.out(h)


# ---------------------------------------------------------------- meters


class SyncCount(TorchDispatchMode):
    """A dispatch mode counting ``aten._local_scalar_dense`` calls (device-to-host scalar reads).

    ``with SyncCount() as c: ...`` then ``c.count``.  Every op passes through
    Python while it is active, so do not time a region while counting.

    Attributes:
        count: number of calls seen while active.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_host_syncs() -> SyncCount:
    """A [`SyncCount`][mpnode.core.testing.SyncCount] for ``with count_host_syncs() as c:``
    (``.item()``/``bool(tensor)`` reads)."""
    return SyncCount()
