"""Data-parallel training of a neural-ODE classifier with torch.distributed (DDP).

Task: two concentric noisy circles (radii 1 and 2, ``mpnode.models.toy_data.circles``), labelled by
ring; a linear encoder lifts each point to ``--dim`` features, an MLP vector field flows them from
t = 0 to 1 (RK4, ``--step-size``), a linear head gives the two logits.  Every rank builds the same
data set (same seed); ``DistributedSampler`` gives each rank its own share of every epoch, and
DDP averages the gradients after each backward.

    python -m torch.distributed.run --standalone --nproc_per_node 2 examples/ddp_train.py
    python -m torch.distributed.run --standalone --nproc_per_node 2 examples/ddp_train.py --precision bfloat16
    python examples/ddp_train.py --smoke          # one process, no process group

On CPU the ranks talk over gloo, on CUDA over NCCL (one GPU per rank: ``cuda:LOCAL_RANK``).
``--precision float16`` runs the vector field in float16 with mpnode's dynamic adjoint scaler
(one per process, kept across iterations) and a ``torch.amp.GradScaler`` for the other layers.
Rank 0 prints one line per epoch and the final loss, and writes ``<out>/ddp_train.csv``
(epoch, mean training loss over all ranks, test loss and accuracy, seconds, world size) and
``<out>/ddp_train.png`` (the test points coloured by the predicted ring over the learned decision
regions; the losses and the test accuracy per epoch).

Needs torch, mpnode-core, mpnode-models, mpnode-scaler (for ``--precision float16``) and matplotlib
(torchdiffeq for ``--odeint torchdiffeq``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from mpnode.models.cli import (
    PRECISIONS, add_device_flag, add_number_flags, add_solver_flags, script_parser, setup, solver, write_csv,
)
from mpnode.models.toy_data import circles

class Field(nn.Module):
    """``f(t, y) = W2 tanh(W1 y + b1) + b2`` on states ``(B, dim)``."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


class ODEClassifier(nn.Module):
    """Points ``(B, 2)`` -> logits ``(B, 2)``: ``head(y(1))``, ``y' = Field(y)``, ``y(0) = encoder(x)``."""

    def __init__(self, odeint, dim: int, width: int, step_size: float, scaler=None) -> None:
        super().__init__()
        self.encoder = nn.Linear(2, dim)
        self.field = Field(dim, width)
        self.head = nn.Linear(dim, 2)
        self.register_buffer("t", torch.tensor([0.0, 1.0]))
        self.odeint, self.step_size, self.scaler = odeint, step_size, scaler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self.encoder(x).float()  # the ODE state stays float32; the field runs in the autocast dtype
        extra = {} if self.scaler is None else {"scaler": self.scaler}
        y1 = self.odeint(self.field, y0, self.t, method="rk4", options={"step_size": self.step_size}, **extra)[-1]
        return self.head(y1)


def circles_dataset(n: int, seed: int) -> TensorDataset:
    """``n`` points of the two circles and their ring label (0 inner, 1 outer); the same on every rank."""
    x = circles(n, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (x.norm(dim=1) > 1.5).long())


