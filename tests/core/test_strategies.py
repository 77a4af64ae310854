"""Adjoint strategies: the same gradients, the memory each holds, the choice under a budget, flat low-precision
error."""

from __future__ import annotations

import pytest
import torch

from mpnode.core import (
    AdjointScaling,
    AutoAdjoint,
    DirectAdjoint,
    RecomputeAdjoint,
    ScalingPass,
    SegmentedAdjoint,
    SolverStats,
    odeint,
    odeint_event,
)
from mpnode.core.testing import LinearODE, MLPField

F64 = torch.float64
STRATEGIES = {
    "recompute": RecomputeAdjoint,
    "direct": DirectAdjoint,
    "segmented": SegmentedAdjoint,
    "segmented-3": lambda: SegmentedAdjoint(checkpoints=3),
    "auto-large": lambda: AutoAdjoint(budget_bytes=2**30),
    "auto-small": lambda: AutoAdjoint(budget_bytes=1000),
}
CASES = {
    "rk4 step_size": dict(method="rk4", options={"step_size": 0.05}),
    "rk4 cubic outputs": dict(method="rk4", options={"step_size": 0.3, "interp": "cubic"}),
    "dopri5": dict(method="dopri5", rtol=1e-6, atol=1e-8),
    "fehlberg2 (carried first stage)": dict(method="fehlberg2", rtol=1e-4, atol=1e-6),
}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _grads(strategy, case, direction=1, tuple_state=False):
    torch.manual_seed(0)
    field = MLPField(dim=4, width=16).double()
    y0 = torch.randn(3, 4, dtype=F64, requires_grad=True)
    t = torch.linspace(0, 2, 7, dtype=F64)
    t = (t if direction > 0 else t.flip(0)).requires_grad_(True)
    stats = SolverStats()
    kwargs = dict(CASES[case])
    kwargs["options"] = {**kwargs.get("options", {}), "stats": stats}
    if tuple_state:
        s0 = torch.tensor([1.0, -0.5, 0.2], dtype=F64, requires_grad=True)
        out = odeint(lambda tt, st: (field(tt, st[0]), -st[1] * st[0].pow(2).sum(-1)), (y0, s0), t, adjoint=strategy,
                     adjoint_params=tuple(field.parameters()), **kwargs)
        loss = sum(o.pow(2).sum() for o in out)
        inputs = (y0, s0, t, *field.parameters())
    else:
        loss = odeint(field, y0, t, adjoint=strategy, **kwargs).pow(2).sum()
        inputs = (y0, t, *field.parameters())
    return torch.autograd.grad(loss, inputs), stats


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "recompute"])
def test_every_strategy_gives_the_recompute_gradients(name, case):
    reference, _ = _grads(RecomputeAdjoint(), case)
    grads, stats = _grads(STRATEGIES[name](), case)
    for a, b in zip(grads, reference):
        assert _rel(a, b) <= 1e-12
    if name.startswith("auto"):
        assert stats.last_adjoint in ("direct", "recompute", "segmented")
    else:
        assert stats.last_adjoint == STRATEGIES[name]().name


@pytest.mark.parametrize("name", ["direct", "segmented-3"])
def test_strategies_agree_on_tuple_states_and_decreasing_time(name):
    for direction in (1, -1):
        reference, _ = _grads(RecomputeAdjoint(), "dopri5", direction, tuple_state=True)
        grads, _ = _grads(STRATEGIES[name](), "dopri5", direction, tuple_state=True)
        for a, b in zip(grads, reference):
            assert _rel(a, b) <= 1e-12


N_STEPS, BATCH, DIM = 64, 32, 4


def _held(strategy, saved_bytes, precision="float32", amp=None):
    torch.manual_seed(0)
    field = MLPField(dim=DIM, width=16)
    y0 = torch.randn(BATCH, DIM, requires_grad=True)
    t = torch.linspace(0, 1, N_STEPS + 1)
    stats = SolverStats()
    with saved_bytes(exclude=field.parameters()) as meter:
        out = odeint(field, y0, t, method="rk4", adjoint=strategy, options={"stats": stats})
    out[-1].sum().backward()
    return meter.bytes, stats


