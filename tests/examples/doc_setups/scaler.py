# docs/scaler.md: `model` (= `func`), `y0`, `t` and `loss_fn` stand for any float16 training step.
import torch

from mpnode.core import odeint
from mpnode.core.testing import MLPField

torch.manual_seed(0)
model = func = MLPField(dim=8, width=32)
y0, t = torch.randn(16, 8), torch.tensor([0.0, 1.0])


def loss_fn(y):
    return y[-1].float().pow(2).mean()