def init_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``; joins the process group when launched by torchrun."""
    if "RANK" not in os.environ:  # a plain ``python examples/ddp_train.py``
        return 0, 1, torch.device(device_arg)
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.device(device_arg).type == "cuda":
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def mean_over_ranks(value: float, world_size: int, device: torch.device) -> float:
    """The mean of a per-rank number over all ranks (an all-reduce; no-op for one process)."""
    if world_size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total) / world_size


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, autocast, device) -> tuple[float, float]:
    """Test loss and accuracy of ``model`` (the plain module, no collectives) on ``data``."""
    x, labels = (t.to(device) for t in data.tensors)
    with autocast:
        logits = model(x)
    loss = nn.functional.cross_entropy(logits.float(), labels)
    return float(loss), float((logits.argmax(1) == labels).float().mean())


def train(args) -> float:
    rank, world_size, device = init_distributed(args.device)
    setup(args)  # the same seed, so the same initial weights, on every rank (DDP also broadcasts rank 0's)
    autocast = torch.autocast(device.type, dtype=PRECISIONS[args.precision], enabled=args.precision != "float32")
    scaler = None
    if args.precision == "float16" and args.odeint == "mpnode":
        from mpnode.scaler import DynamicAdjointScaler

        scaler = DynamicAdjointScaler()  # per process: its decisions are this rank's own
    model = ODEClassifier(solver(args.odeint), args.dim, args.width, args.step_size, scaler).to(device)
    ddp = DistributedDataParallel(model) if world_size > 1 else model
    train_set, test_set = circles_dataset(args.n_train, args.seed), circles_dataset(args.n_test, args.seed + 1)
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    grad_scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "float16")
    rows = []
    start, train_loss = time.perf_counter(), float("nan")
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # a different shuffle per epoch, the same on every rank
        loss_sum, steps = torch.zeros((), device=device), 0
        for step, (x, labels) in enumerate(loader):
            if step == args.max_steps:
                break
            x, labels = x.to(device), labels.to(device)
            with autocast:
                loss = nn.functional.cross_entropy(ddp(x).float(), labels)
            opt.zero_grad(set_to_none=True)
            grad_scaler.scale(loss).backward()  # DDP all-reduces the gradients here
            grad_scaler.step(opt)
            grad_scaler.update()
            loss_sum, steps = loss_sum + loss.detach(), steps + 1
        train_loss = mean_over_ranks(float(loss_sum) / steps, world_size, device)  # one host read per epoch
        if rank == 0:
            test_loss, accuracy = evaluate(model, test_set, autocast, device)
            row = dict(epoch=epoch, train_loss=train_loss, test_loss=test_loss, test_accuracy=accuracy,
                       seconds=time.perf_counter() - start, world_size=world_size, precision=args.precision)
            rows.append(row)
            write_csv(args.out / "ddp_train.csv", rows)
            print(f"epoch {epoch:3d}  train loss {train_loss:.3e}  test loss {test_loss:.3e}  "
                  f"accuracy {accuracy:.3f}  ({row['seconds']:.1f} s, {world_size} process(es))", flush=True)
    if rank == 0:
        plot(model, test_set, rows, autocast, device, args.out / "ddp_train.png")
        print(f"final loss {train_loss:.6e}", flush=True)
        print(f"wrote {args.out / 'ddp_train.csv'} and {args.out / 'ddp_train.png'}", flush=True)
        if scaler is not None:
            print(f"rank 0 adjoint scaler: learned target {scaler.target:g}, {scaler.counters}", flush=True)
    if world_size > 1:
        dist.destroy_process_group()
    return train_loss


@torch.no_grad()
def plot(model: nn.Module, test_set: TensorDataset, rows: list[dict], autocast, device, path: Path) -> None:
    """Left: predicted ring over [-3, 3]^2 with the test points; right: losses and test accuracy per epoch."""
    fig = Figure(figsize=(10, 4))
    ax_map, ax_loss = fig.subplots(1, 2)
    g = torch.linspace(-3, 3, 121)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    with autocast:
        outer = model(torch.stack([xx.flatten(), yy.flatten()], 1).to(device)).argmax(1).cpu()
    ax_map.contourf(xx, yy, outer.reshape(xx.shape).float(), levels=[-0.5, 0.5, 1.5], colors=["#dbe9f6", "#fbe3d6"])
    x, labels = test_set.tensors
    for ring, color, name in ((0, "tab:blue", "inner ring"), (1, "tab:orange", "outer ring")):
        ax_map.scatter(x[labels == ring, 0], x[labels == ring, 1], s=3, color=color, label=name)
    ax_map.set(title="test points over the predicted regions", xlabel="x1", ylabel="x2", aspect="equal")
    ax_map.legend(fontsize=7, loc="upper right")
    epochs = [r["epoch"] for r in rows]
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "-o", label="train loss (mean over ranks)")
    ax_loss.plot(epochs, [r["test_loss"] for r in rows], "-s", label="test loss")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", ylim=(0, None))
    ax_acc = ax_loss.twinx()
    ax_acc.plot(epochs, [r["test_accuracy"] for r in rows], ":^", color="tab:green", label="test accuracy")
    ax_acc.set(ylabel="test accuracy", ylim=(0, 1.02))
    lines = ax_loss.get_legend_handles_labels()[0] + ax_acc.get_legend_handles_labels()[0]
    ax_loss.legend(lines, [ln.get_label() for ln in lines], fontsize=7, ncol=3, loc="upper center",
                   bbox_to_anchor=(0.5, -0.15))
    ax_loss.set_title(f"{rows[-1]['world_size']} process(es), {rows[-1]['precision']}")
    ax_loss.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = script_parser("ddp_train", __doc__.splitlines()[0])
    add_solver_flags(p, what="the model", device=False)
    add_device_flag(p, help="cuda: one GPU per rank (cuda:LOCAL_RANK), over NCCL; cpu: gloo")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--dim", type=int, default=4, help="ODE state size (>2: room to separate the rings)")
    add_number_flags(p, epochs=10, n_train=4096, n_test=1024, width=32, step_size=0.25, lr=1e-2)
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.max_steps, args.n_train, args.n_test, args.batch_size = 2, 3, 512, 128, 32
    return args


def main(argv: list[str] | None = None) -> float:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
