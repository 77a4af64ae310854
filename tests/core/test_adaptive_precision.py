"""Adaptive steps under autocast: what the field ran in decides the policy, the rounding-noise acceptance test,
its accuracy and work against torchdiffeq under the same autocast, bounded work.

The problems are those of ``examples/adaptive_precision.py`` (which also measures rtol 1e-7 against
torchdiffeq and the CNF): a decaying linear system, the same with samples at 1e3 and 1e-3, a tanh MLP field.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

torchdiffeq = pytest.importorskip("torchdiffeq")

from mpnode.core import (  # noqa: E402
    AutoAdjoint,
    MixedPrecisionToleranceWarning,
    RecomputeAdjoint,
    SegmentedAdjoint,
    SolverStats,
    odeint,
)
from mpnode.core.methods import get_tableau  # noqa: E402
from mpnode.core.precision import FieldPrecision, field_roundoff, unit_roundoff  # noqa: E402
from mpnode.core.state import FlatState, FlatVectorField  # noqa: E402
from mpnode.core.testing import LinearField, LinearODE, MLPField  # noqa: E402
from mpnode.core.tolerance import RoundoffNoise, Tolerance  # noqa: E402

LOW = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _problem(name: str):
    """``(field, y0, T, exact)`` in float64; ``exact`` holds y(T) and dL/dθ for the linear systems, else ``None``."""
    if name in ("decay", "decay-mixed"):
        ode = LinearODE.decaying(seed=0, scales=(1e3, 1e-3) if name == "decay-mixed" else None)
        ex = ode.exact()
        return LinearField(ode.A), ode.y0, ode.T, (ex["yT"].reshape(-1), ex["dA"].reshape(-1))
    g = torch.Generator().manual_seed(0)
    y0 = torch.randn(4, 8, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    return MLPField(dim=8, width=32, gain=2.0).double(), y0, 5.0, None


def _solve(name, field, y0, T, precision, tol, device, solver="mpnode", options=None, method="dopri5"):
    """y(T) and dL/dθ (``L = 1/2 ||y(T)||^2``) as flat float64 vectors, and mpnode's stats."""
    dtype = torch.float64 if precision == "float64" else torch.float32
    f = field.to(device=device, dtype=dtype)
    y = y0.to(device=device, dtype=dtype)
    t = torch.tensor([0.0, T], device=device, dtype=dtype)
    stats = SolverStats()
    amp = LOW.get(precision)
    ctx = torch.autocast(device.type, dtype=amp, cache_enabled=solver != "torchdiffeq-nocache") if amp else \
        torch.autocast(device.type, enabled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixedPrecisionToleranceWarning)
        with ctx:
            if solver == "mpnode":
                out = odeint(f, y, t, method=method, rtol=tol, atol=tol, options={"stats": stats, **(options or {})})
            else:
                out = torchdiffeq.odeint(f, y, t, method="dopri5", rtol=tol, atol=tol)
            loss = 0.5 * out[-1].float().pow(2).sum()
    grads = torch.autograd.grad(loss, list(f.parameters()))
    return out[-1].detach().double().cpu().reshape(-1), torch.cat([g.reshape(-1) for g in grads]).double().cpu(), stats


