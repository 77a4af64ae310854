"""torchdiffeq's callbacks on the vector field: when they are called, with what, and what they cost."""

from __future__ import annotations

import warnings

import pytest
import torch

from mpnode.core import AdjointScaling, RecomputeAdjoint, ScalingPass, SolverStats, odeint

torchdiffeq = pytest.importorskip("torchdiffeq")

FORWARD = ("callback_step", "callback_accept_step", "callback_reject_step")
ADJOINT = tuple(name + "_adjoint" for name in FORWARD)


class Field(torch.nn.Module):
    """A non-autonomous tanh layer; ``t0``, ``y0``, ``dt`` of every callback are logged as ``(name, t0, y0, dt)``."""

    def __init__(self, dim: int = 3, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim, dtype=dtype)
        self.log: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, t, y):
        return torch.tanh(self.lin(y)) * torch.cos(3 * t)


def _logger(name):
    def hook(self, t0, y0, dt):
        self.log.append((name, t0, y0, dt))
    return hook


for _name in FORWARD + ADJOINT:
    setattr(Field, _name, _logger(_name))


class ForwardOnly(Field):
    """Only the forward callbacks, so torchdiffeq's continuous adjoint is not involved."""


for _name in ADJOINT:
    setattr(ForwardOnly, _name, None)


def _names(log):
    return [entry[0] for entry in log]


def _seed_field(cls=Field, **kw):
    torch.manual_seed(0)
    return cls(**kw)


# -- forward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", [1, -1])
def test_callback_step_before_every_fixed_step(direction):
    func = _seed_field(ForwardOnly)
    t = torch.linspace(0, 1, 6, dtype=torch.float64)
    t = t if direction == 1 else t.flip(0)
    y0 = torch.randn(2, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="never called for method 'rk4' on a fixed grid"):
        out = odeint(func, y0, t, method="rk4")
    assert _names(func.log) == ["callback_step"] * 5
    for n, (_, t0, y, dt) in enumerate(func.log):
        assert t0.shape == dt.shape == () and t0.dtype == dt.dtype == t.dtype
        assert float(t0) == float(t[n]) and float(dt) == pytest.approx(0.2) and float(dt) > 0
        assert torch.equal(y, out[n])  # the state at the step's start: called before the step
        assert not y.requires_grad


def test_grid_dtype_float32_is_passed_as_float32():
    func = _seed_field(ForwardOnly, dtype=torch.float32)
    with pytest.warns(UserWarning, match="never called"):
        odeint(func, torch.randn(3), torch.tensor([0.0, 0.5, 1.0]), method="euler")
    assert {(e[1].dtype, e[3].dtype) for e in func.log} == {(torch.float32, torch.float32)}


