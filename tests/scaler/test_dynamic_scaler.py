"""Dynamic adjoint scaling for float16: accuracy, underflow, zero terminal adjoint, growth,
host synchronisations, unrecoverable overflow and the automatic choice."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch

from mpnode.core import NoAdjointScaling, NonFiniteGradientError, SolverStats, odeint
from mpnode.core.testing import DynamicRangeODE, count_host_syncs
from mpnode.scaler import DynamicAdjointScaler, GradScalerPassthrough


def mlp(device, width: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Tanh(), torch.nn.Linear(width, 4)).to(device)


def solve_grads(net, y0, t, amp_ctx, loss_fn, decay: float = 0.0, **kwargs):
    params = tuple(net.parameters())
    with amp_ctx:
        kwargs.setdefault("method", "rk4")
        out = odeint(lambda t, y: net(y) - decay * y, y0, t, adjoint_params=params, **kwargs)
        loss = loss_fn(out)
    return torch.autograd.grad(loss, (y0, *params))


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("precision", ["float16"])
def test_dynamic_range_problem(precision, amp, device):
    """Measured: unscaled float16 errors 0.93 (a, b, c) and 3e3 (y0); scaled <= 1.4e-4 for all four."""
    problem = DynamicRangeODE()
    with amp(precision):
        unscaled = problem.errors(problem.solve(odeint, device=device, scaler=False))
    assert max(unscaled[k] for k in ("dy0", "da", "db", "dc")) > 0.1, unscaled
    scaler = DynamicAdjointScaler()
    with amp(precision):
        scaled = problem.errors(problem.solve(odeint, device=device, scaler=scaler))
    assert max(scaled[k] for k in ("dy0", "da", "db", "dc")) <= 1e-2, scaled
    assert scaler.counters["grows"] >= 1 and any(e.kind == "init" for e in scaler.history)


@pytest.mark.parametrize("precision", ["float16"])
def test_overflowing_loss_is_recovered(precision, amp, device):
    problem = DynamicRangeODE(loss_scale=1e8)
    with amp(precision), pytest.raises(NonFiniteGradientError):
        problem.solve(odeint, device=device, scaler=False)
    with amp(precision):
        scaled = problem.errors(problem.solve(odeint, device=device))  # automatic choice: dynamic scaler
    assert max(scaled[k] for k in ("dy0", "da", "db", "dc")) <= 1e-2, scaled


@pytest.mark.parametrize("precision", ["float16"])
def test_underflow_of_a_tiny_loss_is_recovered(precision, amp, device):
    net = mlp(device)
    y0 = torch.randn(8, 4, device=device, requires_grad=True)
    t = torch.linspace(0, 1, 33, device=device)
    tiny = lambda out: 1e-12 * (out[-1].float() ** 2).sum()  # noqa: E731
    ref = solve_grads(net, y0, t, amp("float32"), tiny)
    unscaled = solve_grads(net, y0, t, amp(precision), tiny, scaler=False)
    assert all(float(g.abs().max()) == 0.0 for g in unscaled[1:]), "unscaled float16 should underflow to zero"
    scaled = solve_grads(net, y0, t, amp(precision), tiny, scaler=DynamicAdjointScaler())
    assert max(rel(a, b) for a, b in zip(scaled, ref)) < 1e-2


@pytest.mark.parametrize("precision", ["float16"])
def test_loss_on_intermediate_outputs_only(precision, amp, device):
    """The terminal adjoint is zero: the scale is initialised at the first non-zero adjoint."""
    net = mlp(device)
    y0 = torch.randn(8, 4, device=device, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], device=device)
    middle = lambda out: (out[1].float() ** 2).sum()  # noqa: E731
    ref = solve_grads(net, y0, t, amp("float32"), middle, options={"step_size": 1 / 32})
    scaler = DynamicAdjointScaler()
    got = solve_grads(net, y0, t, amp(precision), middle, options={"step_size": 1 / 32}, scaler=scaler)
    assert max(rel(a, b) for a, b in zip(got, ref)) < 1e-2
    (init,) = [e for e in scaler.history if e.kind == "init"]
    assert init.step == 15  # the last step before t = 0.5, where the adjoint first becomes non-zero


@pytest.mark.parametrize("precision", ["float16"])
def test_growth_does_not_oscillate(precision, amp, device):
    net = mlp(device)
    y0 = torch.randn(16, 4, device=device, requires_grad=True)
    t = torch.linspace(0, 4, 201, device=device)  # a 200-step backward
    scaler = DynamicAdjointScaler()
    # a contracting flow: the adjoint shrinks ~e^-6 towards t = 0, so the scale must grow repeatedly
    solve_grads(net, y0, t, amp(precision), lambda out: (out[-1].float() ** 2).sum(), decay=1.5, scaler=scaler,
                method="heun2")
    assert scaler.counters["grows"] >= 4, scaler.history
    assert scaler.counters["backoffs"] <= 1, scaler.history
    kinds = [e.kind for e in scaler.history]
    assert kinds.count("init") == 1
    # no grow immediately undone by a shrink or backoff (the signature of testing the unscaled adjoint)
    assert not any(a == "grow" and b in ("shrink", "backoff") for a, b in itertools.pairwise(kinds)), kinds


@pytest.mark.parametrize("precision", ["float16"])
@pytest.mark.parametrize("block_size", [8, 16])
def test_host_syncs_per_block(precision, block_size, amp, device):
    net = mlp(device)
    y0 = torch.randn(8, 4, device=device, requires_grad=True)
    n = 64
    t = torch.linspace(0, 1, n + 1, device=device)
    stats = SolverStats()
    scaler = DynamicAdjointScaler(block_size=block_size)
    with amp(precision):
        out = odeint(lambda t, y: net(y), y0, t, method="rk4", adjoint_params=tuple(net.parameters()), scaler=scaler,
                     options={"stats": stats})
        loss = (out[-1].float() ** 2).sum()
    with count_host_syncs() as counter:
        loss.backward()
    assert counter.count <= n / block_size + 4
    assert stats.host_syncs <= n / block_size + 4 and stats.host_syncs == scaler.host_syncs
    assert stats.backward_steps == n


@pytest.mark.parametrize("precision", ["float16"])
def test_unrecoverable_overflow_reports_the_step_and_touches_nothing(precision, amp, device):
    """d/dy sqrt(|y| * [t > 1/2]) is NaN wherever the mask is 0: no scale can fix it."""
    net = mlp(device)
    y0 = torch.randn(4, 4, device=device)

    def field(t, y):
        return net(y) + torch.sqrt(y.abs() * (t > 0.5).to(y.dtype))

    before = [p.detach().clone() for p in net.parameters()]
    scaler = DynamicAdjointScaler(max_retries=3)
    untouched = scaler.state_dict()
    with amp(precision):
        out = odeint(field, y0, torch.linspace(0, 1, 65, device=device), method="rk4",
                     adjoint_params=tuple(net.parameters()), scaler=scaler)
        loss = (out[-1].float() ** 2).sum()
    with pytest.raises(NonFiniteGradientError, match="step 32 of 64 after 3 halvings"):
        loss.backward()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(p.grad is None for p in net.parameters())
    assert scaler.state_dict() == untouched  # a pass that raises changes nothing in the scaler


@pytest.mark.parametrize("precision", ["float16"])
def test_gradscaler_mode_skips_the_step_on_overflow(precision, amp, device):
    net = mlp(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    grad_scaler = torch.amp.GradScaler(device.type, init_scale=2.0**40)
    y0 = torch.randn(8, 4, device=device)
    before = [p.detach().clone() for p in net.parameters()]
    with amp(precision):
        out = odeint(lambda t, y: net(y), y0, torch.linspace(0, 1, 9, device=device), method="rk4",
                     adjoint_params=tuple(net.parameters()), scaler=NoAdjointScaling())
        loss = (out[-1].float() ** 2).sum()
    grad_scaler.scale(loss).backward()
    assert not all(torch.isfinite(p.grad).all() for p in net.parameters())
    grad_scaler.step(opt)
    grad_scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # step skipped
    assert grad_scaler.get_scale() < 2.0**40


def test_gradscaler_passthrough_is_a_deprecated_alias_of_no_scaling():
    with pytest.warns(DeprecationWarning, match=r"GradScalerPassthrough is deprecated: pass "
                                                r"scaler=mpnode.core.NoAdjointScaling\(\)"):
        scaler = GradScalerPassthrough()
    assert isinstance(scaler, NoAdjointScaling) and scaler.raise_on_nonfinite is False
    grads = []
    for policy in (scaler, NoAdjointScaling()):
        y0 = torch.ones(2, requires_grad=True)
        odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0]), method="rk4", scaler=policy)[-1].sum().backward()
        grads.append(y0.grad)
    assert torch.equal(grads[0], grads[1]) and torch.allclose(grads[0], torch.full((2,), 0.375))  # one RK4 step


@pytest.mark.parametrize("precision", ["float16"])
def test_state_persists_across_iterations(precision, amp, device):
    problem = DynamicRangeODE()
    scaler = DynamicAdjointScaler(target=2.0**14)  # too ambitious: 2e3 * 2^14 overflows in the first step
    for _ in range(3):
        with amp(precision):
            problem.solve(odeint, device=device, scaler=scaler)
    assert scaler.counters["backward"] == 3
    assert {e.backward for e in scaler.history} == {0, 1, 2}
    # the backoff of the first pass lowered the target once; later passes need none
    assert scaler.counters["backoffs"] == 1 and scaler.target == 2.0**13
    assert [e.backward for e in scaler.history if e.kind == "backoff"] == [0]


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_automatic_choice(precision, amp, device):
    net = mlp(device)
    y0 = torch.randn(4, 4, device=device, requires_grad=True)
    stats = SolverStats()
    with amp(precision):
        out = odeint(net and (lambda t, y: net(y)), y0, torch.linspace(0, 1, 17, device=device), method="rk4",
                     adjoint_params=tuple(net.parameters()), options={"stats": stats})
    out[-1].sum().backward()
    # the dynamic scaler checks once per block; bfloat16 runs unscaled with no host sync
    assert (stats.host_syncs > 0) == (precision == "float16")


@pytest.mark.parametrize("precision", ["float16"])
def test_core_works_without_the_scaler_package(precision, amp, device, monkeypatch):
    monkeypatch.setitem(sys.modules, "mpnode.scaler", None)  # import now fails
    problem = DynamicRangeODE(loss_scale=1e8)
    with amp(precision), pytest.raises(NonFiniteGradientError, match="mpnode-scaler"):
        problem.solve(odeint, device=device)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        DynamicAdjointScaler(target=1000.0)
    with pytest.raises(ValueError, match="block_size"):
        DynamicAdjointScaler(block_size=0)