def _reference(name, device):
    field, y0, T, exact = _problem(name)
    if exact is not None:
        return exact
    y, g, _ = _solve(name, field, y0, T, "float64", 1e-12, device)
    return y, g


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# Measured (CPU, torch 2.14.1): mpnode's y(T) error / torchdiffeq-nocache's, dL/dθ error / torchdiffeq-nocache's,
# accepted steps / float32's:
#   rtol  problem       bfloat16            float16
#   1e-3  decay         1.08 0.28  1.00     1.27 0.65  1.00
#   1e-3  decay-mixed   1.01 1.29  1.08     0.66 0.69  1.00
#   1e-3  mlp           0.81 0.72  1.00     1.13 0.68  1.00
#   1e-5  decay         0.69 0.61  0.87     0.62 0.01  1.00   (torchdiffeq's float16 gradient underflows)
#   1e-5  decay-mixed   1.44 2.00  0.62     1.11 1.07  0.93
#   1e-5  mlp           0.94 0.81  0.73     0.77 0.68  1.00
# Asserted: step ratio <= 1.25 (the target), error ratios <= 2.5: the target is 2, met in every row but one at 2.00
# (decay-mixed, bfloat16, 1e-5).  Over six seeds of these problems the error ratios have median 1.07; 6 % of them
# exceed 2 (at most 7), mostly at rtol 1e-3, where mpnode takes float32's steps and torchdiffeq more (the field's
# rounding inflates its error estimate), so the per-row ratio is partly luck of step placement.
@pytest.mark.parametrize("problem", ["decay", "decay-mixed", "mlp"])
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_as_accurate_as_torchdiffeq_without_the_cast_cache_in_at_most_1_25x_float32s_steps(precision, problem, device):
    field, y0, T, _ = _problem(problem)
    y_ref, g_ref = _reference(problem, device)
    for tol in (1e-3, 1e-5):
        _, _, f32 = _solve(problem, field, y0, T, "float32", tol, device)
        y_td, g_td, _ = _solve(problem, field, y0, T, precision, tol, device, solver="torchdiffeq-nocache")
        y_mp, g_mp, mp = _solve(problem, field, y0, T, precision, tol, device)
        ratios = (_rel(y_mp, y_ref) / _rel(y_td, y_ref), _rel(g_mp, g_ref) / _rel(g_td, g_ref), mp.steps / f32.steps)
        assert ratios[0] <= 2.5 and ratios[1] <= 2.5 and ratios[2] <= 1.25, (tol, ratios)


# At rtol = atol = 1e-7 the field's rounding dominates: torchdiffeq chases it (examples/adaptive_precision.py: 158 to
# 3,648 steps here, up to a minute on one core, too slow for a unit test) and reaches the dtype's floor, the error of
# a fine fixed grid in the same dtype (there torchdiffeq-nocache's errors are 0.88-1.2x that floor, except its
# float16 gradients, which underflow).  Measured: mpnode's errors / the floor (y(T), dL/dθ), accepted steps (float32's):
#   decay        bfloat16 1.07 1.02  16 (33)    float16 1.44 1.33  22 (33)
#   decay-mixed  bfloat16 1.04 1.01  19 (69)    float16 1.15 1.14  28 (69)
#   mlp          bfloat16 1.52 1.65   9 (25)    float16 1.13 1.04  12 (25)
# Asserted: errors <= 2x the floor, steps <= 1.25x float32's.
@pytest.mark.parametrize("problem", ["decay", "decay-mixed", "mlp"])
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_tight_tolerances_reach_the_dtypes_floor_in_fewer_steps_than_float32(precision, problem, device):
    field, y0, T, _ = _problem(problem)
    y_ref, g_ref = _reference(problem, device)
    y_fl, g_fl, _ = _solve(problem, field, y0, T, precision, None, device, options={"step_size": T / 256},
                           method=get_tableau("dopri5").fixed_grid())
    _, _, f32 = _solve(problem, field, y0, T, "float32", 1e-7, device)
    y_mp, g_mp, mp = _solve(problem, field, y0, T, precision, 1e-7, device)
    ratios = (_rel(y_mp, y_ref) / _rel(y_fl, y_ref), _rel(g_mp, g_ref) / _rel(g_fl, g_ref))
    assert ratios[0] <= 2 and ratios[1] <= 2, ratios
    assert mp.steps <= 1.25 * f32.steps and mp.noise_accepted_steps > 0, (mp, f32.steps)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_tolerances_far_below_the_noise_neither_collapse_the_step_nor_loop(precision, device):
    """rtol = atol = 1e-12, measured: 9 steps and 6 rejections in bfloat16, 13 and 5 in float16 (at 1e-7: 9 and 3,
    12 and 8), every step accepted on the noise criterion; y(T) as accurate as at 1e-7."""
    field, y0, T, _ = _problem("mlp")
    y_ref, _ = _reference("mlp", device)
    y_7, _, at_7 = _solve("mlp", field, y0, T, precision, 1e-7, device)
    y_12, _, tight = _solve("mlp", field, y0, T, precision, 1e-12, device)
    assert tight.steps <= 2 * at_7.steps and tight.rejected_steps <= tight.steps, (tight, at_7)
    assert tight.noise_accepted_steps >= tight.steps - 2
    assert _rel(y_12, y_ref) <= 2 * _rel(y_7, y_ref)


