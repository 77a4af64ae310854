"""Adaptive methods: torchdiffeq's numbers in float64 (same algorithm, same accepted steps) and their options."""

from __future__ import annotations

import math

import pytest
import torch

torchdiffeq = pytest.importorskip("torchdiffeq")

from mpnode.core import PIController, SolverStats, TABLEAUX, odeint  # noqa: E402

TORCHDIFFEQ_ADAPTIVE = ["dopri5", "bosh3", "fehlberg2", "adaptive_heun", "dopri8"]
F64 = torch.float64


class TimeMLP(torch.nn.Module):
    """A non-autonomous nonlinear field on ``(B, 3)`` states."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(4)
        self.W1 = torch.nn.Parameter(torch.randn(4, 16, generator=gen, dtype=F64) / 2)
        self.W2 = torch.nn.Parameter(torch.randn(16, 3, generator=gen, dtype=F64) / 4)

    def forward(self, t, y):
        z = torch.cat([y, t.expand(*y.shape[:-1], 1)], -1)
        return torch.tanh(z @ self.W1) @ self.W2 * torch.cos(t)


class Linear(torch.nn.Module):
    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(A)

    def forward(self, t, y):
        return y @ self.A.T


def _linear() -> Linear:
    gen = torch.Generator().manual_seed(2)
    M = torch.randn(4, 4, generator=gen, dtype=F64)
    return Linear((M - M.T) / 2 - 0.3 * torch.eye(4, dtype=F64))


def _stiff() -> Linear:
    return Linear(torch.diag(torch.tensor([-1.0, -8.0, -40.0], dtype=F64)) + 0.1 * torch.ones(3, 3, dtype=F64))


PROBLEMS = {
    "linear": (_linear, lambda: torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)),
    "mlp": (TimeMLP, lambda: torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=F64)),
    "stiff_decay": (_stiff, lambda: torch.ones(2, 3, dtype=F64)),
}
T_OUT = torch.linspace(0.0, 1.5, 13, dtype=F64)  # many output times between accepted steps


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class AcceptRecorder(torch.nn.Module):
    """Wraps a field and records the accepted steps torchdiffeq reports through its callback."""

    def __init__(self, field):
        super().__init__()
        self.field = field
        self.accepted = []

    def forward(self, t, y):
        return self.field(t, y)

    def callback_accept_step(self, t0, y0, dt):
        self.accepted.append(float(t0 + dt))


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("method", TORCHDIFFEQ_ADAPTIVE)
def test_solution_and_accepted_steps_equal_torchdiffeq(method, problem):
    make_field, make_y0 = PROBLEMS[problem]
    field, y0 = make_field(), make_y0()
    if method == "adaptive_heun" and problem != "linear":
        t = T_OUT[:5]  # thousands of steps at the default tolerances; a shorter span keeps the test quick
    else:
        t = T_OUT
    stats = SolverStats()
    with torch.no_grad():
        ours = odeint(field, y0, t, method=method, options={"stats": stats})
        recorder = AcceptRecorder(field)
        theirs = torchdiffeq.odeint(recorder, y0, t, method=method)
    # The same accepted steps; their ends agree to the roundoff of the error estimate (its weights sum to zero, so
    # it carries cancellation noise that another summation order changes at ~1e-8 relative, more near stability
    # limits).  dopri8 at these tolerances takes steps whose error estimate is near float64's roundoff (relative
    # noise ~1e-5 in the step placement), and reads outputs off a 4th-order dense output: ~1e-9 between steps.
    assert _rel(ours, theirs) <= (1e-8 if method == "dopri8" else 1e-10)
    assert stats.steps == len(recorder.accepted)
    assert list(stats.last_grid[1:]) == pytest.approx(recorder.accepted, rel=1e-4 if method == "dopri8" else 1e-6)


def test_default_method_is_dopri5_with_torchdiffeqs_tolerances():
    field, y0 = TimeMLP(), PROBLEMS["mlp"][1]()
    with torch.no_grad():
        ours = odeint(field, y0, T_OUT)
        theirs = torchdiffeq.odeint(field, y0, T_OUT)
    assert _rel(ours, theirs) <= 1e-10


def test_decreasing_time_and_tuple_state_agree():
    field = TimeMLP()
    x0 = PROBLEMS["mlp"][1]()
    s0 = torch.tensor([0.5, -1.0], dtype=F64)

    def tuple_field(t, state):
        x, s = state
        return field(t, x), -s * x.pow(2).sum(-1)

    t = torch.flip(T_OUT, [0])
    with torch.no_grad():
        ours = odeint(tuple_field, (x0, s0), t, method="dopri5", rtol=1e-6, atol=1e-8)
        theirs = torchdiffeq.odeint(tuple_field, (x0, s0), t, method="dopri5", rtol=1e-6, atol=1e-8)
    for a, b in zip(ours, theirs):
        assert _rel(a, b) <= 1e-10


OPTION_CASES = {
    "tolerances": dict(rtol=1e-4, atol=1e-6),
    "per-element atol": dict(rtol=1e-5, atol=torch.tensor([1e-7, 1e-5, 1e-6], dtype=F64)),
    "first_step": dict(options={"first_step": 0.01}),
    "max_step": dict(options={"max_step": 0.05}),
    "min_step": dict(rtol=1e-10, atol=1e-12, options={"min_step": 0.02}),
    "safety and factors": dict(options={"safety": 0.8, "ifactor": 4.0, "dfactor": 0.5}),
    "norm": dict(options={"norm": lambda x: x.abs().max()}),
    "step_t": dict(options={"step_t": torch.tensor([0.25, 0.7], dtype=F64)}),
    "jump_t": dict(options={"jump_t": torch.tensor([0.4, 1.1], dtype=F64)}),
    "step_t and jump_t": dict(options={"step_t": torch.tensor([0.3], dtype=F64), "jump_t": torch.tensor([0.9], dtype=F64)}),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_agree_with_torchdiffeq(case):
    field, y0 = TimeMLP(), PROBLEMS["mlp"][1]()
    kwargs = OPTION_CASES[case]
    with torch.no_grad():
        ours = odeint(field, y0, T_OUT, method="dopri5", **kwargs)
        theirs = torchdiffeq.odeint(field, y0, T_OUT, method="dopri5", **kwargs)
    assert _rel(ours, theirs) <= 1e-10


def test_jump_t_handles_a_discontinuous_field_like_torchdiffeq():
    def jumping(t, y):
        return torch.where(t < 0.6, -y, 2.0 * y.sin())

    y0 = torch.tensor([1.0, -0.5], dtype=F64)
    with torch.no_grad():
        ours = odeint(jumping, y0, T_OUT, method="dopri5", options={"jump_t": torch.tensor([0.6], dtype=F64)})
        theirs = torchdiffeq.odeint(jumping, y0, T_OUT, method="dopri5", options={"jump_t": torch.tensor([0.6], dtype=F64)})
    assert _rel(ours, theirs) <= 1e-10


def test_max_num_steps_counts_attempts_per_output_interval_like_torchdiffeq():
    field, y0 = TimeMLP(), PROBLEMS["mlp"][1]()
    t = torch.tensor([0.0, 1.5], dtype=F64)
    kwargs = dict(method="dopri5", rtol=1e-10, atol=1e-12, options={"max_num_steps": 5})
    with pytest.raises(AssertionError, match="max_num_steps"):
        torchdiffeq.odeint(field, y0, t, **kwargs)
    with pytest.raises(RuntimeError, match=r"max_num_steps = 5.*raise options\['max_num_steps'\]"):
        odeint(field, y0, t, **kwargs)
    odeint(field, y0, T_OUT, method="dopri5", options={"max_num_steps": 5})  # 13 outputs: few attempts each


def test_tsit5_converges_at_order_five_to_a_float64_reference():
    field, y0 = TimeMLP(), PROBLEMS["mlp"][1]()
    t = torch.tensor([0.0, 1.5], dtype=F64)
    with torch.no_grad():
        ref = odeint(field, y0, t, method=TABLEAUX["dopri8"].fixed_grid(), options={"step_size": 1.5 / 256})[-1]  # ends on a node
        errors = [float((odeint(field, y0, t, method=TABLEAUX["tsit5"].fixed_grid(), options={"step_size": 1.5 / n})[-1] - ref).norm())
                  for n in (16, 32)]
        adaptive = odeint(field, y0, t, method="tsit5", rtol=1e-9, atol=1e-11)[-1]
    assert abs(math.log2(errors[0] / errors[1]) - 5) <= 0.3
    assert _rel(adaptive, ref) <= 1e-7


def test_pi_controller_meets_the_tolerance_with_a_smooth_step_sequence():
    field, y0 = TimeMLP(), PROBLEMS["mlp"][1]()
    t = torch.tensor([0.0, 1.5], dtype=F64)
    with torch.no_grad():
        ref = odeint(field, y0, t, method=TABLEAUX["dopri8"].fixed_grid(), options={"step_size": 1.5 / 256})[-1]
        stats = SolverStats()
        out = odeint(field, y0, t, method="dopri5", rtol=1e-8, atol=1e-10,
                     options={"controller": PIController(), "stats": stats})[-1]
    assert _rel(out, ref) <= 1e-6
    assert stats.steps > 3


def test_every_builtin_adaptive_tableau_is_a_validated_embedded_pair():
    for name in [*TORCHDIFFEQ_ADAPTIVE, "tsit5"]:
        tab = TABLEAUX[name]
        assert tab.is_adaptive and tab.dense is not None and tab.embedded_order < tab.order
        assert tab.dense_weights(1.0) == pytest.approx(tab.b, abs=1e-12)
