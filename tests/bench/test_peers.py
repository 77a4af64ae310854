"""The torchode adapter: torchdiffeq's calling convention, per-sample time columns, statistics, errors."""

from __future__ import annotations

import pytest
import torch

from mpnode.core.testing import MLPField

torchode = pytest.importorskip("torchode")

from mpnode.bench.peers import torchode_odeint  # noqa: E402


def _field_and_state(batch: int = 6, dim: int = 3):
    torch.manual_seed(0)
    return MLPField(dim, 16), torch.randn(batch, dim)


def test_adaptive_solution_matches_torchdiffeq_at_every_output_time():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    func, y0 = _field_and_state()
    t = torch.linspace(0, 1, 5)
    stats: dict = {}
    ours = torchode_odeint(func, y0, t, rtol=1e-6, atol=1e-8, options={"stats": stats})
    ref = torchdiffeq.odeint(func, y0, t, method="dopri5", rtol=1e-6, atol=1e-8)
    assert ours.shape == (5, 6, 3)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert stats["accepted_steps"] >= 1 and stats["steps"] >= stats["accepted_steps"] and stats["nfe"] > 0


def test_fixed_steps_equal_mpnode_on_the_same_grid():
    from mpnode.core import get_tableau, odeint

    func, y0 = _field_and_state()
    t = torch.tensor([0.0, 1.0])
    stats: dict = {}
    ours = torchode_odeint(func, y0, t, method="dopri5", options={"step_size": 0.125, "stats": stats})
    ref = odeint(func, y0, t, method=get_tableau("dopri5").fixed_grid(), options={"step_size": 0.125})
    assert stats["accepted_steps"] == 8
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_the_field_gets_one_time_per_sample_and_gradients_flow():
    func, y0 = _field_and_state()
    seen = []
    out = torchode_odeint(lambda t, y: seen.append(t.shape) or func(t, y), y0, torch.tensor([0.0, 1.0]),
                          method="tsit5", rtol=1e-5, atol=1e-7)
    assert set(seen) == {(6, 1)}
    out[-1].square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in func.parameters())


@pytest.mark.parametrize("bad, match", [
    (dict(y0=torch.zeros(2, 3, 4)), "shape \\(batch, features\\)"),
    (dict(t=torch.tensor([1.0, 0.0])), "increasing"),
    (dict(method="rk4"), "choose one of"),
    (dict(options={"first_step": 0.1}), "unknown options"),
    (dict(options={"stats": []}), "must be a dict"),
])
def test_bad_inputs_raise_with_the_fix(bad, match):
    func, y0 = _field_and_state()
    kwargs = dict(y0=y0, t=torch.tensor([0.0, 1.0]), method="dopri5", options=None)
    kwargs.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        torchode_odeint(func, kwargs.pop("y0"), kwargs.pop("t"), **kwargs)


def test_a_stopped_solve_raises_with_torchodes_status():
    func, y0 = _field_and_state()
    with pytest.raises(RuntimeError, match="REACHED_MAX_STEPS"):
        torchode_odeint(func, y0, torch.tensor([0.0, 1.0]), rtol=1e-9, atol=1e-11, options={"max_num_steps": 2})