class NoisyField(torch.nn.Module):
    """``-y`` plus a deterministic, non-smooth perturbation of relative size ``level`` (rounding-like noise),
    returned in ``dtype`` (so the solver sees a low-precision field)."""

    def __init__(self, level: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.level, self.dtype = level, dtype

    def forward(self, t, y):
        f = -y
        wiggle = torch.sin(1e5 * y + 1e4 * t)  # changes sign many times within any step the solver takes
        return (f * (1 + self.level * wiggle)).to(self.dtype)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_a_noisy_field_stays_within_a_fixed_budget_of_evaluations(precision, device):
    """Noise at the dtype's unit roundoff u, rtol = atol = 1e-7 over [0, 5]: mpnode 92 (bfloat16) / 98 (float16)
    evaluations, y(T) within 1.3u / 0.6u; torchdiffeq 11,312 / 1,598 (it shrinks the step until the noise is below
    the tolerance).  Noise several times u (beyond the dtype's rounding) is chased like torchdiffeq does:
    ``max_num_steps`` bounds that."""
    dtype = LOW[precision]
    field = NoisyField(unit_roundoff(dtype), dtype)
    y0 = torch.linspace(0.5, 2.0, 16, device=device)
    t = torch.tensor([0.0, 5.0], device=device)
    stats = SolverStats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixedPrecisionToleranceWarning)
        out = odeint(field, y0, t, rtol=1e-7, atol=1e-7, options={"stats": stats, "max_num_steps": 500})
    assert stats.nfe_forward <= 200 and stats.noise_accepted_steps > 0, stats
    exact = y0 * math.exp(-5.0)
    assert _rel(out[-1].double(), exact.double()) < 3 * unit_roundoff(dtype)
    calls = [0]

    def counted(t, y):
        calls[0] += 1
        if calls[0] > 1000:
            raise RuntimeError("budget exhausted")
        return field(t, y).to(y.dtype)

    with pytest.raises(RuntimeError, match="budget exhausted"):
        torchdiffeq.odeint(counted, y0, t, rtol=1e-7, atol=1e-7)


# -- what the field ran in decides -------------------------------------------------------------------


def test_field_roundoff_is_that_of_the_fields_output_when_coarser_than_the_state():
    assert field_roundoff(torch.bfloat16, torch.float32) == 2.0**-8
    assert field_roundoff(torch.float16, torch.float32) == 2.0**-11
    assert field_roundoff(torch.float32, torch.float64) == 2.0**-24
    for same in ((torch.float32, torch.float32), (torch.float64, torch.float64), (None, torch.float32)):
        assert field_roundoff(*same) == 0.0


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_a_float64_solve_inside_autocast_is_exactly_the_float64_solve(precision, device):
    """Autocast never lowers float64: no noise policy, no warning, the same numbers as without autocast."""
    field, y0, T, _ = _problem("mlp")
    plain_y, plain_g, plain = _solve("mlp", field, y0, T, "float64", 1e-10, device)
    field, y0, T, _ = _problem("mlp")
    f = field.to(device)
    t = torch.tensor([0.0, T], device=device, dtype=torch.float64)
    stats = SolverStats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast(device.type, dtype=LOW[precision]):
            out = odeint(f, y0.to(device), t, method="dopri5", rtol=1e-10, atol=1e-10, options={"stats": stats})
            loss = 0.5 * out[-1].float().pow(2).sum()
    grads = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(f.parameters()))]).double().cpu()
    assert torch.equal(out[-1].reshape(-1).cpu(), plain_y) and torch.equal(grads, plain_g)
    assert stats.as_dict() == plain.as_dict() and stats.noise_accepted_steps == 0


