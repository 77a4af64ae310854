"""Step-size control as objects: fixed-grid rules and adaptive controllers.

Fixed grids (each rule validates its own option and builds the grid from ``t``
with autograd on, so gradients w.r.t. grid nodes flow back to ``t``):

* :class:`OutputTimesGrid`: the output times are the grid;
* :class:`StepSizeGrid`: ``t[0], t[0] +- h, ...`` ending exactly at ``t[-1]`` (torchdiffeq's ``step_size``);
* :class:`ConstructedGrid`: a user ``grid_constructor(func, y0, t)``.

Adaptive steps (one decision per attempt, made on the host from the error ratio):

* :class:`IntegralController`: torchdiffeq's rule (the default), ``h * min(ifactor,
  max(safety / r^(1/p), dfactor'))`` with ``dfactor' = 1`` after an accepted step;
* :class:`PIController`: Gustafsson's proportional-integral rule, which also uses
  the previous accepted ratio and gives smoother step sequences.

:class:`Tolerance` turns ``rtol``/``atol``/``norm`` into the error ratio,
:class:`RoundoffNoise` keeps the rounding noise of a low-precision field from
rejecting steps, and :func:`initial_step` is Hairer's starting-step rule.
"""

from __future__ import annotations

import abc
import math
import os
from typing import Any, Callable

import torch

from .state import FlatState
from .validation import check_grid


# -- fixed grids ------------------------------------------------------------------------------------


class GridRule(abc.ABC):
    """A fixed grid built from the output times before the solve."""

    @abc.abstractmethod
    def build(self, func: Callable, y0: Any, t: torch.Tensor, t_host: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grid, grid_host)``: the grid (1-D, ``t``'s dtype and device, differentiable in ``t``) and its host copy."""


class OutputTimesGrid(GridRule):
    """Steps between consecutive output times."""

    def build(self, func, y0, t, t_host):
        return t, t_host


class StepSizeGrid(GridRule):
    """``t[0], t[0] +- h, ...`` up to and ending exactly at ``t[-1]`` (torchdiffeq's rule).

    The number of nodes is ``ceil(|t[-1] - t[0]| / h + 1)``; the last node is
    ``t[-1]``.  Interior nodes that would land on or beyond ``t[-1]`` through
    roundoff are dropped so the grid stays strictly monotone.
    """

    #: Refuse grids with more steps than this before allocating anything.
    MAX_STEPS = 2**31 - 1

    def __init__(self, step_size: float) -> None:
        try:
            value = float(step_size)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"options['step_size'] must be a positive number, got {step_size!r}") from None
        if isinstance(step_size, bool) or not value > 0 or value == float("inf"):
            raise ValueError(f"options['step_size'] must be positive and finite, got {step_size!r}; the direction comes from t")
        self.step_size = value

    def build(self, func, y0, t, t_host):
        sign = 1.0 if bool(t_host[-1] >= t_host[0]) else -1.0
        span = float((t_host[-1] - t_host[0]) * sign)
        n_nodes = math.ceil(span / self.step_size + 1)
        self._check_size(n_nodes, span, t, t_host, y0)
        offsets = torch.arange(0, n_nodes - 1, dtype=t_host.dtype) * (self.step_size * sign)
        keep = int(((offsets + t_host[0] - t_host[-1]) * sign < 0).sum())
        inner = offsets[:keep].to(t.device) + t[0]  # differentiable in t[0]
        grid = torch.cat([inner, t[-1:]])
        return grid, grid.detach().cpu()

    def _check_size(self, n_nodes: int, span: float, t: torch.Tensor, t_host: torch.Tensor, y0: Any) -> None:
        """Refuse, before allocating, a grid with too many steps or one that would not fit in memory.

        The grid takes ``n_nodes`` values on the host (while it is built) and on
        ``t``'s device; the message also states what training would keep (one
        checkpoint of the state per step, at most ``y0``'s dtype).
        """
        steps = n_nodes - 1
        grid_bytes = n_nodes * (t_host.element_size() + t.element_size())
        parts = (y0,) if isinstance(y0, torch.Tensor) else tuple(y0)
        checkpoint_bytes = steps * sum(p.numel() * p.element_size() for p in parts)
        available = available_memory_bytes(t.device)
        if steps <= self.MAX_STEPS and (available is None or grid_bytes <= available):
            return
        limit = (f"more than the {self.MAX_STEPS:,} steps a grid may have" if steps > self.MAX_STEPS
                 else f"but only {_gib(available)} is available on {t.device}")
        raise ValueError(
            f"options['step_size'] = {self.step_size:g} over |t[-1] - t[0]| = {span:g} makes {steps:,} steps: the grid "
            f"alone needs {_gib(grid_bytes)} ({grid_bytes:,} bytes) and training keeps one checkpoint per step "
            f"({_gib(checkpoint_bytes)} more), {limit}; use a larger step_size"
        )


