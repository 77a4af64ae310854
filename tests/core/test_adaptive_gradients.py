"""Adaptive methods: gradients of the discrete solution over the accepted steps (step sizes are constants)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mpnode.core import TABLEAUX, SolverStats, odeint

F64 = torch.float64
ADAPTIVE = ["dopri5", "bosh3", "fehlberg2", "adaptive_heun", "dopri8", "tsit5"]


class TimeMLP(torch.nn.Module):
    def __init__(self, dim: int = 3, width: int = 12) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.W1 = torch.nn.Parameter(torch.randn(dim + 1, width, generator=gen, dtype=F64) / 2)
        self.W2 = torch.nn.Parameter(torch.randn(width, dim, generator=gen, dtype=F64) / 3)

    def forward(self, t, y):
        z = torch.cat([y, t.expand(*y.shape[:-1], 1)], -1)
        return torch.tanh(z @ self.W1) @ self.W2 * torch.cos(t)


def reference_solution(tableau, f, y0, nodes, t_out):
    """The same discrete solution written plainly (autograd-differentiable in y0, f's parameters and the times).

    ``nodes``: the accepted nodes (0-dim tensors); each output ``t_out[j]`` (j >= 1) is the dense output of the
    first step whose end reaches it; the first stage of a step is the previous step's last stage (torchdiffeq's
    reuse), the first step's is ``f(t0, y0)``.
    """
    outs = [y0]
    y, k_first, j = y0, f(nodes[0], y0), 1
    direction = 1.0 if float(nodes[-1]) > float(nodes[0]) else -1.0
    for t0, t1 in itertools.pairwise(nodes):
        h = t1 - t0
        ks = [k_first]
        for i in range(1, tableau.stages):
            y_i = y + h * sum(a * k for a, k in zip(tableau.a[i], ks) if a != 0.0)
            t_i = t1 if tableau.c[i] == 1.0 else t0 + tableau.c[i] * h
            ks.append(f(t_i, y_i))
        y1 = y + h * sum(b * k for b, k in zip(tableau.b, ks) if b != 0.0)
        while j < len(t_out) and direction * float(t_out[j] - t1) <= 0:
            x = (t_out[j] - t0) / h
            weights = [sum(c * x ** (m + 1) for m, c in enumerate(row)) for row in tableau.dense]
            outs.append(y + h * sum(w * k for w, k in zip(weights, ks)))
            j += 1
        k_first, y = ks[-1], y1
    return torch.stack(outs)


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _setup(seed=0):
    field = TimeMLP()
    y0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(seed), dtype=F64, requires_grad=True)
    t = torch.linspace(0.0, 1.2, 7, dtype=F64, requires_grad=True)
    weights = torch.randn(7, 2, 3, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    return field, y0, t, weights


@pytest.mark.parametrize("direction", [1, -1])
@pytest.mark.parametrize("method", ADAPTIVE)
def test_gradients_equal_autograd_through_the_same_discrete_solution(method, direction):
    field, y0, t, weights = _setup()
    if direction < 0:
        t = torch.flip(t.detach(), [0]).requires_grad_(True)
    stats = SolverStats()
    rtol = 1e-6 if method in ("dopri5", "dopri8", "tsit5") else 1e-4
    out = odeint(field, y0, t, method=method, rtol=rtol, atol=rtol * 1e-2, options={"stats": stats})
    inputs = (y0, t, *field.parameters())
    ours = torch.autograd.grad((out * weights).sum(), inputs)
    # the reference runs on the accepted grid, shifted with t[0] so that its time gradient matches ours
    offsets = torch.tensor(stats.last_grid, dtype=F64) - stats.last_grid[0]
    nodes = list(t[0] + offsets)
    ref_out = reference_solution(TABLEAUX[method], field, y0, nodes, t)
    ref = torch.autograd.grad((ref_out * weights).sum(), inputs)
    assert _rel(out, ref_out) <= 1e-12
    for a, b in zip(ours, ref):
        assert _rel(a, b) <= 1e-9


def test_output_time_gradients_match_finite_differences():
    field, y0, t, weights = _setup()
    kwargs = dict(method="dopri5", rtol=1e-8, atol=1e-10)
    out = odeint(field, y0, t, **kwargs)
    (g_t,) = torch.autograd.grad((out * weights).sum(), (t,))
    eps = 1e-6
    with torch.no_grad():
        for j in range(1, t.shape[0]):  # moving an output time does not move the accepted steps
            tp, tm = t.detach().clone(), t.detach().clone()
            tp[j] += eps
            tm[j] -= eps
            fd = ((odeint(field, y0, tp, **kwargs) - odeint(field, y0, tm, **kwargs)) * weights).sum() / (2 * eps)
            assert float(g_t[j]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)


def test_start_time_gradient_matches_finite_differences_of_the_shifted_grid():
    """dL/dt[0]: the accepted nodes move with t[0] (step sizes are constants of the backward)."""
    field, y0, t, weights = _setup()
    stats = SolverStats()
    out = odeint(field, y0, t, method="dopri5", rtol=1e-8, atol=1e-10, options={"stats": stats})
    (g_t,) = torch.autograd.grad((out * weights).sum(), (t,))
    offsets = torch.tensor(stats.last_grid, dtype=F64) - stats.last_grid[0]
    eps = 1e-6
    with torch.no_grad():
        def loss(shift):
            tt = t.detach().clone()
            tt[0] += shift
            return (reference_solution(TABLEAUX["dopri5"], field, y0, list(tt[0] + offsets), tt) * weights).sum()

        fd = (loss(eps) - loss(-eps)) / (2 * eps)
    assert float(g_t[0]) == pytest.approx(float(fd), rel=1e-6)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "tsit5"])
def test_gradients_match_the_matrix_exponential_at_tolerance_level(method):
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(4, 4, generator=gen, dtype=F64)
    A = ((M - M.T) / 2 - 0.2 * torch.eye(4, dtype=F64)).requires_grad_(True)
    y0 = torch.randn(3, 4, generator=gen, dtype=F64, requires_grad=True)
    T = 1.5
    out = odeint(lambda t, y: y @ A.T, y0, torch.tensor([0.0, T], dtype=F64), method=method, rtol=1e-9, atol=1e-11,
                 adjoint_params=(A,))
    ours = torch.autograd.grad(0.5 * out[-1].pow(2).sum(), (y0, A))
    exact_yT = y0 @ torch.linalg.matrix_exp(T * A).T
    exact = torch.autograd.grad(0.5 * exact_yT.pow(2).sum(), (y0, A))
    for a, b in zip(ours, exact):
        assert _rel(a, b) <= 1e-6


def test_gradients_close_to_torchdiffeqs_direct_backprop_at_tolerance_level():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    field, y0, t, weights = _setup()
    grads = []
    for solve in (odeint, torchdiffeq.odeint):
        out = solve(field, y0, t, method="dopri5")  # default tolerances 1e-7 / 1e-9
        grads.append(torch.autograd.grad((out * weights).sum(), (y0, t, *field.parameters())))
    for a, b in zip(*grads):
        assert _rel(a, b) <= 1e-5  # torchdiffeq also differentiates its step-size choices


def test_backward_makes_no_host_synchronisation(sync_counter, device):
    field = TimeMLP().float().to(device)
    y0 = torch.randn(8, 3, device=device, requires_grad=True)
    out = odeint(field, y0, torch.tensor([0.0, 2.0], device=device), method="dopri5", rtol=1e-5, atol=1e-7)
    loss = out[-1].pow(2).sum()
    with sync_counter() as counter:
        loss.backward()
    assert counter.count == 0


@pytest.mark.parametrize("method, carries, rtol", [("dopri5", False, 1e-7), ("fehlberg2", True, 1e-4)])
def test_held_memory_is_one_checkpoint_per_accepted_step(method, carries, rtol, saved_bytes):
    field = TimeMLP().float()
    y0 = torch.randn(64, 3, requires_grad=True)
    stats = SolverStats()
    with saved_bytes() as meter:
        out = odeint(field, y0, torch.tensor([0.0, 12.0]), method=method, rtol=rtol, atol=rtol / 100,
                     options={"stats": stats})
    assert out.grad_fn is not None  # the meter counts what the output's graph holds
    rows = stats.steps * (2 if carries else 1) - (1 if carries else 0)  # the first step's first stage is not carried
    per_row = y0.numel() * 4
    assert rows * per_row <= meter.bytes <= rows * per_row + 64 * per_row  # the last chunk is trimmed: no growth slack
    assert stats.steps > 40  # enough steps to need several growing chunks