def test_a_field_autocast_does_not_lower_keeps_float32_behaviour(device):
    """Elementwise ops stay float32 under autocast: same steps and numbers as without it, no warning."""
    rate = torch.linspace(0.5, 3.0, 6, device=device)

    def field(t, y):
        return -rate * y * torch.cos(t)

    y0 = torch.ones(6, device=device)
    t = torch.tensor([0.0, 4.0], device=device)
    plain, under = SolverStats(), SolverStats()
    expected = odeint(field, y0, t, rtol=1e-9, atol=1e-9, options={"stats": plain})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast(device.type, dtype=torch.bfloat16):
            got = odeint(field, y0, t, rtol=1e-9, atol=1e-9, options={"stats": under})
    assert torch.equal(got, expected) and under.as_dict() == plain.as_dict()


# -- the noise test ----------------------------------------------------------------------------------


def test_roundoff_noise_size_is_u_h_sum_of_abs_b_err_times_abs_stages():
    tab = get_tableau("dopri5")
    ks = [torch.randn(5, dtype=torch.float64) for _ in tab.b_err]
    noise = RoundoffNoise(2.0**-8, tab.b_err)
    expected = sum(abs(w) * k.abs() for w, k in zip(tab.b_err, ks)) * 2.0**-8 * 0.25
    torch.testing.assert_close(noise.size(-0.25, ks), expected)


@pytest.mark.parametrize(
    "plain, floor, accept, on_noise",
    [
        (0.7, 0.0, True, False),  # no noise: torchdiffeq's ratio
        (1.3, 0.0, False, False),
        (0.9, 0.3, True, False),  # below tolerance
        (1.5, 0.2, False, False),  # above tolerance, noise too small to explain it
        (30.0, 40.0, True, True),  # within the noise (far above tolerance)
        (40.0, 40.0, True, True),  # at the noise bound
        (45.0, 40.0, False, False),  # above it
    ],
)
def test_roundoff_noise_judge(plain, floor, accept, on_noise):
    noise = RoundoffNoise(2.0**-8, get_tableau("dopri5").b_err)
    ratio, only_noise = noise.judge(plain, floor)
    assert (ratio <= 1.0) == accept and only_noise == on_noise
    if floor == 0.0:
        assert ratio == plain
    assert noise.judge(plain, floor * 0.5)[0] >= ratio  # less noise, less excuse: never a smaller ratio


def test_pure_noise_never_shrinks_the_step():
    """An estimate at half its noise bound gives ratio 0: the controller grows the step (factor ifactor)."""
    noise = RoundoffNoise(2.0**-11, get_tableau("dopri5").b_err)
    for floor in (0.01, 1.0, 100.0):
        assert noise.judge(0.5 * floor, floor)[0] == 0.0


def test_error_estimate_and_ratio_are_in_the_state_dtype(monkeypatch, device):
    seen = []
    original = Tolerance.noisy_error_ratios

    def spy(self, err, y0, y1, noise):
        ratios = original(self, err, y0, y1, noise)
        seen.append((err.dtype, y1.dtype, noise.dtype, ratios.dtype))
        return ratios

    monkeypatch.setattr(Tolerance, "noisy_error_ratios", spy)
    field, y0, _, _ = _problem("mlp")
    with torch.autocast(device.type, dtype=torch.bfloat16):
        odeint(field.float().to(device), y0.float().to(device), torch.tensor([0.0, 1.0], device=device), rtol=1e-2,
               atol=1e-2)
    assert seen and all(d == (torch.float32,) * 4 for d in seen)