def test_memory_held_by_each_strategy(saved_bytes):
    row = BATCH * DIM * 4
    recompute, _ = _held(RecomputeAdjoint(), saved_bytes)
    segmented, _ = _held(SegmentedAdjoint(), saved_bytes)  # sqrt(64) = 8 checkpoints
    segmented4, _ = _held(SegmentedAdjoint(checkpoints=4), saved_bytes)
    direct, _ = _held(DirectAdjoint(), saved_bytes)
    assert recompute == N_STEPS * row
    assert segmented == 8 * row and segmented4 == 4 * row
    assert direct > 4 * recompute  # every stage's activations


def test_auto_picks_the_fastest_strategy_that_fits(saved_bytes):
    row = BATCH * DIM * 4
    direct_bytes, _ = _held(DirectAdjoint(), saved_bytes)
    recompute_bytes, _ = _held(RecomputeAdjoint(), saved_bytes)
    budgets = ((direct_bytes + 1, "direct"), (direct_bytes // 2, "recompute"), (N_STEPS * row // 4, "segmented"))
    for budget, expected in budgets:
        held, stats = _held(AutoAdjoint(budget_bytes=budget), saved_bytes)
        assert stats.last_adjoint == expected
        assert held <= budget  # the graphs a fallback dropped are no longer held, so not counted
        if expected == "direct":
            assert held == direct_bytes
        elif expected == "recompute":
            assert held == recompute_bytes
        else:
            kept, _ = _held(SegmentedAdjoint(checkpoints=budget // row), saved_bytes)
            assert held == kept


def test_auto_does_not_count_a_rejected_step_against_its_budget(saved_bytes):
    """A rejected attempt's graph is dropped at once: with a budget of exactly what direct keeps, auto stays direct."""
    def solve(strategy):
        torch.manual_seed(0)
        field = MLPField(dim=DIM, width=16)
        y0 = torch.randn(BATCH, DIM, requires_grad=True)
        stats = SolverStats()
        with saved_bytes(exclude=field.parameters()) as meter:
            out = odeint(field, y0, torch.tensor([0.0, 4.0]), rtol=1e-7, atol=1e-9, adjoint=strategy,
                         options={"stats": stats})
        assert out.grad_fn is not None  # the meter counts what the output's graph holds
        return meter.bytes, stats

    direct, stats = solve(DirectAdjoint())
    assert stats.rejected_steps > 0
    auto, stats = solve(AutoAdjoint(budget_bytes=direct))
    assert stats.last_adjoint == "direct" and auto == direct


def test_auto_falls_back_during_an_adaptive_solve():
    torch.manual_seed(0)
    field = MLPField(dim=DIM, width=16)
    y0 = torch.randn(BATCH, DIM, requires_grad=True)
    stats = SolverStats()
    out = odeint(field, y0, torch.tensor([0.0, 4.0]), rtol=1e-7, atol=1e-9,
                 adjoint=AutoAdjoint(budget_bytes=5 * BATCH * DIM * 4), options={"stats": stats})
    (g_auto,) = torch.autograd.grad(out[-1].sum(), (y0,))
    out = odeint(field, y0, torch.tensor([0.0, 4.0]), rtol=1e-7, atol=1e-9)
    (g_ref,) = torch.autograd.grad(out[-1].sum(), (y0,))
    assert stats.steps > 10 and stats.last_adjoint == "segmented"
    assert _rel(g_auto, g_ref) <= 1e-6


def test_segmented_keeps_at_most_its_budget_for_adaptive_steps(saved_bytes):
    torch.manual_seed(0)
    field = MLPField(dim=DIM, width=16)
    y0 = torch.randn(BATCH, DIM, requires_grad=True)
    stats = SolverStats()
    with saved_bytes() as meter:
        out = odeint(field, y0, torch.tensor([0.0, 4.0]), rtol=1e-7, atol=1e-9,
                     adjoint=SegmentedAdjoint(checkpoints=5), options={"stats": stats})
    assert stats.steps > 10 and 0 < meter.bytes <= 5 * BATCH * DIM * 4, out.shape  # (while ``out`` keeps the graph)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_direct_strategy_error_stays_flat_in_the_step_count(precision, amp, device):
    problem = LinearODE.random(dim=8, batch=4, seed=0)
    errors = {}
    for n in (32, 2048):
        with amp(precision):
            errors[n] = problem.errors(problem.solve(odeint, n, device=device, adjoint=DirectAdjoint(scaling=False)))
    bound = {"bfloat16": 5e-3, "float16": 1e-3}[precision]
    assert errors[2048]["dA"] <= bound and errors[2048]["dA"] <= 1.5 * errors[32]["dA"], errors


@pytest.mark.filterwarnings("ignore::mpnode.core.MixedPrecisionToleranceWarning")  # steps within the field's noise
@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("method", ["rk4", "fehlberg2", "dopri5", "bosh3", "tsit5", "dopri8"])
def test_direct_strategy_under_autocast_gives_the_recompute_gradients(method, precision, amp, device):
    """One weight cast per solve, as in the recompute backward: the direct and segmented strategies' VJPs are the
    recompute strategy's (float32 checkpoints, so all start each step from the same state) bit for bit.

    First-same-as-last methods (dopri5, bosh3, tsit5, dopri8) included: a step's reused first stage enters every
    strategy's step graph as an input whose gradient goes to the previous step's last stage (the recompute strategy
    differentiated it in its own step before: the same sum grouped differently, 2e-3 apart in bfloat16, 1e-7 in
    float32)."""
    torch.manual_seed(0)
    field = MLPField(dim=4, width=32, hidden_layers=2).to(device)
    y0 = torch.randn(8, 4, device=device, requires_grad=True)
    t = torch.linspace(0, 4, 3, device=device)
    how = {"step_size": 0.25} if method == "rk4" else {}  # adaptive: rtol=1e-5, atol=1e-6

    def grads(strategy):
        stats = SolverStats()
        with amp(precision):
            out = odeint(field, y0, t, method=method, adjoint=strategy, rtol=1e-5, atol=1e-6,
                         options={**how, "stats": stats})
        assert stats.steps >= 4
        return torch.autograd.grad(out.pow(2).sum(), (y0, *field.parameters()))

    recompute = grads(RecomputeAdjoint(checkpoint_dtype=torch.float32, scaling=False))
    for strategy in (DirectAdjoint(scaling=False), SegmentedAdjoint(checkpoints=3, checkpoint_dtype=torch.float32,
                                                                    scaling=False)):
        for a, b in zip(grads(strategy), recompute, strict=True):
            assert torch.equal(a, b), (strategy, float((a - b).abs().max()))


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_direct_strategy_holds_one_low_precision_copy_of_each_weight(precision, amp, device):
    """The kept graphs share one autocast copy per weight, not one per evaluation (4N for RK4)."""
    torch.manual_seed(0)
    field = MLPField(dim=4, width=32, hidden_layers=2).to(device)
    y0 = torch.randn(8, 4, device=device)
    low = {"bfloat16": torch.bfloat16, "float16": torch.float16}[precision]
    shapes = {tuple(p.shape) for p in field.parameters() if p.dim() == 2}
    copies: dict[tuple, set] = {s: set() for s in shapes}

    def pack(x):
        for shape in {tuple(x.shape), tuple(x.shape[::-1])} & shapes:  # linear saves the weight or its transpose
            if x.dtype == low:
                copies[shape].add(x.untyped_storage().data_ptr())
        return x

    with amp(precision), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = odeint(field, y0, torch.tensor([0.0, 1.0], device=device), method="rk4", options={"step_size": 0.125},
                     adjoint=DirectAdjoint(scaling=False))
    out[-1].pow(2).sum().backward()
    assert all(len(c) == 1 for c in copies.values()), {s: len(c) for s, c in copies.items()}


def test_strategy_arguments_are_validated():
    with pytest.raises(ValueError, match="checkpoints"):
        SegmentedAdjoint(checkpoints=0)
    with pytest.raises(ValueError, match="budget_bytes"):
        AutoAdjoint(budget_bytes=-1)
    with pytest.raises(TypeError, match="checkpoint_dtype"):
        DirectAdjoint(checkpoint_dtype="bf16")
    with pytest.raises(TypeError, match="adjoint must be"):
        odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), adjoint="direct")
    with pytest.raises(ValueError, match="shorthands"):
        odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), adjoint=DirectAdjoint(), scaler=False)


