"""Fixed-grid options ``interp`` and ``perturb`` against torchdiffeq in float64 (outputs and gradients to 1e-10).

The field jumps at ``t = 0.5``, a node of every grid used, with one component
switching on ``t > 0.5`` and another on ``t >= 0.5``: without ``perturb`` the stages
at the node see one side or the other by those comparisons; with it the first
stage of a step sees its own side and the stage at the step's end the side before
the end.  Outputs at 0.23 and 0.71 lie between nodes of the ``step_size`` and
constructed grids (eighths of the span), so ``interp`` matters.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mpnode.core import odeint

torchdiffeq = pytest.importorskip("torchdiffeq")

T_JUMP = 0.5
TIMES = [0.0, 0.23, 0.5, 0.71, 1.0]
TOL = 1e-10
METHODS = ["euler", "midpoint", "heun2", "heun3", "rk4"]


class JumpField(torch.nn.Module):
    """``tanh(y) W^T + b * step(t) * (1 + t)`` on states ``(B, 3)``; ``step`` switches on at ``T_JUMP``."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(0.5 * torch.randn(3, 3, generator=gen, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))

    def forward(self, t, y):
        step = torch.stack([t > T_JUMP, t >= T_JUMP, t > T_JUMP]).to(y.dtype)
        return torch.tanh(y) @ self.W.T + self.b * step * (1 + t)


class TupleJumpField(torch.nn.Module):
    """``(x (B, 3), r (B,))`` with ``dr/dt`` depending on ``x`` and jumping at ``T_JUMP``."""

    def __init__(self) -> None:
        super().__init__()
        self.f = JumpField()
        self.w = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))

    def forward(self, t, state):
        x, r = state
        return self.f(t, x), (x * self.w).sum(-1) * torch.cos(r) * (1.0 + (t > T_JUMP).to(r.dtype))


def eighths(func, y0, t):
    """A grid constructor: 8 equal steps from t[0] to t[-1], differentiable in both (0.5 is a node)."""
    return t[0] + (t[-1] - t[0]) * torch.linspace(0, 1, 9, dtype=t.dtype, device=t.device)


GRIDS = {"t": {}, "step_size": {"step_size": 0.125}, "grid_constructor": {"grid_constructor": eighths}}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _solve(solve, tuple_state, decreasing, method, options):
    torch.manual_seed(0)
    func = TupleJumpField() if tuple_state else JumpField()
    t = torch.tensor(TIMES, dtype=torch.float64)
    t = (t.flip(0) if decreasing else t).requires_grad_()
    x0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    y0 = (x0, torch.randn(2, dtype=torch.float64, requires_grad=True)) if tuple_state else x0
    out = solve(func, y0, t, method=method, options=dict(options))
    outs = out if tuple_state else (out,)
    gen = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [*(y0 if tuple_state else (y0,)), t, *func.parameters()])
    return [o.detach() for o in outs], list(grads)


def _assert_matches_torchdiffeq(tuple_state, decreasing, method, options):
    ours = _solve(odeint, tuple_state, decreasing, method, options)
    ref = _solve(torchdiffeq.odeint, tuple_state, decreasing, method, options)
    for a, b in zip(ours[0] + ours[1], ref[0] + ref[1]):
        assert _rel(a, b) <= TOL


CASES = list(itertools.product(METHODS, list(GRIDS), ["linear", "cubic"], [False, True], [False, True]))


@pytest.mark.torchdiffeq_row("option-interp")
@pytest.mark.torchdiffeq_row("option-perturb")
@pytest.mark.torchdiffeq_row("decreasing-t")
@pytest.mark.parametrize("method, grid, interp, perturb, decreasing", CASES)
def test_tensor_state_matches_torchdiffeq(method, grid, interp, perturb, decreasing):
    _assert_matches_torchdiffeq(False, decreasing, method, {**GRIDS[grid], "interp": interp, "perturb": perturb})


@pytest.mark.torchdiffeq_row("option-interp")
@pytest.mark.torchdiffeq_row("option-perturb")
@pytest.mark.torchdiffeq_row("tuple-state")
@pytest.mark.parametrize("method, grid, interp, perturb, decreasing",
                         [c for c in CASES if c[0] in ("euler", "rk4")])
def test_tuple_state_matches_torchdiffeq(method, grid, interp, perturb, decreasing):
    _assert_matches_torchdiffeq(True, decreasing, method, {**GRIDS[grid], "interp": interp, "perturb": perturb})


@pytest.mark.parametrize("grid", list(GRIDS))
def test_the_options_change_the_answer_on_this_problem(grid):
    """The comparisons above are not vacuous: perturb moves the jump, cubic outputs differ between nodes."""
    func, y0 = JumpField(), torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor(TIMES, dtype=torch.float64)
    with torch.no_grad():
        plain = odeint(func, y0, t, method="rk4", options=GRIDS[grid])
        perturbed = odeint(func, y0, t, method="rk4", options={**GRIDS[grid], "perturb": True})
        cubic = odeint(func, y0, t, method="rk4", options={**GRIDS[grid], "interp": "cubic"})
    assert _rel(perturbed, plain) > 1e-3
    if grid != "t":  # with the outputs as the grid every output is a node
        assert _rel(cubic, plain) > 1e-5


@pytest.mark.parametrize("direction", [1, -1])
def test_perturb_shows_the_field_the_neighbouring_float_in_the_state_dtype(direction):
    """Under bfloat16 autocast the nudged times are the float32 neighbours of the nodes (the state's dtype)."""
    seen = []

    def field(t, y):
        seen.append((t.dtype, float(t)))
        return -y

    t = torch.tensor([0.0, 0.5, 1.0]) if direction == 1 else torch.tensor([1.0, 0.5, 0.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        odeint(field, torch.ones(2), t, method="heun2", options={"perturb": True})
    node = torch.tensor(0.5)
    after = float(torch.nextafter(node, torch.tensor(direction * float("inf"))))
    before = float(torch.nextafter(node, torch.tensor(-direction * float("inf"))))
    assert {d for d, _ in seen} == {torch.float32}
    # heun2: stage 1 at the step's start (nudged forward), stage 2 at its end (nudged back)
    assert [v for _, v in seen] == [
        float(torch.nextafter(t[0], t[1])), before, after, float(torch.nextafter(t[2], t[1]))
    ]


def test_invalid_values_name_the_choices():
    y0, t = torch.ones(2), torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match=r"interp.*cubic"):
        odeint(lambda t, y: -y, y0, t, method="rk4", options={"interp": "quadratic"})
    with pytest.raises(TypeError, match=r"perturb.*True or False"):
        odeint(lambda t, y: -y, y0, t, method="rk4", options={"perturb": "yes"})
    with pytest.raises(ValueError, match="fixed grids only"):
        odeint(lambda t, y: -y, y0, t, method="dopri5", options={"perturb": True})