def _gib(n: int | float) -> str:
    return f"{n / 2**30:.3g} GiB"


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a new allocation on ``device`` can use: free CUDA memory plus PyTorch's reusable cache on a GPU,
    ``MemAvailable`` of ``/proc/meminfo`` on a Linux host, else the physical memory; ``None`` if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class ConstructedGrid(GridRule):
    """A user grid ``grid_constructor(func, y0, t)``: 1-D, ``t``'s dtype/device, from ``t[0]`` to ``t[-1]``, monotone."""

    def __init__(self, grid_constructor: Callable) -> None:
        if not callable(grid_constructor):
            raise TypeError("options['grid_constructor'] must be callable as grid_constructor(func, y0, t) -> grid")
        self.grid_constructor = grid_constructor

    def build(self, func, y0, t, t_host):
        grid = self.grid_constructor(func, y0, t)
        return grid, check_grid(grid, t, t_host)


# -- adaptive steps ---------------------------------------------------------------------------------


class StepSizeController(abc.ABC):
    """Chooses the next step size from the current one and the error ratio (host floats)."""

    @abc.abstractmethod
    def propose(self, h: float, ratio: float, accepted: bool, order: int, previous_ratio: float | None) -> float:
        """The next step size ``> 0`` after an attempt of size ``h > 0`` with error ratio ``ratio``.

        ``previous_ratio`` is the ratio of the last accepted step before this
        attempt (``None`` at the start).
        """


def _positive(name: str, value: Any, upper: float | None = None) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not value > 0 or not math.isfinite(value) or (upper is not None and value > upper):
        bound = f" and at most {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be positive and finite{bound}, got {value}")
    return value


class IntegralController(StepSizeController):
    """torchdiffeq's step-size rule (its documented behaviour; the default).

    ``factor = min(ifactor, max(safety / r^(1/p), dfactor'))`` with ``p`` the
    method's order and ``dfactor' = 1`` when ``r < 1`` (an accepted step never
    shrinks the next one), ``dfactor`` otherwise; ``r = 0`` gives ``ifactor``.
    """

    def __init__(self, safety: float = 0.9, ifactor: float = 10.0, dfactor: float = 0.2) -> None:
        self.safety = _positive("safety", safety, upper=1.0)
        self.ifactor = _positive("ifactor", ifactor)
        self.dfactor = _positive("dfactor", dfactor, upper=1.0)
        if self.ifactor < 1.0:
            raise ValueError(f"ifactor must be at least 1, got {self.ifactor}")

    def propose(self, h, ratio, accepted, order, previous_ratio):
        if ratio == 0.0:
            return h * self.ifactor
        floor = 1.0 if ratio < 1.0 else self.dfactor
        return h * min(self.ifactor, max(self.safety / ratio ** (1.0 / order), floor))

    def __repr__(self) -> str:
        return f"IntegralController(safety={self.safety}, ifactor={self.ifactor}, dfactor={self.dfactor})"