def test_direct_strategy_works_with_a_scaling_policy_that_redoes_blocks():
    """A scaling policy that rejects every block once: kept graphs must survive the redo (retained)."""

    class RejectOnce(AdjointScaling):
        def __init__(self):
            self.rejected = set()

        def begin(self, lam, n_steps):
            return RejectOncePass(self)

    class RejectOncePass(ScalingPass):
        block_size = 4

        def __init__(self, policy):
            self.policy = policy

        def scale(self, lam):
            return None

        def end_block(self, lo, hi):
            if (lo, hi) in self.policy.rejected:
                return True
            self.policy.rejected.add((lo, hi))
            return False

    reference, _ = _grads(RecomputeAdjoint(), "rk4 step_size")
    grads, stats = _grads(DirectAdjoint(scaling=RejectOnce()), "rk4 step_size")
    assert stats.retries == 40  # each of the 40 steps redone once
    for a, b in zip(grads, reference):
        assert _rel(a, b) <= 1e-12


def test_auto_keeps_the_callers_saved_tensor_hooks_working():
    """The budget meter passes every saved tensor on to the hooks the caller installed (they do not nest)."""
    seen = {"direct": 0, "auto": 0}

    def solve(strategy, key):
        def pack(x):
            seen[key] += 1
            return x

        torch.manual_seed(0)
        field = MLPField(dim=DIM, width=16)
        y0 = torch.randn(BATCH, DIM, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = odeint(field, y0, torch.linspace(0, 1, 9), method="rk4", adjoint=strategy)
        return torch.autograd.grad(out[-1].sum(), (y0,))[0]

    g_direct = solve(DirectAdjoint(), "direct")
    g_auto = solve(AutoAdjoint(budget_bytes=2**30), "auto")
    assert seen["auto"] == seen["direct"] > 0
    assert torch.equal(g_auto, g_direct)


EVENT_CASES = {
    "rk4 linear": dict(method="rk4", options={"step_size": 0.05}),
    "rk4 cubic": dict(method="rk4", options={"step_size": 0.05, "interp": "cubic"}),
    "dopri5": dict(method="dopri5", rtol=1e-8, atol=1e-10),
}


def _event_grads(strategy, case):
    """Gradients of a solve until ``y_1 = -0.2`` w.r.t. ``y0``, ``t0`` and the field's parameters (odeint_event)."""
    torch.manual_seed(0)
    field = MLPField(dim=2, width=8).double()
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    t0 = torch.tensor(0.0, dtype=F64, requires_grad=True)
    event_t, state = odeint_event(lambda t, y: field(t, y) - torch.tensor([0.0, 1.0], dtype=F64), y0, t0,
                                  event_fn=lambda t, y: y[1] + 0.2, adjoint=strategy, **EVENT_CASES[case])
    loss = event_t + state[-1].pow(2).sum()
    return torch.autograd.grad(loss, (y0, t0, *field.parameters()))


@pytest.mark.parametrize("case", list(EVENT_CASES))
@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "recompute"])
def test_every_strategy_gives_the_recompute_gradients_until_an_event(name, case):
    """The fixed-step event march hands its steps to the strategy like any other march (kept graphs included)."""
    reference = _event_grads(RecomputeAdjoint(), case)
    for a, b in zip(_event_grads(STRATEGIES[name](), case), reference):
        assert _rel(a, b) <= 1e-12