# -- the warning and the counter ---------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_one_warning_once_per_call_site_only_when_steps_passed_on_noise(precision, device):
    field, y0, T, _ = _problem("mlp")
    f, y = field.float().to(device), y0.float().to(device)
    t = torch.tensor([0.0, T], device=device)
    loose, tight = SolverStats(), SolverStats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        with torch.autocast(device.type, dtype=LOW[precision]):
            odeint(f, y, t, rtol=1e-3, atol=1e-3, options={"stats": loose})
            for _ in range(2):
                odeint(f, y, t, rtol=1e-7, atol=1e-7, options={"stats": tight})
    assert loose.noise_accepted_steps == 0 and tight.noise_accepted_steps > 0
    messages = [w for w in caught if issubclass(w.category, MixedPrecisionToleranceWarning)]
    assert len(messages) == 1 and messages[0].filename == __file__, [str(w.message) for w in caught]
    text = str(messages[0].message)
    assert str(LOW[precision]) in text and "noise_accepted_steps" in text and "float32" in text


def test_float32_solves_count_no_noise_steps(device):
    field, y0, T, _ = _problem("mlp")
    stats = SolverStats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        odeint(field.float().to(device), y0.float().to(device), torch.tensor([0.0, T], device=device), rtol=1e-10,
               atol=1e-10, options={"stats": stats})
    assert stats.noise_accepted_steps == 0 and stats.steps > 0


# -- unchanged guarantees ----------------------------------------------------------------------------


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

    _, y0, _, _ = _problem("mlp")
    with torch.autocast(device.type, dtype=torch.bfloat16):
        odeint(Field().to(device), y0.float().to(device), torch.tensor([0.0, 1.0], device=device), rtol=1e-2, atol=1e-2)
    assert seen_field == {torch.float32} and seen_callback == {(torch.float64, torch.float64)}


def test_a_blow_up_raises_instead_of_looping(device):
    def exploding(t, y):
        return torch.where(t > 0.5, torch.full_like(y, float("nan")), -y)

    with pytest.raises(FloatingPointError, match="inf/NaN"):
        odeint(exploding, torch.ones(3, device=device), torch.tensor([0.0, 1.0], device=device))


def test_zero_tolerances_are_refused_at_the_call(device):
    with pytest.raises(ValueError, match="rtol and atol are both zero"):
        odeint(lambda t, y: -y, torch.ones(2, device=device), torch.tensor([0.0, 1.0], device=device), rtol=0.0,
               atol=0.0)


# -- what the field carries: rounding followed through its first evaluation ---------------------------------------


def _carried(func, y0, device, precision="bfloat16"):
    """The dtypes a field's first evaluation carries per output part (``FlatVectorField.precision``)."""
    layout = FlatState(y0)
    field = FlatVectorField(func, layout)
    with torch.autocast(device.type, dtype=LOW[precision]):
        field(torch.tensor(0.0, dtype=torch.float64, device=device), layout.flatten(y0))
    return field.precision.dtypes


def _net(device):
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(16, 4, generator=g).to(device), torch.randn(4, 16, generator=g).to(device)
    return lambda y: torch.tanh(y @ w1.T) @ w2.T


