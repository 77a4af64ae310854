# docs/benchmarks.md: `model` and `x` stand for any training step's model and batch.
import torch

from mpnode.core import odeint
from mpnode.core.testing import MLPField

torch.manual_seed(0)
field = MLPField(dim=8, width=32)
x = torch.randn(32, 8)


def model(x):
    return odeint(field, x, torch.tensor([0.0, 1.0]), method="rk4", options={"step_size": 0.1})[-1].square().mean()
