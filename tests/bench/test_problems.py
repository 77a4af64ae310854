"""The benchmark problems compute what they claim (analytic gradients and traces vs autograd)."""

from __future__ import annotations

import pytest
import torch

from mpnode.bench.problems import PROBLEMS, CNFField, OTFlowField, build


def test_otflow_gradient_and_trace_match_autograd():
    torch.manual_seed(1)
    f = OTFlowField(d=5, m=12).double()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    grad, trace = f.grad_and_trace(x, t)
    gx, gt = torch.autograd.grad(f.potential(x, t).sum(), (x, t), create_graph=True)
    assert torch.allclose(grad[:, :5], gx, atol=1e-12)
    assert torch.allclose(grad[:, 5].sum(), gt, atol=1e-12)
    hess_diag = torch.stack([torch.autograd.grad(gx[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(5)], -1)
    assert torch.allclose(trace, hess_diag.sum(-1), atol=1e-12)


def test_cnf_trace_is_the_exact_jacobian_trace():
    torch.manual_seed(2)
    f = CNFField(width=16).double()
    z = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    dz, minus_trace = f(torch.tensor(0.7, dtype=torch.float64), (z, torch.zeros(6, 1, dtype=torch.float64)))
    jac_diag = torch.stack([torch.autograd.grad(dz[:, i].sum(), z, retain_graph=True)[0][:, i] for i in range(2)], -1)
    assert torch.allclose(-minus_trace.squeeze(-1), jac_diag.sum(-1), atol=1e-12)


@pytest.mark.parametrize(
    "problem, sizes, state_numel",
    [
        ("mlp", {"batch": 3, "dim": 4, "width": 5}, 12),
        ("otflow", {"batch": 3, "d": 2, "width": 4}, 3 * 2 + 3 * 3),
        ("conv", {"batch": 2, "channels": 4, "size": 3}, 2 * 4 * 9),
        ("cnf", {"batch": 3, "width": 4}, 3 * 2 + 3),
    ],
)
def test_problems_build_and_evaluate(problem, sizes, state_numel, device):
    inst = build(problem, sizes, device)
    assert inst.state_bytes() == 4 * state_numel
    out = inst.func(torch.tensor(0.0, device=device), inst.y0)
    parts_in = (inst.y0,) if isinstance(inst.y0, torch.Tensor) else inst.y0
    parts_out = (out,) if isinstance(out, torch.Tensor) else out
    assert [p.shape for p in parts_out] == [p.shape for p in parts_in]
    assert torch.isfinite(inst.loss(inst.y0))


def test_build_errors_name_the_fix():
    with pytest.raises(ValueError, match="choose one of"):
        build("nope", {}, "cpu")
    with pytest.raises(ValueError, match=r"missing \['width'\]"):
        build("mlp", {"batch": 2, "dim": 3}, "cpu")
    assert set(PROBLEMS) == {"mlp", "otflow", "conv", "cnf"}
