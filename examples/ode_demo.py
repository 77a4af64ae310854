"""Learn the spiral y' = y^3 A, A = [[-0.1, 2], [-2, -0.1]], with an MLP vector field.

The ground truth is a float64 RK4 solve from ``y0 = (2, 0)`` on ``[0, 25]``
(``--data-size`` output times, 10 substeps each).  Training fits ``f(t, y) =
MLP(y^3)`` to random windows of ``--batch-time`` points starting at
``--batch-size`` random times (L1 loss), solving with mpnode or torchdiffeq
(``--method``: fixed-grid RK4 on the output times by default, or an adaptive
method with ``--rtol``/``--atol``) under the chosen autocast precision.
Every ``--test-freq`` iterations it prints and logs the train loss, the
full-trajectory test loss and the time to ``<out>/log.csv``; at the end it draws
trajectories, the phase portrait and the learned vs true vector field to
``<out>/ode_demo.png`` and the loss curves to ``<out>/loss.png``.

Needs torch, mpnode-core and matplotlib (torchdiffeq for ``--odeint torchdiffeq``).

    python examples/ode_demo.py --precision bfloat16 --niters 1000
    python examples/ode_demo.py --method dopri5 --rtol 1e-4 --atol 1e-6
    python examples/ode_demo.py --smoke
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

import mpnode.core

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
A_TRUE = [[-0.1, 2.0], [-2.0, -0.1]]


class Spiral(nn.Module):
    """The true field ``f(t, y) = y^3 A`` for states ``(..., 2)``."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.register_buffer("A", torch.tensor(A_TRUE, dtype=dtype))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (y**3) @ self.A


class CubeFeatureMLP(nn.Module):
    """Learned field ``f(t, y) = W2 tanh(W1 y^3 + b1) + b2`` (hidden width ``--hidden``)."""

    def __init__(self, hidden: int = 50) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.1)
                nn.init.zeros_(m.bias)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y**3)


