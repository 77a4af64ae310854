"""Reference problems with exact solutions and gradients (DESIGN.md section 7).

Used by the tests, the demos and the accuracy examples to measure the error of
a solver's solution and gradients against float64 ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class LinearField(torch.nn.Module):
    """``f(t, y) = y A^T`` (an ``nn.Linear`` without bias) for states ``y`` of shape ``(B, d)``.

    The product is a linear layer, so autocast evaluates it in low precision
    and caches the low-precision copy of ``A`` across calls, as for any
    ``nn.Linear``.
    ``A`` (``(d, d)``) is the module's only parameter.
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
    def random(cls, dim: int = 8, batch: int = 4, T: float = 1.0, seed: int = 0) -> "LinearODE":
        """A damped rotation-like system: skew-symmetric part plus ``-0.5 I`` and a small random part."""
        g = torch.Generator().manual_seed(seed)
        M = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        A = (M - M.T) / dim**0.5 - 0.5 * torch.eye(dim, dtype=torch.float64) + 0.1 * torch.randn(
            dim, dim, generator=g, dtype=torch.float64
        )
        y0 = torch.randn(batch, dim, generator=g, dtype=torch.float64)
        return cls(A, y0, T)

    def exact(self) -> dict[str, torch.Tensor]:
        """Float64 ``y(T)``, ``dL/dy0`` and ``dL/dA`` through the matrix exponential."""
        A = self.A.clone().requires_grad_(True)
        y0 = self.y0.clone().requires_grad_(True)
        yT = y0 @ torch.linalg.matrix_exp(self.T * A).T
        loss = 0.5 * (yT**2).sum()
        gy0, gA = torch.autograd.grad(loss, (y0, A))
        return {"yT": yT.detach(), "dy0": gy0, "dA": gA}

    def solve(self, odeint, n_steps: int, method: str = "rk4", dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", **kwargs) -> dict[str, torch.Tensor]:
        """``y(T)`` and the gradients computed by ``odeint`` (any torchdiffeq-style solver).

        Runs in the caller's autocast context; the state is ``dtype``.
        """
        field = LinearField(self.A.to(device=device, dtype=dtype))
        y0 = self.y0.to(device=device, dtype=dtype).requires_grad_(True)
        t = torch.linspace(0.0, self.T, n_steps + 1, dtype=torch.float32 if dtype != torch.float64 else dtype, device=device)
        yT = odeint(field, y0, t, method=method, **kwargs)[-1]
        loss = 0.5 * (yT.float() ** 2).sum()
        gy0, gA = torch.autograd.grad(loss, (y0, field.A))
        return {"yT": yT.detach(), "dy0": gy0, "dA": gA}

    def errors(self, result: dict[str, torch.Tensor]) -> dict[str, float]:
        """Relative Frobenius errors of a :meth:`solve` result against :meth:`exact`."""
        ref = self.exact()
        return {k: float((result[k].double().cpu() - ref[k]).norm() / ref[k].norm()) for k in ref}


class DecayField(torch.nn.Module):
    """``f(t, y) = -lambda(t) y`` with ``lambda(t) = a t^2 + b t + c``, for ``y`` of shape ``(B, 1)``.

    The product is written as a ``(B, 1) x (1, 1)`` matmul so that autocast
    evaluates it (and its VJP) in low precision.  ``a, b, c`` are parameters.
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
    """Scalar ``y' = -(a t^2 + b t + c) y`` on ``[0, T]`` whose solution spans float16's range.

    ``y(T) = y0 exp(-(a T^3/3 + b T^2/2 + c T))``; for ``L = 1/2 y(T)^2`` the exact
    gradients are ``dL/dy0 = y(T)^2 / y0`` and ``dL/d(a, b, c) = -y(T)^2 (T^3/3, T^2/2, T)``.
    ``loss_scale`` multiplies ``L`` (tiny values provoke underflow, huge ones overflow).
    The defaults decay ``y`` from 2e3 to 2.3e-4 (``exp(-16)``), so the adjoint falls
    from 2.3e-4 at ``T`` to 2.5e-11 at 0, far below float16's smallest subnormal (6e-8).
    """

    y0: float = 2.0e3
    a: float = 6.0
    b: float = 8.0
    c: float = 10.0
    T: float = 1.0
    loss_scale: float = 1.0

    def exact(self) -> dict[str, torch.Tensor]:
        T = self.T
        decay = self.a * T**3 / 3 + self.b * T**2 / 2 + self.c * T
        yT = self.y0 * torch.exp(torch.tensor(-decay, dtype=torch.float64))
        s = self.loss_scale
        return {
            "yT": yT.reshape(1),
            "dy0": (s * yT**2 / self.y0).reshape(1),
            "dcoef": -s * yT**2 * torch.tensor([T**3 / 3, T**2 / 2, T], dtype=torch.float64),
        }

    def solve(self, odeint, n_steps: int = 200, device: torch.device | str = "cpu", **kwargs) -> dict[str, torch.Tensor]:
        """Solve in float32 state (inside the caller's autocast) and return ``y(T)`` and the gradients."""
        field = DecayField(self.a, self.b, self.c).to(device)
        y0 = torch.full((1, 1), self.y0, device=device, requires_grad=True)
        t = torch.linspace(0.0, self.T, n_steps + 1, device=device)
        yT = odeint(field, y0, t, method="rk4", **kwargs)[-1]
        loss = self.loss_scale * 0.5 * (yT.float() ** 2).sum()
        gy0, gcoef = torch.autograd.grad(loss, (y0, field.coef))
        return {"yT": yT.detach().reshape(1), "dy0": gy0.reshape(1), "dcoef": gcoef}

    def errors(self, result: dict[str, torch.Tensor]) -> dict[str, float]:
        """Relative errors per quantity; ``dcoef`` is split into ``da``, ``db``, ``dc``."""
        ref = self.exact()
        out = {}
        for key in ("yT", "dy0"):
            out[key] = float(((result[key].double().cpu() - ref[key]).abs() / ref[key].abs()).max())
        for i, name in enumerate(("da", "db", "dc")):
            r, g = ref["dcoef"][i], result["dcoef"][i].double().cpu()
            out[name] = float(((g - r).abs() / r.abs()))
        return out