def test_adaptive_attempts_are_followed_by_accept_or_reject():
    func = _seed_field(ForwardOnly)
    stats = SolverStats()
    y0 = 3 * torch.randn(3, dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    out = odeint(func, y0, t, rtol=1e-6, atol=1e-8, options={"first_step": 1.0, "stats": stats})
    names = _names(func.log)
    assert names[0::2] == ["callback_step"] * (len(names) // 2)
    verdicts = names[1::2]
    assert verdicts.count("callback_accept_step") == stats.steps
    assert verdicts.count("callback_reject_step") == stats.rejected_steps > 0  # first_step 1.0 is too large
    for step, verdict in zip(func.log[0::2], func.log[1::2]):
        assert float(step[1]) == float(verdict[1]) and float(verdict[3]) > 0
        assert float(step[3]) == pytest.approx(float(verdict[3]), rel=1e-14)  # t1 - t0 vs the proposed size
        assert torch.equal(step[2], verdict[2])
        assert step[1].dtype == step[3].dtype == torch.float64
    accepted = [e for e in func.log if e[0] == "callback_accept_step"]
    assert torch.equal(accepted[0][2], y0)
    assert float(accepted[-1][1]) < 2.0 <= float(accepted[-1][1]) + float(accepted[-1][3])  # its dense output gives t=2
    assert out.shape == (2, 3)


@pytest.mark.torchdiffeq_row("callbacks")
@pytest.mark.parametrize("method, options", [("rk4", {"step_size": 0.1}), ("euler", None), ("dopri5", None)])
@pytest.mark.parametrize("direction", [1, -1])
def test_forward_sequence_matches_torchdiffeq(method, options, direction):
    """Same (name, t0, dt) sequence as torchdiffeq in float64 (dopri5 steps agree to roundoff of its error estimate)."""
    t = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    t = t if direction == 1 else t.flip(0)
    logs = []
    for solve in (odeint, torchdiffeq.odeint):
        func = _seed_field(ForwardOnly)
        y0 = 3 * torch.randn(3, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # both warn that accept/reject are unused on fixed grids
            solve(func, y0, t, method=method, options=options, rtol=1e-6, atol=1e-8)
        logs.append(func.log)
    ours, ref = logs
    assert _names(ours) == _names(ref)
    for a, b in zip(ours, ref):
        assert a[1].dtype == b[1].dtype and a[3].dtype == b[3].dtype
        assert float(a[1]) == pytest.approx(float(b[1].detach()), rel=1e-8, abs=1e-12)
        assert float(a[3]) == pytest.approx(float(b[3].detach()), rel=1e-8)  # torchdiffeq's dt carries a graph
        assert torch.allclose(a[2], b[2], rtol=1e-8, atol=1e-12)


# -- backward --------------------------------------------------------------------------------------


class RejectFirstBlock(AdjointScaling):
    """Blocks of two steps; the first block of the first pass is rejected once (as a float16 scaler does after an
    overflow)."""

    def __init__(self) -> None:
        self.rejected = False

    def begin(self, lam, n_steps):
        return _RejectFirstBlockPass(self)


class _RejectFirstBlockPass(ScalingPass):
    block_size = 2

    def __init__(self, policy: RejectFirstBlock) -> None:
        self.policy = policy

    def scale(self, lam):
        return None

    def end_block(self, lo, hi):
        if self.policy.rejected:
            return True
        self.policy.rejected = True
        return False


@pytest.mark.torchdiffeq_row("callbacks-adjoint")
def test_adjoint_callbacks_once_per_backward_step_with_the_checkpoint():
    func = _seed_field()
    t = torch.linspace(0, 1, 6, dtype=torch.float64)
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = odeint(func, y0, t, method="rk4")
    func.log.clear()
    out.sum().backward()
    steps = [e for e in func.log if e[0] == "callback_step_adjoint"]
    accepted = [e for e in func.log if e[0] == "callback_accept_step_adjoint"]
    assert [float(e[1]) for e in steps] == [float(x) for x in t[:-1].flip(0)]
    assert [float(e[1]) for e in accepted] == [float(x) for x in t[:-1].flip(0)]
    assert not any(e[0] == "callback_reject_step_adjoint" for e in func.log)
    for _, t0, y, dt in steps:  # y0 is the recomputed checkpoint: the forward state at the step's start
        n = int(torch.nonzero(t == t0))
        assert torch.equal(y, out[n].detach()) and float(dt) == pytest.approx(0.2)
        assert t0.dtype == dt.dtype == torch.float64 and t0.shape == dt.shape == ()


@pytest.mark.torchdiffeq_row("callbacks-adjoint")
def test_rejected_backward_blocks_call_the_reject_callback():
    func = _seed_field()
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    y0 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = odeint(func, y0, t, method="euler", adjoint=RecomputeAdjoint(scaling=RejectFirstBlock()))
    func.log.clear()
    out.sum().backward()
    names = _names(func.log)
    rejected = [float(e[1]) for e in func.log if e[0] == "callback_reject_step_adjoint"]
    assert rejected == [float(t[3]), float(t[2])]  # the last block (steps 3 and 2), redone afterwards
    assert names.count("callback_step_adjoint") == 4 + 2
    assert names.count("callback_accept_step_adjoint") == 4


# -- warnings and costs ----------------------------------------------------------------------------


@pytest.mark.torchdiffeq_row("callbacks-unknown-name")
def test_unknown_callback_name_warns_with_the_valid_names(decay_with_method):
    with pytest.warns(UserWarning, match=r"'callback_steps'.*callback_step.*callback_reject_step_adjoint"):
        odeint(decay_with_method("callback_steps"), torch.ones(2), torch.tensor([0.0, 1.0]), method="rk4")


def test_callbacks_on_a_plain_function_attribute():
    calls = []

    def field(t, y):
        return -y

    field.callback_step = lambda t0, y0, dt: calls.append(float(t0))
    odeint(field, torch.ones(2), torch.tensor([0.0, 0.5, 1.0]), method="euler")
    assert calls == [0.0, 0.5]


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_callbacks_add_no_host_synchronisation(method, sync_counter):
    """Forward and backward make the same number of .item()-style syncs with or without callbacks."""
    counts = []
    for cls in (torch.nn.Module, ForwardOnly):
        torch.manual_seed(0)
        func = Field()
        if cls is torch.nn.Module:  # the same field without any callback
            func = _Plain(func)
        y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        t = torch.linspace(0, 1, 5, dtype=torch.float64)
        counter = sync_counter()
        with counter, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = odeint(func, y0, t, method=method)
            out.square().sum().backward()
        counts.append(counter.count)
    assert counts[0] == counts[1]


class _Plain(torch.nn.Module):
    def __init__(self, inner: Field) -> None:
        super().__init__()
        self.lin = inner.lin

    def forward(self, t, y):
        return torch.tanh(self.lin(y)) * torch.cos(3 * t)