class PIController(StepSizeController):
    """Proportional-integral control (Gustafsson 1991; Hairer & Wanner, Solving ODEs II, IV.2).

    After an accepted step: ``factor = safety * r_n^(-beta1/p) * r_{n-1}^(beta2/p)``
    (``r_{n-1}`` the previous accepted ratio, 1 at the start), clipped to
    ``[dfactor, ifactor]``.  After a rejection the previous ratio is not used:
    ``factor = max(dfactor, safety * r^(-1/p))``.  Defaults ``beta1 = 0.7``,
    ``beta2 = 0.4`` (Hairer & Wanner's suggestion).
    """

    def __init__(
        self, beta1: float = 0.7, beta2: float = 0.4, safety: float = 0.9, ifactor: float = 10.0, dfactor: float = 0.2
    ) -> None:
        self.beta1 = _positive("beta1", beta1)
        if isinstance(beta2, bool) or not isinstance(beta2, (int, float)) or not 0.0 <= beta2 < self.beta1:
            raise ValueError(f"beta2 must be a number in [0, beta1), got {beta2!r}")
        self.beta2 = float(beta2)
        self.safety = _positive("safety", safety, upper=1.0)
        self.ifactor = _positive("ifactor", ifactor)
        self.dfactor = _positive("dfactor", dfactor, upper=1.0)

    def propose(self, h, ratio, accepted, order, previous_ratio):
        if ratio == 0.0:
            return h * self.ifactor
        if not accepted:
            return h * max(self.dfactor, min(1.0, self.safety * ratio ** (-1.0 / order)))
        memory = (previous_ratio if previous_ratio else 1.0) ** (self.beta2 / order)
        factor = self.safety * ratio ** (-self.beta1 / order) * memory
        return h * min(self.ifactor, max(self.dfactor, factor))

    def __repr__(self) -> str:
        return f"PIController(beta1={self.beta1}, beta2={self.beta2}, safety={self.safety})"


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(mean(x^2))`` over all elements."""
    return x.abs().pow(2).mean().sqrt()


class Tolerance:
    """``rtol``/``atol`` and the norm of the error ratio, on flat states.

    The ratio of an attempt is ``norm(e / tol)`` with ``e = h sum b_err_i k_i``
    and ``tol = atol + rtol * max(|y0|, |y1|)`` elementwise (torchdiffeq's rule),
    all in the state's dtype.  ``rtol``/``atol`` are numbers, tensors that
    broadcast to ``y0``'s shape (per-element tolerances), or for a tuple state a
    tuple of those.  ``norm`` receives the scaled error in the state's
    structure; the default is the RMS norm (the max of the parts' RMS norms for a
    tuple state, as torchdiffeq does).

    With stages evaluated in a lower precision than the state, :meth:`noisy_error_ratios`
    also weighs the estimate against its rounding noise (:class:`RoundoffNoise`).
    """

    def __init__(self, rtol: Any, atol: Any, layout: FlatState, norm: Callable | None) -> None:
        self.layout = layout
        rtol, atol = _flat_tolerance("rtol", rtol, layout), _flat_tolerance("atol", atol, layout)
        _refuse_zero_tolerances(rtol, atol)
        self.rtol, self.atol = _on_state(rtol, layout), _on_state(atol, layout)
        if norm is not None and not callable(norm):
            raise TypeError(f"options['norm'] must be callable as norm(error) -> 0-dim tensor, got {norm!r}")
        self.norm = norm

    def scale(self, y0: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
        return self.atol + self.rtol * torch.max(y0.abs(), y1.abs())

    def apply_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The norm of a flat vector, in the user's structure (0 for an empty state: it has no error to control)."""
        if x.numel() == 0:
            return x.new_zeros(())
        if self.norm is not None:
            out = self.norm(self.layout.unflatten(x))
            if not isinstance(out, torch.Tensor):
                try:
                    out = torch.as_tensor(out, dtype=x.dtype, device=x.device)
                except (TypeError, ValueError, RuntimeError):
                    raise TypeError(f"options['norm'] must return a number or a 0-dim tensor, got {out!r}") from None
            if out.numel() != 1:
                raise TypeError(
                    f"options['norm'] returned a tensor of shape {tuple(out.shape)}; it must reduce the scaled error to "
                    "one number (a 0-dim tensor), e.g. lambda e: e.abs().max()"
                )
            return out.reshape(())
        if not self.layout.is_tuple:
            return rms_norm(x)
        parts = torch.split(x, self.layout.sizes)
        return torch.stack([rms_norm(p) for p in parts if p.numel()]).max()

    def check_norm_value(self, value: float, scaled: Callable[[], torch.Tensor]) -> None:
        """Raise if the user's ``norm`` returned ``value`` < 0, or NaN for a finite input ``scaled()``.

        ``value`` is the norm already read on the host; ``scaled`` is evaluated
        (one more host read) only when ``value`` is NaN, to tell a broken norm from
        a solution that became inf/NaN (which the march reports itself).
        """
        if self.norm is None or value >= 0.0:
            return
        if value < 0.0:
            raise ValueError(f"options['norm'] returned {value:.6g}; a norm is never negative (wrap it in abs(), or "
                             "return e.g. e.abs().max() or e.pow(2).mean().sqrt())")
        if bool(torch.isfinite(scaled()).all()):
            raise ValueError("options['norm'] returned NaN for a finite scaled error; check it on a finite tensor (a "
                             "0/0 or sqrt of a negative number inside it), or drop it to use the RMS norm")

    def error_ratio(self, err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
        """``norm(err / tol)``, a 0-dim tensor in the state's dtype."""
        return self.apply_norm(err / self.scale(y0, y1))

    def noisy_error_ratios(
        self, err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """``[norm(err / tol), norm(noise / tol)]`` as one ``(2,)`` tensor (one host read for both).

        ``noise`` is the per-element size of the rounding noise in ``err``
        (:meth:`RoundoffNoise.size`): the second entry is the ratio an estimate made
        of rounding alone would reach, in the same weighted norm as the first.
        """
        scale = self.scale(y0, y1)
        return torch.stack([self.apply_norm(err / scale), self.apply_norm(noise / scale)])


class RoundoffNoise:
    """The rounding noise of an embedded error estimate whose stages carry a relative error ``u``, and the test
    that keeps it from rejecting steps.

    A stage ``k_i`` evaluated in a precision with unit roundoff ``u`` (bfloat16
    ``2^-8``, float16 ``2^-11``) is off by about ``u |k_i|`` per element, and these
    errors do not cancel in ``e = h sum_i b_err_i k_i`` the way the stages' smooth
    part does (the weights ``b_err`` sum to zero).  The estimate therefore carries
    noise bounded by about ``N = u |h| sum_i |b_err_i| |k_i|`` per element
    (:meth:`size`): it scales with the step and the stages, not with the solution,
    so a tolerance below it cannot be met by shrinking the step.

    :meth:`judge` turns the two tolerance-weighted norms ``plain = norm(e / tol)``
    and ``floor = norm(N / tol)`` into the ratio that decides the step and feeds the
    controller (accept when ``<= 1``)::

        truncation = sqrt(max(plain^2 - (EXPECTED * floor)^2, 0))   # the estimate less its expected noise
        ratio      = truncation / max(1, floor)                      # against tol, or the noise where larger

    so a step whose estimate is below the tolerance (``plain <= 1``) or within its
    noise bound (``plain <= floor``) is accepted, the noise never makes the
    controller shrink a step, and where the bound exceeds the tolerance the
    controller aims at a truncation error at the noise level instead of chasing
    the noise.  Without noise (``floor = 0``) the ratio is ``plain``: torchdiffeq's.
    """

    #: the noise of a pure-noise estimate relative to the bound ``N`` (RMS norms): measured 0.2 to 0.7 for tanh
    #: MLP, linear and hypernetwork (CNF) fields under bfloat16/float16 with dopri5; half of the bound is removed
    EXPECTED = 0.5

    def __init__(self, unit_roundoff: float, b_err: Any) -> None:
        if not unit_roundoff > 0:
            raise ValueError(f"unit_roundoff must be positive, got {unit_roundoff}")
        self.unit_roundoff = float(unit_roundoff)
        self.weights = [abs(float(w)) for w in b_err]
        if not any(self.weights):
            raise ValueError("b_err has no non-zero weight: the tableau has no error estimate")

    def size(self, h: float, ks: Any) -> torch.Tensor:
        """The per-element bound ``u |h| sum_i |b_err_i| |k_i|`` of the estimate's noise, in the stages' dtype."""
        (w0, k0), *rest = [(w, k) for w, k in zip(self.weights, ks) if w != 0.0]
        out = k0.abs() * w0
        for w, k in rest:
            out = out.add(k.abs(), alpha=w)
        return out * (self.unit_roundoff * abs(h))

    def judge(self, plain: float, floor: float) -> tuple[float, bool]:
        """``(ratio, on_noise)``: the ratio that decides the step and feeds the controller, and whether the step is
        accepted only because of the noise (``plain > 1 >= ratio``)."""
        truncation = math.sqrt(max(plain * plain - (self.EXPECTED * floor) ** 2, 0.0))
        ratio = truncation / max(1.0, floor)
        return ratio, plain > 1.0 >= ratio

    def __repr__(self) -> str:
        return f"RoundoffNoise(unit_roundoff={self.unit_roundoff:g})"


def _refuse_zero_tolerances(rtol: float | torch.Tensor, atol: float | torch.Tensor) -> None:
    """Raise if some element has ``rtol == atol == 0``: its error would have to be exactly 0 for any step to pass."""
    both = (torch.as_tensor(rtol) == 0) & (torch.as_tensor(atol) == 0)
    if bool(both.any()):
        if both.dim() == 0:
            raise ValueError("rtol and atol are both zero, so no step can be accepted; give a positive rtol or atol")
        raise ValueError(f"rtol and atol are both zero for {int(both.sum())} of {both.numel()} state elements, so no "
                         "step can be accepted there; give every element a positive rtol or atol")


def _on_state(value: float | torch.Tensor, layout: FlatState) -> float | torch.Tensor:
    return value if isinstance(value, float) else value.to(device=layout.device, dtype=layout.dtype)


def _flat_tolerance(name: str, value: Any, layout: FlatState) -> float | torch.Tensor:
    """A tolerance as a float, or as a ``(D,)`` tensor in the state's dtype for per-element values."""
    if layout.is_tuple and isinstance(value, (tuple, list)):
        if len(value) != len(layout.shapes):
            raise ValueError(f"{name} is a tuple of {len(value)} but y0 has {len(layout.shapes)} parts; give one tolerance per part")
        parts = [_part_tolerance(name, v, shape) for v, shape in zip(value, layout.shapes)]
        return torch.cat(parts)
    if isinstance(value, torch.Tensor) and value.numel() > 1:
        if layout.is_tuple:
            raise ValueError(f"{name} for a tuple y0 must be a number or a tuple with one tolerance per part")
        return _part_tolerance(name, value, layout.shapes[0])
    number = float(value.detach().reshape(()).item()) if isinstance(value, torch.Tensor) else value
    _check_tolerance_values(name, value, number)
    return float(number)


def _part_tolerance(name: str, value: Any, shape: torch.Size) -> torch.Tensor:
    if isinstance(value, torch.Tensor) and value.requires_grad:
        raise ValueError(f"{name} must not require grad (tolerances are not differentiated); pass {name}.detach()")
    tensor = torch.as_tensor(value, dtype=torch.float64)
    _check_tolerance_values(name, value, tensor)
    try:
        return tensor.expand(shape).reshape(-1)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(tensor.shape)} does not broadcast to the state's shape {tuple(shape)}") from None


def _check_tolerance_values(name: str, raw: Any, value: Any) -> None:
    if isinstance(raw, torch.Tensor) and raw.requires_grad:
        raise ValueError(f"{name} must not require grad (tolerances are not differentiated); pass {name}.detach()")
    if isinstance(raw, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a non-negative number or tensor, got {raw!r}")
    bad = (value < 0) | ~torch.isfinite(torch.as_tensor(value)) if isinstance(value, torch.Tensor) else not (
        0 <= value < math.inf
    )
    if bool(bad.any()) if isinstance(bad, torch.Tensor) else bad:
        raise ValueError(f"{name} must be non-negative and finite, got {raw!r}")


def initial_step(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    t0: float,
    direction: float,
    y0: torch.Tensor,
    f0: torch.Tensor,
    order: int,
    tol: Tolerance,
    time_dtype: torch.dtype,
) -> float:
    """Hairer's starting step (Solving ODEs I, II.4), as torchdiffeq applies it; one extra evaluation.

    ``d0 = ||y0/s||``, ``d1 = ||f0/s||`` with ``s = atol + rtol |y0|``;
    ``h0 = 0.01 d0/d1`` (``1e-6`` if either is below ``1e-5``); an Euler step to
    ``y1 = y0 + h0 f0`` gives ``d2 = ||(f(t0 + h0, y1) - f0)/s|| / h0``;
    ``h1 = (0.01 / max(d1, d2))^(1/p)`` (``max(1e-6, 1e-3 h0)`` if both are
    ``<= 1e-15``); the result is ``min(100 h0, h1)``.
    """
    scale = tol.atol + tol.rtol * y0.abs()
    d = torch.stack([tol.apply_norm(y0 / scale), tol.apply_norm(f0 / scale)]).abs().tolist()
    d0, d1 = d
    tol.check_norm_value(d0, lambda: y0 / scale)
    tol.check_norm_value(d1, lambda: f0 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = float(torch.tensor(h0, dtype=y0.dtype))  # torchdiffeq forms h0 in the state's dtype
    y1 = torch.add(y0, f0, alpha=direction * h0)  # the Euler probe goes the way time goes
    t1 = torch.tensor(t0 + direction * h0, dtype=time_dtype, device=y0.device)
    slope_change = (f(t1, y1) - f0) / scale
    d2 = float(tol.apply_norm(slope_change).abs()) / h0
    tol.check_norm_value(d2, lambda: slope_change)
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / order)
    return min(100 * h0, h1)
