"""Adaptive steps under autocast: the precision policy, the tolerance floor, bounded work, the accuracy targets."""

from __future__ import annotations

import warnings

import pytest
import torch

from mpnode.core import MixedPrecisionToleranceWarning, SolverStats, odeint
from mpnode.core.controllers import Tolerance
from mpnode.core.testing import LinearField, LinearODE, MLPField

LOW = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TARGET_TOL = {"bfloat16": 1e-2, "float16": 1e-3}


def _gained_mlp(gain: float = 2.0, seed: int = 1) -> MLPField:
    torch.manual_seed(seed)
    return MLPField(dim=8, width=32, gain=gain)


LINEAR = LinearODE.random(dim=8, batch=4, seed=0)  # y' = A y; its y0 serves the MLP field too


def _linear_field() -> LinearField:
    return LinearField(LINEAR.A)


def _y0() -> torch.Tensor:
    return LINEAR.y0


def _grad_and_steps(field, y0, T, dtype, amp_dtype, tol, device):
    f = field.to(device=device, dtype=dtype)
    y = y0.to(device=device, dtype=dtype)
    stats = SolverStats()
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else torch.autocast(device.type, enabled=False)
    with ctx:
        out = odeint(f, y, torch.tensor([0.0, T], device=device, dtype=dtype), method="dopri5", rtol=tol, atol=tol,
                     options={"stats": stats})
        loss = 0.5 * out[-1].float().pow(2).sum()
    grads = torch.autograd.grad(loss, list(f.parameters()))
    return torch.cat([g.flatten() for g in grads]).double().cpu(), stats.steps


@pytest.mark.parametrize("problem", ["linear", "mlp"])
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_low_precision_gradient_within_3x_of_float32_with_at_most_1_5x_the_steps(precision, problem, device):
    field = _linear_field() if problem == "linear" else _gained_mlp().double()
    y0, T, tol = _y0(), 5.0, TARGET_TOL[precision]
    reference, _ = _grad_and_steps(field, y0, T, torch.float64, None, 1e-10, device)
    g32, steps32 = _grad_and_steps(field, y0, T, torch.float32, None, tol, device)
    low, steps_low = _grad_and_steps(field, y0, T, torch.float32, LOW[precision], tol, device)

    def err(g):
        return float((g - reference).norm() / reference.norm())

    assert err(low) <= 3 * err(g32), (err(low), err(g32))
    assert steps_low <= 1.5 * steps32, (steps_low, steps32)


def test_error_estimate_and_ratio_are_in_the_state_dtype(monkeypatch, device):
    seen = []
    original = Tolerance.error_ratio

    def spy(self, err, y0, y1, roundoff_size):
        ratio = original(self, err, y0, y1, roundoff_size)
        seen.append((err.dtype, y1.dtype, ratio.dtype))
        return ratio

    monkeypatch.setattr(Tolerance, "error_ratio", spy)
    field = _gained_mlp().to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        odeint(field, _y0().float().to(device), torch.tensor([0.0, 1.0], device=device), rtol=1e-2, atol=1e-2)
    assert seen and all(d == (torch.float32,) * 3 for d in seen)


def test_times_stay_float64_and_the_field_sees_the_state_dtype(device):
    seen_field, seen_callback = set(), set()

    class Field(MLPField):
        def __init__(self):
            super().__init__(dim=8, width=32)

        def forward(self, t, y):
            seen_field.add(t.dtype)
            return super().forward(t, y)

        def callback_step(self, t0, y0, dt):
            seen_callback.add((t0.dtype, dt.dtype))

    with torch.autocast(device.type, dtype=torch.bfloat16):
        odeint(Field().to(device), _y0().float().to(device), torch.tensor([0.0, 1.0], device=device), rtol=1e-2, atol=1e-2)
    assert seen_field == {torch.float32} and seen_callback == {(torch.float64, torch.float64)}


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_tolerances_below_the_floor_warn_once_and_do_not_collapse_the_step(precision, device):
    field = _gained_mlp().to(device)
    y0 = _y0().float().to(device)
    t = torch.tensor([0.0, 5.0], device=device)
    floor = torch.finfo(LOW[precision]).eps / 2
    at_floor = SolverStats()
    with torch.autocast(device.type, dtype=LOW[precision]):
        odeint(field, y0, t, rtol=floor, atol=floor, options={"stats": at_floor})
        tight = SolverStats()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            odeint(field, y0, t, rtol=1e-9, atol=1e-12, options={"stats": tight})
    messages = [w for w in caught if issubclass(w.category, MixedPrecisionToleranceWarning)]
    assert len(messages) == 1 and "rtol" in str(messages[0].message) and str(LOW[precision]) in str(messages[0].message)
    # rtol is raised to the floor; the tiny atol adds at most a few steps near small components
    assert tight.steps <= 2 * at_floor.steps + 5 and tight.rejected_steps <= 5


def test_a_blow_up_raises_instead_of_looping(device):
    def exploding(t, y):
        return torch.where(t > 0.5, torch.full_like(y, float("nan")), -y)

    with pytest.raises(FloatingPointError, match="inf/NaN"):
        odeint(exploding, torch.ones(3, device=device), torch.tensor([0.0, 1.0], device=device))


def test_zero_tolerances_are_refused_at_the_call(device):
    with pytest.raises(ValueError, match="rtol and atol are both zero"):
        odeint(lambda t, y: -y, torch.ones(2, device=device), torch.tensor([0.0, 1.0], device=device), rtol=0.0, atol=0.0)
