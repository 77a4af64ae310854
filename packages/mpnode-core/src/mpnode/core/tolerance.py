"""Error control of adaptive steps: tolerances, the rounding noise of a low-precision field, the first step.

* [`Tolerance`][mpnode.core.tolerance.Tolerance] turns ``rtol``/``atol``/``norm`` into the error ratio (and checks
  the tolerances it is given: numbers, per-element tensors, one per part of a tuple state);
* [`RoundoffNoise`][mpnode.core.tolerance.RoundoffNoise] keeps the rounding noise of a bfloat16/float16 field from
  rejecting steps;
* [`initial_step`][mpnode.core.tolerance.initial_step] is Hairer's starting-step rule.

The step-size controllers that turn the ratio into the next step live in
[`mpnode.core.controllers`][mpnode.core.controllers].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .precision import FieldPrecision
from .state import FlatState
from .validation import check_number


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(mean(x^2))`` over all elements."""
    return x.abs().pow(2).mean().sqrt()


def scaled_rms_norm(x: torch.Tensor) -> torch.Tensor:
    """``rms_norm`` computed as ``m * rms(x / m)`` with ``m = max|x|``: no overflow of the squares (a scaled error
    of 1e20 in float32, from tolerances of 1e-20), at the cost of one more reduction; used when the plain one
    overflowed."""
    m = x.abs().amax().clamp_min(torch.finfo(x.dtype).tiny)
    return m * rms_norm(x / m)