def test_rounding_is_followed_through_ops_that_promote_the_fields_output(device):
    """The issue of a float32 output: a bfloat16 matmul whose result a last op promotes to float32 still carries
    bfloat16 rounding (read from the output dtype alone it looked float32-accurate)."""
    net, y0 = _net(device), torch.randn(3, 4, device=device)
    gamma = torch.ones(4, device=device, requires_grad=True)
    promoted = {
        ".float()": lambda t, y: net(y).float(),
        "float32 scale": lambda t, y: gamma * net(y),
        "cat with float32": lambda t, y: torch.cat([net(y)[:, :3], torch.zeros_like(y[:, :1])], 1),
        "setitem": lambda t, y: _setitem(torch.zeros_like(y), net(y)),
        "autograd divergence": lambda t, y: _divergence(net, y).expand_as(y),
    }
    for name, func in promoted.items():
        assert _carried(func, y0, device) == (torch.bfloat16,), name
    exact = {
        "elementwise float32 ops": lambda t, y: -y * torch.cos(t),
        "zeros_like of a bfloat16 tensor": lambda t, y: torch.zeros_like(net(y), dtype=torch.float32) - y,
    }
    for name, func in exact.items():
        assert _carried(func, y0, device) == (torch.float32,), name
    assert _carried(lambda t, y: torch.tanh(y @ y.T) @ y, y0.double(), device) == (torch.float64,)


def test_an_addition_weighs_its_operands_noise_by_their_size(device):
    """A small bfloat16 correction added to a float32 model carries little noise; a cancellation is not modelled
    (it would raise the noise above the calibration of the bound: measured on the CNF, 3-5x torchdiffeq's errors)."""
    net, y0 = _net(device), torch.randn(3, 4, device=device)

    def noise(func):
        layout = FlatState(y0)
        field = FlatVectorField(func, layout)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            field(torch.tensor(0.0, dtype=torch.float64, device=device), layout.flatten(y0))
        return field.precision.noise[0] / unit_roundoff(torch.bfloat16)

    assert noise(lambda t, y: net(y).float()) == 1.0
    assert 1e-4 < noise(lambda t, y: -100.0 * y + net(y)) < 0.1
    assert noise(lambda t, y: (net(y) + 1000.0) - 1000.0) == 1.0


def _setitem(out, value):
    out[:, :3] = value[:, :3]
    return out


def _divergence(net, y):
    with torch.enable_grad():
        yi = y.detach().requires_grad_()
        (g,) = torch.autograd.grad(net(yi).sum(), yi)
    return g.float().sum(-1, keepdim=True)


def test_tuple_parts_carry_their_own_precision(device):
    net, y0 = _net(device), (torch.randn(3, 4, device=device), torch.randn(3, 2, device=device))
    assert _carried(lambda t, s: (net(s[0]), -s[1]), y0, device) == (torch.bfloat16, torch.float32)
    noise = RoundoffNoise.for_field(FieldPrecision((torch.bfloat16, torch.float32), (2.0**-8, 2.0**-24)),
                                    FlatState(y0), get_tableau("dopri5").b_err)
    assert torch.equal(noise.unit_roundoff.cpu(), torch.tensor([2.0**-8] * 12 + [0.0] * 6))


@pytest.mark.parametrize("last_op", ["float", "scale", "cat"])
def test_a_promoted_low_precision_field_is_not_chased_like_a_float32_one(last_op, device):
    """Measured (CPU, rtol = atol = 1e-7): bfloat16 field 14 steps; promoted to float32 by its last op, 2,345-2,484
    steps before (no noise acceptance: its output looked float32-accurate), 14 now."""
    torch.manual_seed(0)
    net = MLPField(dim=8, width=32, gain=2.0).to(device)
    gamma = torch.ones(8, device=device)
    last = {"float": lambda t, y: net(t, y).float(), "scale": lambda t, y: gamma * net(t, y),
            "cat": lambda t, y: torch.cat([net(t, y)[:, :7], torch.zeros_like(y[:, :1])], 1)}[last_op]
    y0, t = torch.randn(16, 8, device=device), torch.tensor([0.0, 5.0], device=device)
    plain, promoted = SolverStats(), SolverStats()
    with warnings.catch_warnings(), torch.autocast(device.type, dtype=torch.bfloat16):
        warnings.simplefilter("ignore", MixedPrecisionToleranceWarning)
        odeint(net, y0, t, rtol=1e-7, atol=1e-7, options={"stats": plain})
        odeint(last, y0, t, rtol=1e-7, atol=1e-7, options={"stats": promoted, "max_num_steps": 300})
    assert promoted.noise_accepted_steps > 0 and promoted.steps <= 1.5 * plain.steps, (promoted, plain)


