# docs/strategies.md: `f`, `y0` and `t` stand for any field, state and output times.
import torch

from mpnode.core.testing import MLPField

torch.manual_seed(0)
f = MLPField(dim=8, width=32)
y0, t = torch.randn(16, 8), torch.linspace(0, 1, 5)