class Tolerance:
    """``rtol``/``atol`` and the norm of the error ratio, on flat states.

    The ratio of an attempt is ``norm(e / tol)`` with ``e = h sum b_err_i k_i``
    and ``tol = atol + rtol * max(|y0|, |y1|)`` elementwise (torchdiffeq's rule),
    all in the state's dtype.  ``rtol``/``atol`` are numbers, tensors that
    broadcast to ``y0``'s shape (per-element tolerances), or for a tuple state a
    tuple of those.  ``norm`` receives the scaled error in the state's
    structure; the default is the RMS norm (the max of the parts' RMS norms for a
    tuple state, as torchdiffeq does).

    With stages evaluated in a lower precision than the state,
    [`noisy_error_ratios`][mpnode.core.tolerance.Tolerance.noisy_error_ratios] also weighs the estimate against its
    rounding noise ([`RoundoffNoise`][mpnode.core.tolerance.RoundoffNoise]).
    """

    def __init__(self, rtol: Any, atol: Any, layout: FlatState, norm: Callable | None = None) -> None:
        self.layout = layout
        rtol, atol = _flat_tolerance("rtol", rtol, layout), _flat_tolerance("atol", atol, layout)
        _refuse_zero_tolerances(rtol, atol)
        self.rtol, self.atol = _on_state(rtol, layout), _on_state(atol, layout)
        self.norm = norm  # checked with the other options (mpnode.core.options.AdaptiveOptions)

    def scale(self, y0: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
        return self.atol + self.rtol * torch.max(y0.abs(), y1.abs())

    def apply_norm(self, x: torch.Tensor, safe: bool = False) -> torch.Tensor:
        """The norm of a flat vector, in the user's structure (0 for an empty state: it has no error to control);
        ``safe``: the default norm without overflow ([`scaled_rms_norm`][mpnode.core.tolerance.scaled_rms_norm])."""
        if x.numel() == 0:
            return x.new_zeros(())
        if self.norm is None and self.layout.is_tuple:
            return self.part_norms(x, safe).max()
        if self.norm is not None:
            out = self.norm(self.layout.unflatten(x))
            if not isinstance(out, torch.Tensor):
                try:
                    out = torch.as_tensor(out, dtype=x.dtype, device=x.device)
                except (TypeError, ValueError, RuntimeError):
                    raise TypeError(f"options['norm'] must return a number or a 0-dim tensor, got {out!r}") from None
            if out.numel() != 1:
                raise TypeError(
                    f"options['norm'] returned a tensor of shape {tuple(out.shape)}; it must reduce the scaled error "
                    f"to one number (a 0-dim tensor), e.g. lambda e: e.abs().max()"
                )
            return out.reshape(())
        return scaled_rms_norm(x) if safe else rms_norm(x)

    def part_norms(self, x: torch.Tensor, safe: bool = False) -> torch.Tensor:
        """``(P,)``: with the default norm, the RMS norm of each non-empty part of a tuple state (their max is the
        solve's norm, torchdiffeq's); else the one norm of ``x``."""
        if self.norm is not None or not self.layout.is_tuple or x.numel() == 0:
            return self.apply_norm(x, safe).reshape(1)
        rms = scaled_rms_norm if safe else rms_norm
        return torch.stack([rms(p) for p in torch.split(x, list(self.layout.sizes)) if p.numel()])

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

    def error_ratio(self, err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, safe: bool = False) -> torch.Tensor:
        """``norm(err / tol)``, a 0-dim tensor in the state's dtype (``safe``: see ``apply_norm``)."""
        return self.apply_norm(err / self.scale(y0, y1), safe)

    def noisy_error_ratios(
        self, err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, noise: torch.Tensor, safe: bool = False
    ) -> torch.Tensor:
        """``[norms(err / tol), norms(noise / tol)]`` as one ``(2, P)`` tensor (one host read for all), with
        ``norms`` = [`part_norms`][mpnode.core.tolerance.Tolerance.part_norms]: per part of a tuple state under the
        default norm (each part is judged against its own noise), else ``P = 1``.

        ``noise`` is the per-element size of the rounding noise in ``err``
        ([`RoundoffNoise.size`][mpnode.core.tolerance.RoundoffNoise.size]): the second row is the ratio an estimate
        made of rounding alone would reach, in the same weighted norm as the first.
        """
        scale = self.scale(y0, y1)
        return torch.stack([self.part_norms(err / scale, safe), self.part_norms(noise / scale, safe)])


class RoundoffNoise:
    """The rounding noise of an embedded error estimate whose stages carry a relative error ``u``, and the test
    that keeps it from rejecting steps.

    A stage ``k_i`` evaluated in a precision with unit roundoff ``u`` (bfloat16
    ``2^-8``, float16 ``2^-11``) is off by about ``u |k_i|`` per element, and these
    errors do not cancel in ``e = h sum_i b_err_i k_i`` the way the stages' smooth
    part does (the weights ``b_err`` sum to zero).  The estimate therefore carries
    noise bounded by about ``N = u |h| sum_i |b_err_i| |k_i|`` per element
    ([`size`][mpnode.core.tolerance.RoundoffNoise.size]): it scales with the step and the stages, not with the solution,
    so a tolerance below it cannot be met by shrinking the step.  ``u`` is a number, or a per-element ``(D,)`` tensor
    when the parts of a tuple state run in different precisions
    ([`for_field`][mpnode.core.tolerance.RoundoffNoise.for_field]; 0 where a part is as precise as the state).

    [`judge`][mpnode.core.tolerance.RoundoffNoise.judge] turns the two tolerance-weighted norms ``plain = norm(e /
    tol)`` and ``floor = norm(N / tol)`` into the ratio that decides the step and feeds the controller (accept when ``<=
    1``)::

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

    def __init__(self, unit_roundoff: float | torch.Tensor, b_err: Any) -> None:
        if isinstance(unit_roundoff, torch.Tensor):
            if not (bool((unit_roundoff >= 0).all()) and bool((unit_roundoff > 0).any())):
                raise ValueError("a per-element unit_roundoff must be >= 0 everywhere and positive somewhere")
            self.unit_roundoff: float | torch.Tensor = unit_roundoff
        elif not unit_roundoff > 0:
            raise ValueError(f"unit_roundoff must be positive, got {unit_roundoff}")
        else:
            self.unit_roundoff = float(unit_roundoff)
        self.weights = [abs(float(w)) for w in b_err]
        if not any(self.weights):
            raise ValueError("b_err has no non-zero weight: the tableau has no error estimate")

    @classmethod
    def for_field(cls, precision: FieldPrecision, layout: FlatState, b_err: Any) -> RoundoffNoise | None:
        """The noise of a field whose output parts carry ``precision`` (found on its first evaluation), on states of
        ``layout``; ``None`` when every part is as precise as the state (then the ratio is torchdiffeq's)."""
        parts = precision.roundoff(layout.dtype)
        if not any(parts):
            return None
        if len(set(parts)) == 1:
            return cls(parts[0], b_err)
        per_part = torch.tensor(parts, dtype=layout.dtype)
        sizes = torch.tensor(layout.sizes)
        return cls(per_part.repeat_interleave(sizes).to(layout.device), b_err)

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

    def judge_parts(self, plains: Sequence[float], floors: Sequence[float]) -> tuple[float, bool]:
        """[`judge`][mpnode.core.tolerance.RoundoffNoise.judge] per part (the rows of
        [`Tolerance.noisy_error_ratios`][mpnode.core.tolerance.Tolerance.noisy_error_ratios]): the largest ratio, and
        whether the step passes only because of some part's noise.  A part without noise (``floor = 0``) is judged as
        torchdiffeq judges it, whatever the other parts' noise."""
        ratio = max(self.judge(p, f)[0] for p, f in zip(plains, floors))
        return ratio, max(plains) > 1.0 >= ratio

    def __repr__(self) -> str:
        u = self.unit_roundoff
        return f"RoundoffNoise(unit_roundoff={float(u.max()) if isinstance(u, torch.Tensor) else u:g})"


def _refuse_zero_tolerances(rtol: float | torch.Tensor, atol: float | torch.Tensor) -> None:
    """Raise if some element has ``rtol == atol == 0``: its error would have to be exactly 0 for any step to pass."""
    both = (torch.as_tensor(rtol) == 0) & (torch.as_tensor(atol) == 0)
    if bool(both.any()):
        if both.dim() == 0:
            raise ValueError("rtol and atol are both zero, so no step can be accepted; give a positive rtol or atol")
        raise ValueError(f"rtol and atol are both zero for {int(both.sum())} of {both.numel()} state elements, so no "
                         "step can be accepted there; give every element a positive rtol or atol")


def _on_state(value: float | torch.Tensor, layout: FlatState) -> float | torch.Tensor:
    return value.to(device=layout.device, dtype=layout.dtype) if isinstance(value, torch.Tensor) else value


def _flat_tolerance(name: str, value: Any, layout: FlatState) -> float | torch.Tensor:
    """A tolerance as a float, or as a ``(D,)`` tensor in the state's dtype for per-element values."""
    if layout.is_tuple and isinstance(value, (tuple, list)):
        if len(value) != len(layout.shapes):
            raise ValueError(f"{name} is a tuple of {len(value)} but y0 has {len(layout.shapes)} parts; "
                             "give one tolerance per part")
        parts = [_part_tolerance(name, v, shape) for v, shape in zip(value, layout.shapes)]
        return torch.cat(parts)
    if isinstance(value, torch.Tensor) and value.numel() > 1:
        if layout.is_tuple:
            raise ValueError(f"{name} for a tuple y0 must be a number or a tuple with one tolerance per part")
        return _part_tolerance(name, value, layout.shapes[0])
    _refuse_grad(name, value)
    return check_number(name, value, positive=False)


def _part_tolerance(name: str, value: Any, shape: torch.Size) -> torch.Tensor:
    """One part's tolerance as a flat float64 tensor: a number or a tensor broadcasting to the part's shape."""
    _refuse_grad(name, value)
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a non-negative number or tensor, got {value!r}")
    tensor = torch.as_tensor(value, dtype=torch.float64)
    if bool(((tensor < 0) | ~torch.isfinite(tensor)).any()):
        raise ValueError(f"{name} must be non-negative and finite, got {value!r}")
    try:
        return tensor.expand(shape).reshape(-1)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(tensor.shape)} does not broadcast to the state's shape "
                         f"{tuple(shape)}") from None