def test_a_float32_part_of_a_tuple_state_is_solved_to_its_tolerance(device):
    """Part ``y`` runs in bfloat16, part ``z`` in float32 ops only.  Measured, z(T) relative error at rtol = atol =
    1e-6: torchdiffeq (no cast cache) 2.2e-06, mpnode 9.9e-06 before (bfloat16's noise bound applied to z too), 9.6e-08
    now (each part judged against its own noise)."""
    g = torch.Generator().manual_seed(0)
    w1, w2 = (torch.randn(16, 4, generator=g) * 0.1).to(device), (torch.randn(4, 16, generator=g) * 0.1).to(device)

    def f(t, s):
        y, z = s
        dy = torch.tanh(y @ w1.T.to(y.dtype)) @ w2.T.to(y.dtype)
        dz = torch.stack([7 * torch.cos(7 * t + z[:, 0]), -7 * torch.sin(7 * t) * z[:, 1]], 1)
        return dy, dz

    y0 = (torch.randn(8, 4, generator=g).to(device), torch.ones(8, 2, device=device))
    t = torch.tensor([0.0, 4.0], device=device)
    ref = odeint(f, tuple(a.double() for a in y0), t.double(), rtol=1e-12, atol=1e-12)[1][-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixedPrecisionToleranceWarning)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            z_mp = odeint(f, y0, t, rtol=1e-6, atol=1e-6)[1][-1]
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            z_td = torchdiffeq.odeint(f, y0, t, rtol=1e-6, atol=1e-6)[1][-1]
    assert _rel(z_mp.double(), ref) <= 2 * _rel(z_td.double(), ref)


def test_judge_parts_judges_each_part_against_its_own_noise():
    noise = RoundoffNoise(2.0**-8, get_tableau("dopri5").b_err)
    assert noise.judge_parts([30.0, 0.5], [40.0, 0.0]) == (noise.judge(30.0, 40.0)[0], True)  # noise in part 0
    ratio, _ = noise.judge_parts([0.5, 30.0], [40.0, 0.0])  # part 1 has no noise: its 30 is truncation
    assert ratio == 30.0


# -- checkpoints follow the field's precision -----------------------------------------------------------------


@pytest.mark.parametrize("adjoint", ["recompute", "segmented", "auto"])
@pytest.mark.parametrize("method, options", [("dopri5", {}), ("rk4", {"step_size": 0.05})])
def test_default_checkpoints_follow_the_precision_the_field_runs_in(method, options, adjoint, device):
    """A field autocast does not lower gets the no-autocast gradients exactly (float32 checkpoints); before,
    bfloat16 checkpoints made dL/dθ 35-225x less accurate.  A lowered field keeps bfloat16 checkpoints.  (A fixed
    grid records its first state before the first evaluation: the stores hold it until the dtype is known.)"""
    strategy = {"recompute": RecomputeAdjoint, "segmented": lambda: SegmentedAdjoint(checkpoints=3),
                "auto": lambda: AutoAdjoint(budget_bytes=1)}[adjoint]
    rate = torch.linspace(-3.0, -0.1, 8, device=device)
    y0, t = torch.randn(16, 8, device=device), torch.linspace(0, 3, 4, device=device)
    lowered = MLPField(dim=8, width=16).to(device)

    def solve(func, params, autocast):
        saved = []

        def pack(x):
            saved.append(x.dtype)
            return x

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), warnings.catch_warnings():
            warnings.simplefilter("ignore", MixedPrecisionToleranceWarning)
            y = odeint(func, y0, t, method=method, rtol=1e-7, atol=1e-7, options=options, adjoint=strategy())
            grads = torch.autograd.grad(y[-1].float().pow(2).sum(), params)
        return torch.cat([g.reshape(-1) for g in grads]), set(saved)

    a = rate.clone().requires_grad_()

    def elementwise(t, y):
        return a * y + torch.sin(3 * t) * torch.tanh(y)

    plain, _ = solve(elementwise, [a], False)
    under, kept = solve(elementwise, [a], True)
    assert torch.equal(under, plain) and torch.bfloat16 not in kept
    _, kept = solve(lowered, list(lowered.parameters()), True)
    assert torch.bfloat16 in kept


