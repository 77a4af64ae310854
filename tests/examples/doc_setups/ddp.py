# docs/distributed.md: a one-process "gloo" group (what torchrun would set up) and the model, data and loss the
# page leaves to the reader (examples/ddp_train.py has the full versions).
import os
import socket

import torch

from mpnode.core import odeint

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))


class ODEModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.field = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        self.head = torch.nn.Linear(2, 2)

    def forward(self, x):
        t = torch.tensor([0.0, 1.0])
        return self.head(odeint(lambda t, y: self.field(y), x, t, method="rk4", options={"step_size": 0.25})[-1])


g = torch.Generator().manual_seed(0)
points = torch.randn(128, 2, generator=g) * 2
train_set = torch.utils.data.TensorDataset(points, (points.norm(dim=1) > 1.5).long())
loss_fn = torch.nn.functional.cross_entropy
epochs = 1