def _refuse_grad(name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor) and value.requires_grad:
        raise ValueError(f"{name} must not require grad (tolerances are not differentiated); pass {name}.detach()")


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
    d0, d1 = _norms(tol, [y0, f0], scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = float(torch.tensor(h0, dtype=y0.dtype))  # torchdiffeq forms h0 in the state's dtype
    y1 = torch.add(y0, f0, alpha=direction * h0)  # the Euler probe goes the way time goes
    t1 = torch.tensor(t0 + direction * h0, dtype=time_dtype, device=y0.device)
    (d2,) = _norms(tol, [f(t1, y1) - f0], scale)
    d2 /= h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / order)
    return min(100 * h0, h1)


def _norms(tol: Tolerance, xs: Sequence[torch.Tensor], scale: torch.Tensor) -> list[float]:
    """``|norm(x / scale)|`` of each vector (one host read).  Recomputed without overflow when a tolerance so small
    that the squares overflow (1e-20 in float32) made one infinite; refused when ``x / scale`` itself overflows for
    a finite ``x`` (tolerances near the dtype's smallest numbers)."""
    scaled = [x / scale for x in xs]
    out = torch.stack([tol.apply_norm(x) for x in scaled]).abs().tolist()
    for value, x in zip(out, scaled):
        tol.check_norm_value(value, lambda x=x: x)
    if all(math.isfinite(v) for v in out) or tol.norm is not None:
        return out
    out = torch.stack([tol.apply_norm(x, safe=True) for x in scaled]).abs().tolist()
    if not all(math.isfinite(v) for v in out) and all(bool(torch.isfinite(x).all()) for x in xs):
        raise ValueError(f"odeint: rtol/atol are too small for the state's {scale.dtype}: the scaled state "
                         "y / (atol + rtol |y|) overflows it; give tolerances above 1e-30, or a float64 state")
    return out
