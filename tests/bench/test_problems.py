"""The benchmark problems: built from the library's own fields, at the sizes asked for."""

from __future__ import annotations

import pytest
import torch

from mpnode.bench.problems import PROBLEMS, build
from mpnode.core.testing import MLPField
from mpnode.models.cnf import CNF, HyperNetField
from mpnode.models.otflow import OTFlowDynamics


def test_problems_use_the_library_fields():
    """The benchmarks time mpnode.models' OT-Flow and CNF and mpnode.core.testing's MLP, not copies."""
    sizes = {"mlp": {"batch": 2, "dim": 3, "width": 4}, "otflow": {"batch": 2, "d": 2, "width": 4},
             "cnf": {"batch": 2, "width": 4}}
    fields = {name: build(name, s, "cpu").func for name, s in sizes.items()}
    assert isinstance(fields["mlp"], MLPField) and len(fields["mlp"].hidden) == 2
    assert isinstance(fields["otflow"], OTFlowDynamics) and fields["otflow"].potential.w.abs().sum() > 0
    assert isinstance(fields["cnf"], CNF) and isinstance(fields["cnf"].field, HyperNetField)


@pytest.mark.parametrize(
    "problem, sizes, state_numel",
    [
        ("mlp", {"batch": 3, "dim": 4, "width": 5}, 12),
        ("otflow", {"batch": 3, "d": 2, "width": 4}, 3 * 2 + 3 * 3),
        ("conv", {"batch": 2, "channels": 4, "size": 3}, 2 * 4 * 9),
        ("cnf", {"batch": 3, "width": 4}, 3 * 2 + 3),
        ("demo", {"batch": 3, "width": 5}, 3 * 2),
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
    assert set(PROBLEMS) == {"mlp", "otflow", "conv", "cnf", "demo"}


def test_demo_problem_is_the_cubic_spiral_field():
    """torchdiffeq's ode_demo field: a 2 -> width -> 2 tanh MLP of y**3."""
    inst = build("demo", {"batch": 4, "width": 7}, "cpu")
    lin1, lin2 = inst.func.net[0], inst.func.net[2]
    y = inst.y0
    expected = lin2(torch.tanh(lin1(y**3)))
    assert lin1.weight.shape == (7, 2) and torch.equal(inst.func(torch.tensor(0.0), y), expected)
