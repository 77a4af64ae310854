"""A new step-size controller is one class: a test-only PID controller plugs into the adaptive march unchanged.

It subclasses ``mpnode.core.StepSizeController``, keeps the last two accepted error ratios in its own state
(``init`` / ``adapt`` return it; nothing is kept on the controller object) and is passed as
``options={"controller": ...}``.
"""

from __future__ import annotations

import math

import pytest
import torch

from mpnode.core import PIController, SolverStats, StepSizeController, odeint

F64 = torch.float64


class PIDController(StepSizeController):
    """Test-only: proportional-integral-derivative control on the last three accepted error ratios.

    After an accepted step ``factor = safety * r_n^(-b1/p) * r_{n-1}^(-b2/p) * r_{n-2}^(-b3/p)`` (missing past
    ratios count as 1), clipped to ``[dfactor, ifactor]``; after a rejection ``safety * r^(-1/p)``, at least
    ``dfactor``.  State: ``(r_{n-1}, r_{n-2})`` of the accepted steps.
    """

    def __init__(self, b1: float = 0.6, b2: float = -0.2, b3: float = -0.05, safety: float = 0.9,
                 ifactor: float = 5.0, dfactor: float = 0.2) -> None:
        self.b1, self.b2, self.b3 = b1, b2, b3
        self.safety, self.ifactor, self.dfactor = safety, ifactor, dfactor
        self.states_seen: list[tuple[float, float]] = []  # test instrumentation only: what adapt received

    def init(self) -> tuple[float, float]:
        return (1.0, 1.0)

    def adapt(self, h: float, ratio: float, accepted: bool, order: int,
              state: tuple[float, float]) -> tuple[float, tuple[float, float]]:
        self.states_seen.append(state)
        if not accepted:
            return h * max(self.dfactor, self.safety * ratio ** (-1.0 / order)), state
        r = max(ratio, 1e-10)
        r1, r2 = state
        factor = self.safety * r ** (-self.b1 / order) * r1 ** (-self.b2 / order) * r2 ** (-self.b3 / order)
        return h * min(self.ifactor, max(self.dfactor, factor)), (r, r1)


def _oscillator(t, y):
    return torch.stack([y[1], -y[0]])


def _solve(controller, stats=None):
    y0 = torch.tensor([1.0, 0.0], dtype=F64, requires_grad=True)
    t = torch.linspace(0.0, 6.0, 4, dtype=F64)
    options = {"controller": controller, **({"stats": stats} if stats is not None else {})}
    out = odeint(_oscillator, y0, t, rtol=1e-8, atol=1e-10, options=options)
    return y0, t, out


def test_a_controller_with_its_own_state_plugs_into_the_adaptive_march():
    controller = PIDController()
    stats = SolverStats()
    y0, t, out = _solve(controller, stats)
    exact = torch.stack([torch.cos(t), -torch.sin(t)], dim=1)
    assert torch.allclose(out, exact, rtol=0, atol=1e-7)
    out[-1, 0].backward()
    assert torch.allclose(y0.grad, torch.tensor([math.cos(6.0), math.sin(6.0)], dtype=F64), atol=1e-7)
    # its state travelled through the march: init's value first, then the accepted ratios it returned
    assert controller.states_seen[0] == (1.0, 1.0)
    assert any(s != (1.0, 1.0) for s in controller.states_seen)
    assert len(controller.states_seen) == stats.steps + stats.rejected_steps  # one adapt per attempt
    # and it is really what sized the steps
    pi_stats = SolverStats()
    _solve(PIController(), pi_stats)
    assert stats.last_grid != pi_stats.last_grid


def test_one_controller_instance_serves_many_solves_alike():
    """The state lives in the march, not on the controller: a reused instance steps as a fresh one."""
    shared, first, second, fresh = PIDController(), SolverStats(), SolverStats(), SolverStats()
    _solve(shared, first)
    _solve(shared, second)
    _solve(PIDController(), fresh)
    assert first.last_grid == second.last_grid == fresh.last_grid


def test_a_controller_without_adapt_is_refused_when_made():
    class Incomplete(StepSizeController):
        pass

    with pytest.raises(TypeError, match="adapt"):
        Incomplete()


class _Returns(StepSizeController):
    """Test-only: a controller whose ``adapt`` returns ``out(h)``, breaking its contract."""

    def __init__(self, out) -> None:
        self.out = out

    def adapt(self, h, ratio, accepted, order, state):
        return self.out(h)


@pytest.mark.parametrize("out, error, match", [
    (lambda h: (math.inf, None), ValueError, r"_Returns.adapt returned the next step size inf .*positive and finite"),
    (lambda h: (math.nan, None), ValueError, r"_Returns.adapt returned the next step size nan"),
    (lambda h: (-h, None), ValueError, r"_Returns.adapt returned the next step size -0\.\d+.*magnitude"),
    (lambda h: (0.0, None), ValueError, r"_Returns.adapt returned the next step size 0.0"),
    (lambda h: h / 2, TypeError, r"_Returns.adapt must return \(next step size, state\), a 2-tuple, got float"),
    (lambda h: (h / 2, None, 0), TypeError, r"2-tuple, got a tuple of 3"),
    (lambda h: (torch.tensor(h / 2), None), TypeError, r"next step size as a host float.*got Tensor"),
    (lambda h: ("0.1", None), TypeError, r"host float.*got str"),
], ids=["inf", "nan", "negative", "zero", "bare-float", "3-tuple", "tensor", "str"])
def test_a_controller_breaking_its_contract_is_named(out, error, match):
    """main: inf/NaN/-h surfaced as 'the step size underflowed ... stiff', a bare float or a 3-tuple as Python's
    unpacking errors; the error now names the controller class and what adapt must return."""
    with pytest.raises(error, match=match):
        odeint(lambda t, y: -y, torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
               options={"controller": _Returns(out)})


def test_a_controller_may_return_numpy_floats():
    np = pytest.importorskip("numpy")
    y = odeint(lambda t, y: -y, torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-6, atol=1e-8,
               options={"controller": _Returns(lambda h: (np.float32(min(2 * h, 0.05)), None))})
    assert torch.allclose(y[-1], torch.full((3,), math.exp(-1.0), dtype=F64), rtol=1e-5)
