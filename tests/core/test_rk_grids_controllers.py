"""The small parts on their own: one RK step with a recording field, the grid rules, the step-size controllers."""

from __future__ import annotations

import math

import pytest
import torch

from mpnode.core import TABLEAUX, IntegralController, PIController
from mpnode.core.contracts import Nudge
from mpnode.core.grids import ConstructedGrid, OutputTimesGrid, StepSizeGrid
from mpnode.core.rk import StagePerturbation, rk_stages, stage_time_table, traced_stage_times
from mpnode.core.state import FlatState
from mpnode.core.tolerance import Tolerance, initial_step

F64 = torch.float64


class RecordingField:
    """Returns a fixed, distinct vector per call and records the (time, input) it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, torch.Tensor]] = []

    def __call__(self, t, y):
        self.calls.append((float(t), y.clone()))
        return torch.full_like(y, float(len(self.calls)))  # k_i = i (1-based) in every entry


@pytest.mark.parametrize("name", list(TABLEAUX))
@pytest.mark.parametrize("traced", [False, True])
def test_one_step_evaluates_the_tableau_stage_by_stage(name, traced):
    tab = TABLEAUX[name]
    t0, t1 = 0.25, 0.75
    h = t1 - t0
    y = torch.tensor([1.0, -2.0], dtype=F64)
    f = RecordingField()
    if traced:
        times = traced_stage_times(tab, torch.tensor(t0, dtype=F64), torch.tensor(t1, dtype=F64), F64)
        step = torch.tensor(h, dtype=F64)
    else:
        times = stage_time_table(tab, torch.tensor([t0, t1], dtype=F64), F64)[0]
        step = h
    stages = rk_stages(tab, f, y, step, times)
    assert len(f.calls) == tab.stages
    for i, (t_i, y_i) in enumerate(f.calls):
        assert t_i == pytest.approx(t0 + tab.c[i] * h, abs=1e-15)
        expected = y + h * sum(a * (j + 1) for j, a in enumerate(tab.a[i]))  # k_j = j+1
        assert torch.allclose(y_i, expected, rtol=0, atol=1e-13)
    assert [float(k[0]) for k in stages.ks] == [float(i + 1) for i in range(tab.stages)]


def test_a_given_first_stage_is_not_evaluated():
    tab = TABLEAUX["dopri5"]
    f = RecordingField()
    times = stage_time_table(tab, torch.tensor([0.0, 0.1], dtype=F64), F64)[0]
    first = torch.full((2,), 100.0, dtype=F64)
    stages = rk_stages(tab, f, torch.zeros(2, dtype=F64), 0.1, times, first_stage=first)
    assert len(f.calls) == tab.stages - 1 and stages.ks[0] is first
    assert torch.allclose(f.calls[0][1], torch.full((2,), 0.1 * 0.2 * 100.0, dtype=F64))  # Y_2 = y + h a_21 k_1


def test_perturbation_moves_stage_times_to_the_neighbouring_float():
    tab = TABLEAUX["rk4"]
    grid = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float32)
    plain = stage_time_table(tab, grid, torch.float32)
    nudged = stage_time_table(tab, grid, torch.float32,
                              StagePerturbation(first=Nudge.NEXT, end=Nudge.PREV, direction=1))
    for row_p, row_n in zip(plain, nudged):
        assert row_n[0] == torch.nextafter(row_p[0], torch.tensor(math.inf))
        assert row_n[3] == torch.nextafter(row_p[3], torch.tensor(-math.inf))
        assert row_n[1] == row_p[1] and row_n[2] == row_p[2]
    backwards = stage_time_table(tab, grid.flip(0), torch.float32,
                                 StagePerturbation(first=Nudge.NEXT, end=Nudge.PREV, direction=-1))
    assert backwards[0][0] < 1.0 and backwards[0][3] > 0.5  # Nudge.NEXT follows the direction of time


def test_output_times_grid_is_t_itself():
    t = torch.linspace(0, 1, 5)
    grid, _host = OutputTimesGrid().build(None, None, t, t)
    assert grid is t


@pytest.mark.parametrize("t_end", [1.0, -1.0])
def test_step_size_grid_follows_torchdiffeqs_rule(t_end):
    t = torch.tensor([0.0, 0.3, t_end], dtype=F64)
    grid, _host = StepSizeGrid(0.3).build(None, torch.zeros(2, dtype=F64), t, t)
    n = math.ceil(1.0 / 0.3 + 1)
    assert grid.shape[0] == n and float(grid[-1]) == t_end
    assert torch.allclose(grid[:-1], torch.arange(n - 1, dtype=F64) * 0.3 * math.copysign(1, t_end))


def test_step_size_grid_refuses_sizes_that_would_not_fit_in_memory():
    t = torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match="steps"):
        StepSizeGrid(1e-12).build(None, torch.zeros(2), t, t)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), True, "x"])
def test_step_size_grid_validates_its_option(bad):
    with pytest.raises((TypeError, ValueError), match="step_size"):
        StepSizeGrid(bad)


def test_constructed_grid_is_checked():
    t = torch.tensor([0.0, 1.0])
    with pytest.raises(TypeError, match="callable"):
        ConstructedGrid(3)
    with pytest.raises(ValueError, match="end at t\\[-1\\]"):
        ConstructedGrid(lambda f, y0, tt: torch.tensor([0.0, 0.5])).build(None, None, t, t)


def test_integral_controller_is_torchdiffeqs_rule():
    c = IntegralController()
    assert c.adapt(0.1, 0.0, True, 5, None)[0] == pytest.approx(1.0)  # r = 0: ifactor
    assert c.adapt(0.1, 0.5, True, 5, None)[0] == pytest.approx(0.1 * min(10, 0.9 / 0.5 ** 0.2))
    assert c.adapt(0.1, 0.99, True, 5, None)[0] == pytest.approx(0.1)  # accepted: never shrinks
    assert c.adapt(0.1, 4.0, False, 5, None)[0] == pytest.approx(0.1 * 0.9 / 4.0 ** 0.2)
    assert c.adapt(0.1, 1e9, False, 5, None)[0] == pytest.approx(0.02)  # dfactor bounds the shrink


def test_pi_controller_uses_the_previous_ratio():
    c = PIController(beta1=0.7, beta2=0.4)
    assert c.init() is None  # no accepted ratio yet
    first, state = c.adapt(0.1, 0.5, True, 5, c.init())
    with_memory = c.adapt(0.1, 0.5, True, 5, 0.25)[0]
    assert first == pytest.approx(0.1 * 0.9 * 0.5 ** (-0.14))
    assert with_memory == pytest.approx(first * 0.25 ** 0.08)  # a smaller past error damps the growth
    assert state == 0.5  # an accepted ratio is remembered ...
    rejected, kept = c.adapt(0.1, 100.0, False, 5, 0.5)
    assert rejected == pytest.approx(0.1 * max(0.2, 0.9 * 100.0 ** -0.2))
    assert kept == 0.5  # ... a rejected one is not


@pytest.mark.parametrize("kwargs, message", [
    (dict(safety=1.5), "safety"), (dict(ifactor=0.5), "ifactor"), (dict(dfactor=0.0), "dfactor"),
    (dict(safety="x"), "safety"),
])
def test_controllers_validate_their_settings(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        IntegralController(**kwargs)


def test_tolerance_ratio_is_torchdiffeqs_rms_of_scaled_error():
    layout = FlatState(torch.zeros(2, 2, dtype=F64))
    tol = Tolerance(1e-3, 1e-6, layout, None)
    y0 = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=F64)
    y1 = torch.tensor([1.5, -1.0, 0.25, 1e-3], dtype=F64)
    err = torch.tensor([1e-3, 2e-3, 1e-4, 0.0], dtype=F64)
    scale = 1e-6 + 1e-3 * torch.max(y0.abs(), y1.abs())
    assert float(tol.error_ratio(err, y0, y1)) == pytest.approx(float((err / scale).pow(2).mean().sqrt()))
    noise = torch.tensor([1e-4, 0.0, 3e-4, 1e-9], dtype=F64)
    both = tol.noisy_error_ratios(err, y0, y1, noise).reshape(-1).tolist()  # (2, 1): one part
    rms = [float((x / scale).pow(2).mean().sqrt()) for x in (err, noise)]
    assert both == pytest.approx(rms)


def test_tolerance_accepts_per_element_and_per_part_values_and_refuses_bad_ones():
    layout = FlatState((torch.zeros(3, dtype=F64), torch.zeros(2, 2, dtype=F64)))
    tol = Tolerance((1e-3, torch.tensor([[1e-4], [1e-5]], dtype=F64)), 1e-8, layout, None)
    assert tol.rtol.tolist() == pytest.approx([1e-3] * 3 + [1e-4, 1e-4, 1e-5, 1e-5])
    for bad, message in ((-1.0, "non-negative"), (float("nan"), "finite"), (torch.ones(3, requires_grad=True), "grad")):
        with pytest.raises((TypeError, ValueError), match=message):
            Tolerance(bad, 1e-8, FlatState(torch.zeros(3)), None)


def test_initial_step_is_hairers_rule():
    layout = FlatState(torch.zeros(2, dtype=F64))
    tol = Tolerance(1e-6, 1e-9, layout, None)
    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    f = lambda t, y: -3.0 * y  # noqa: E731
    h = initial_step(f, 0.0, 1, y0, f(0.0, y0), 5, tol, F64)
    s = 1e-9 + 1e-6 * y0.abs()
    d0, d1 = float((y0 / s).pow(2).mean().sqrt()), float((3 * y0 / s).pow(2).mean().sqrt())
    h0 = 0.01 * d0 / d1
    d2 = float(((f(0, y0 + h0 * f(0, y0)) - f(0, y0)) / s).pow(2).mean().sqrt()) / h0
    assert h == pytest.approx(min(100 * h0, (0.01 / max(d1, d2)) ** 0.2))
