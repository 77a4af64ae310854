"""The CNF of examples/cnf8g.py on adaptive steps under autocast: as accurate as torchdiffeq without the cast cache.

The flow's field regenerates its weights from ``t`` at every stage (a hypernetwork), so each stage carries fresh
rounding of those weights: its error estimate's noise reaches up to 1.8x the ``u |h| sum |b_err| |k|`` bound that the
acceptance test uses (measured; 0.2-0.4x for a tanh MLP), and at tight tolerances mpnode then shrinks the step as
torchdiffeq does rather than taking float32's steps (docs/solvers.md).  The accuracy target holds; the steps are at
most torchdiffeq's.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mpnode.core import MixedPrecisionToleranceWarning, SolverStats, odeint
from mpnode.models.cnf import CNF, HyperNetField, standard_normal_log_prob
from mpnode.models.toy_data import sample

torchdiffeq = pytest.importorskip("torchdiffeq")

LOW = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _cnf() -> CNF:
    """cnf8g's model at width 16 with its hypernetwork's output scaled by 8 (a flow that needs 3-9 dopri5 steps in
    float32, as a trained one does, instead of the near-identity of the initialisation)."""
    torch.manual_seed(0)
    cnf = CNF(HyperNetField(width=16)).double()
    with torch.no_grad():
        cnf.field.hyper[-1].weight.mul_(8.0)
        cnf.field.hyper[-1].bias.mul_(8.0)
    return cnf


def _solve(precision, tol, solver="mpnode"):
    """``(z(T), log-density part)`` flattened and dL/dθ (``L = -mean log p(x)``), as float64, and the accepted steps."""
    dtype = torch.float64 if precision == "float64" else torch.float32
    cnf = _cnf().to(dtype)
    x = sample("8gaussians", 32, torch.Generator().manual_seed(1)).to(dtype)
    state = (x, torch.zeros(32, dtype=dtype))
    t = torch.tensor([0.0, 1.0], dtype=dtype)
    amp = LOW.get(precision)
    ctx = torch.autocast("cpu", dtype=amp, cache_enabled=False) if amp else torch.autocast("cpu", enabled=False)
    stats, accepted = SolverStats(), [0]

    class Counted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cnf = cnf

        def forward(self, t, y):
            return self.cnf(t, y)

        def callback_accept_step(self, t0, y0, dt):
            accepted[0] += 1

    func = Counted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixedPrecisionToleranceWarning)
        with ctx:
            if solver == "mpnode":
                z, logp = odeint(func, state, t, method="dopri5", rtol=tol, atol=tol, options={"stats": stats})
            else:
                z, logp = torchdiffeq.odeint(func, state, t, method="dopri5", rtol=tol, atol=tol)
            loss = -(standard_normal_log_prob(z[-1]) - logp[-1]).float().mean()
    grads = torch.autograd.grad(loss, list(cnf.parameters()))
    y = torch.cat([z[-1].reshape(-1), logp[-1].reshape(-1)]).detach().double()
    return y, torch.cat([g.reshape(-1) for g in grads]).double(), stats.steps if solver == "mpnode" else accepted[0]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# Measured (CPU, torch 2.14.1): mpnode's y(T) and dL/dθ errors / torchdiffeq-nocache's; accepted steps of float32,
# torchdiffeq-nocache, mpnode:
#   rtol  bfloat16                     float16
#   1e-3  1.07 1.08   3 / 4 / 4        1.02 0.95   3 / 3 / 3
#   1e-5  1.04 1.03   4 / 16 / 15      0.94 0.68   4 / 7 / 7
# Asserted: error ratios <= 2 (the target), steps <= torchdiffeq's (the 1.25x float32 target is not met here).
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_cnf_on_adaptive_steps_is_as_accurate_as_torchdiffeq_without_the_cast_cache(precision):
    y_ref, g_ref, _ = _solve("float64", 1e-12)
    for tol in (1e-3, 1e-5):
        y_td, g_td, steps_td = _solve(precision, tol, solver="torchdiffeq")
        y_mp, g_mp, steps_mp = _solve(precision, tol)
        ratios = (_rel(y_mp, y_ref) / _rel(y_td, y_ref), _rel(g_mp, g_ref) / _rel(g_td, g_ref))
        assert max(ratios) <= 2 and steps_mp <= steps_td, (tol, ratios, steps_mp, steps_td)