# -- tolerances far below anything representable in the field's precision ------------------------------------


@pytest.mark.parametrize("tol", [1e-20, 1e-30])
def test_tolerances_whose_scaled_errors_overflow_float32_still_accept_on_the_noise(tol, device):
    """At 1e-20 and below the squares of the scaled error overflow float32: the first step underflowed to 0 before
    (a FloatingPointError at t = 0).  Measured now: 11 and 13 steps, every one accepted on the noise, y(T) error
    4.5e-3 and 4.2e-3; at 1e-12: 9 steps, 3.8e-3."""
    field, y0, T, _ = _problem("mlp")
    y_ref, _ = _reference("mlp", device)
    y_12, _, at_12 = _solve("mlp", field, y0, T, "bfloat16", 1e-12, device)
    y_t, _, tiny = _solve("mlp", field, y0, T, "bfloat16", tol, device)
    assert tiny.steps <= 2 * at_12.steps and tiny.noise_accepted_steps >= tiny.steps - 2, (tiny, at_12)
    assert _rel(y_t, y_ref) <= 2 * _rel(y_12, y_ref)


def test_tolerances_below_what_the_state_dtype_can_scale_are_refused_naming_the_fix(device):
    with pytest.raises(ValueError, match=r"rtol/atol are too small for the state's torch\.float32.*float64 state"):
        odeint(lambda t, y: -y, torch.ones(4, device=device), torch.tensor([0.0, 1.0], device=device), rtol=1e-44,
               atol=1e-44)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bfloat16-autocast"])
def test_a_field_under_torch_func_vmap_is_solved_as_torchdiffeq_solves_it(autocast, device):
    """vmap hides a batched tensor's values from the trace's weights (main raised 'Cannot access data pointer of
    Tensor that doesn't have storage' on an addition inside vmap, also without autocast)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8).to(device)

    def field(t, y):
        return torch.func.vmap(lambda row: torch.tanh(lin(row)) + 0.1 * row)(y)

    y0, t = torch.randn(4, 8, device=device), torch.tensor([0.0, 1.0], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        ours = odeint(field, y0, t, rtol=1e-4, atol=1e-4)
        theirs = torchdiffeq.odeint(field, y0, t, rtol=1e-4, atol=1e-4)
    assert float((ours - theirs).detach().norm() / theirs.norm()) < (3e-2 if autocast else 1e-4)


def test_where_carries_the_noise_of_the_values_it_selects(device):
    """``where(mask, bfloat16 branch, float32 branch)`` selecting only the float32 branch is float32-accurate
    (main gave it bfloat16's unit roundoff, and the noise test then accepted steps with truncation error)."""
    net, y0 = _net(device), torch.randn(3, 4, device=device)
    layout = FlatState(y0)
    for mask_value, low in ((False, False), (True, True)):
        field = FlatVectorField(lambda t, y, m=mask_value: torch.where(torch.full_like(y, m, dtype=torch.bool),
                                                                       net(y).float(), -2.0 * y), layout)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            field(torch.tensor(0.0, dtype=torch.float64, device=device), layout.flatten(y0))
        noise = field.precision.roundoff(torch.float32)[0]
        assert (noise >= 2.0**-9) == low, (mask_value, noise)