def ground_truth(data_size: int, t_end: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, y)``: float32 times ``(data_size,)`` and states ``(data_size, 1, 2)`` from a float64 RK4 solve."""
    t = torch.linspace(0.0, t_end, data_size, dtype=torch.float64, device=device)
    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64, device=device)
    with torch.no_grad():
        y = mpnode.core.odeint(Spiral().to(device), y0, t, method="rk4",
                               options={"step_size": t_end / (10 * (data_size - 1))})
    return t.float(), y.float()


def get_batch(t: torch.Tensor, y: torch.Tensor, batch_time: int, batch_size: int, gen: torch.Generator):
    """Random windows: ``y0 (B, 2)``, times ``(batch_time,)`` from 0, targets ``(batch_time, B, 2)``."""
    starts = torch.randint(0, len(t) - batch_time, (batch_size,), generator=gen)
    y0 = y[starts, 0]
    bt = t[:batch_time]
    by = torch.stack([y[starts + i, 0] for i in range(batch_time)])
    return y0, bt, by


def get_odeint(name: str):
    """``mpnode.core.odeint``, or torchdiffeq's (same call) for the comparison."""
    if name == "mpnode":
        return mpnode.core.odeint
    try:
        import torchdiffeq
    except ImportError as err:
        raise SystemExit("--odeint torchdiffeq needs torchdiffeq: pip install torchdiffeq") from err
    return torchdiffeq.odeint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ode_demo.py", description=__doc__.splitlines()[0])
    p.add_argument("--precision", choices=list(PRECISIONS), default="float32",
                   help="autocast dtype of the vector field")
    p.add_argument("--odeint", choices=["mpnode", "torchdiffeq"], default="mpnode", help="which solver runs the ODE")
    p.add_argument("--method", default="rk4",
                   help="fixed-grid (rk4, euler, ...: steps on the output times) or adaptive (dopri5, ...)")
    p.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance of an adaptive method")
    p.add_argument("--atol", type=float, default=1e-7, help="absolute tolerance of an adaptive method")
    p.add_argument("--niters", type=int, default=1000, help="training iterations")
    p.add_argument("--data-size", type=int, default=1000, help="output times of the true trajectory")
    p.add_argument("--t-end", type=float, default=25.0, help="the true trajectory runs on [0, t-end]")
    p.add_argument("--batch-time", type=int, default=10, help="output times per training window")
    p.add_argument("--batch-size", type=int, default=20, help="windows per iteration")
    p.add_argument("--hidden", type=int, default=50, help="hidden width of the learned field")
    p.add_argument("--lr", type=float, default=1e-3, help="RMSprop learning rate")
    p.add_argument("--test-freq", type=int, default=50, help="test and log every this many iterations")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/ode_demo"), help="folder for log.csv and the figures")
    p.add_argument("--smoke", "--quick", action="store_true",
                   help="tiny sizes and counts, for the tests (--quick is an alias)")
    args = p.parse_args(argv)
    if args.smoke:
        args.niters, args.data_size, args.batch_time, args.batch_size, args.test_freq = 6, 40, 5, 8, 3
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    odeint = get_odeint(args.odeint)
    solve_kw = dict(method=args.method, rtol=args.rtol, atol=args.atol)  # a fixed-grid method ignores rtol/atol
    # the autocast dtype of the vector field; the ODE state and the solver's sums stay float32 with mpnode
    autocast = torch.autocast(device.type, dtype=PRECISIONS[args.precision], enabled=args.precision != "float32")
    # float16 needs loss scaling for the weights' gradients; a pass-through otherwise
    grad_scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "float16")

    t, y_true = ground_truth(args.data_size, args.t_end, device)
    func = CubeFeatureMLP(args.hidden).to(device)
    opt = torch.optim.RMSprop(func.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    rows: list[dict] = []
    start = time.perf_counter()
    for it in range(1, args.niters + 1):
        y0, bt, by = get_batch(t, y_true, args.batch_time, args.batch_size, gen)
        opt.zero_grad(set_to_none=True)
        with autocast:
            pred = odeint(func, y0.to(device), bt, **solve_kw)
            loss = (pred.float() - by).abs().mean()
        grad_scaler.scale(loss).backward()
        grad_scaler.step(opt)
        grad_scaler.update()
        if it % args.test_freq == 0 or it == args.niters:
            with torch.no_grad(), autocast:
                y_pred = odeint(func, y_true[0], t, **solve_kw).float()
            row = dict(iter=it, train_loss=loss.item(), test_loss=float((y_pred - y_true).abs().mean()),
                       time_s=round(time.perf_counter() - start, 3), precision=args.precision, odeint=args.odeint)
            rows.append(row)
            write_csv(args.out / "log.csv", rows)
            print(f"iter {it:5d} | train loss {row['train_loss']:.4f} | test loss {row['test_loss']:.4f} | "
                  f"{row['time_s']:.1f} s", flush=True)

    title = (f"spiral, {args.odeint}, {args.precision}, {args.method} on {args.data_size} points, "
             f"{args.niters} iterations")
    plot_solution(t, y_true, y_pred, func, title, args.out / "ode_demo.png")
    plot_losses(rows, title.split(",")[0], args.out / "loss.png")
    print(f"final test loss {rows[-1]['test_loss']:.4f} after {args.niters} iterations, {rows[-1]['time_s']:.1f} s")
    print(f"wrote {args.out / 'log.csv'}, {args.out / 'ode_demo.png'} and {args.out / 'loss.png'}")
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_solution(t, y_true, y_pred, func: nn.Module, title: str, path: Path) -> None:
    """Trajectories, phase portrait and vector-field directions, true vs learned."""
    tt, yt, yp = t.cpu(), y_true[:, 0].cpu(), y_pred[:, 0].cpu()
    fig = Figure(figsize=(14, 4))
    ax_t, ax_p, ax_f = fig.subplots(1, 3)
    ax_t.plot(tt, yt[:, 0], "g-", label="true y1")
    ax_t.plot(tt, yt[:, 1], "b-", label="true y2")
    ax_t.plot(tt, yp[:, 0], "g--", label="learned y1")
    ax_t.plot(tt, yp[:, 1], "b--", label="learned y2")
    ax_t.set(title="trajectories", xlabel="t", ylabel="y")
    ax_t.legend(fontsize=7)
    ax_p.plot(yt[:, 0], yt[:, 1], "g-", label="true")
    ax_p.plot(yp[:, 0], yp[:, 1], "b--", label="learned")
    ax_p.set(title="phase portrait", xlabel="y1", ylabel="y2", xlim=(-2, 2), ylim=(-2, 2))
    ax_p.legend(fontsize=7)
    g1, g2 = torch.meshgrid(torch.linspace(-2, 2, 21), torch.linspace(-2, 2, 21), indexing="xy")
    grid = torch.stack([g1, g2], -1).reshape(-1, 2)
    with torch.no_grad():
        learned = func(torch.zeros(()), grid.to(next(func.parameters()))).float().cpu()
        true = Spiral(torch.float32)(None, grid)
    for field, color, label in ((true, "tab:gray", "true"), (learned, "tab:blue", "learned")):
        v = field / field.norm(dim=1, keepdim=True).clamp_min(1e-12)
        ax_f.quiver(grid[:, 0], grid[:, 1], v[:, 0], v[:, 1], color=color, alpha=0.7, label=label, scale=30)
    ax_f.set(title="vector field (directions)", xlabel="y1", ylabel="y2", xlim=(-2, 2), ylim=(-2, 2))
    ax_f.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_losses(rows: list[dict], title: str, path: Path) -> None:
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.semilogy([r["iter"] for r in rows], [r["train_loss"] for r in rows], label="train (windows)")
    ax.semilogy([r["iter"] for r in rows], [r["test_loss"] for r in rows], "o-", label="test (full trajectory)")
    ax.set(xlabel="iteration", ylabel="mean |y - y_true|", title=title)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
