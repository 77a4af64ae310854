"""Learn the spiral y' = y^3 A, A = [[-0.1, 2], [-2, -0.1]], with an MLP vector field.

The ground truth is a float64 RK4 solve from ``y0 = (2, 0)`` on ``[0, 25]``
(``--data-size`` output times, 10 substeps each).  Training fits ``f(t, y) =
MLP(y^3)`` to random windows of ``--batch-time`` points starting at
``--batch-size`` random times (L1 loss), solving with mpnode or torchdiffeq
(``--method``: fixed-grid RK4 on the output times by default, or an adaptive
method with ``--rtol``/``--atol``) under the chosen autocast precision.
Logs iteration, train loss, full-trajectory test loss and time to
``<out>/log.csv``; draws trajectories, the phase portrait and the learned vs
true vector field to ``<out>/ode_demo.png`` and the loss curves to ``<out>/loss.png``.

    python examples/ode_demo.py --precision bfloat16 --niters 1000
    python examples/ode_demo.py --method dopri5 --rtol 1e-4 --atol 1e-6
    python examples/ode_demo.py --smoke
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from mpnode.bench.experiment import (
    CSVLog, add_method_flags, add_number_flags, add_solver_flags, autocast, make_grad_scaler, pyplot, save_figure,
    script_parser, setup, solver, tolerance_kwargs,
)

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
    from mpnode.core import odeint

    t = torch.linspace(0.0, t_end, data_size, dtype=torch.float64, device=device)
    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64, device=device)
    with torch.no_grad():
        y = odeint(Spiral().to(device), y0, t, method="rk4", options={"step_size": t_end / (10 * (data_size - 1))})
    return t.float(), y.float()


def get_batch(t: torch.Tensor, y: torch.Tensor, batch_time: int, batch_size: int, gen: torch.Generator):
    """Random windows: ``y0 (B, 2)``, times ``(batch_time,)`` from 0, targets ``(batch_time, B, 2)``."""
    starts = torch.randint(0, len(t) - batch_time, (batch_size,), generator=gen)
    y0 = y[starts, 0]
    bt = t[:batch_time]
    by = torch.stack([y[starts + i, 0] for i in range(batch_time)])
    return y0, bt, by


def plot_results(t, y_true, y_pred, func, losses, path: Path, loss_path: Path, title: str) -> None:
    plt = pyplot()
    tt, yt, yp = t.cpu(), y_true[:, 0].cpu(), y_pred[:, 0].cpu()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    ax.plot(tt, yt[:, 0], "g-", label="true y1")
    ax.plot(tt, yt[:, 1], "b-", label="true y2")
    ax.plot(tt, yp[:, 0], "g--", label="learned y1")
    ax.plot(tt, yp[:, 1], "b--", label="learned y2")
    ax.set(title="trajectories", xlabel="t", ylabel="y")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(yt[:, 0], yt[:, 1], "g-", label="true")
    ax.plot(yp[:, 0], yp[:, 1], "b--", label="learned")
    ax.set(title="phase portrait", xlabel="y1", ylabel="y2", xlim=(-2, 2), ylim=(-2, 2))
    ax.legend(fontsize=7)
    ax = axes[2]
    g1, g2 = torch.meshgrid(torch.linspace(-2, 2, 21), torch.linspace(-2, 2, 21), indexing="xy")
    grid = torch.stack([g1, g2], -1).reshape(-1, 2)
    param = next(func.parameters())
    with torch.no_grad():
        learned = func(torch.zeros(()), grid.to(param)).float().cpu()
        true = Spiral(torch.float32)(None, grid)
    for field, color, label in ((true, "tab:gray", "true"), (learned, "tab:blue", "learned")):
        v = field / field.norm(dim=1, keepdim=True).clamp_min(1e-12)
        ax.quiver(grid[:, 0], grid[:, 1], v[:, 0], v[:, 1], color=color, alpha=0.7, label=label, scale=30)
    ax.set(title="vector field (directions)", xlabel="y1", ylabel="y2", xlim=(-2, 2), ylim=(-2, 2))
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=110)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogy([r["iter"] for r in losses], [r["train_loss"] for r in losses], label="train (windows)")
    ax.semilogy([r["iter"] for r in losses], [r["test_loss"] for r in losses], "o-", label="test (full trajectory)")
    ax.set(xlabel="iteration", ylabel="mean |y - y_true|", title=title.split(",")[0])
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, loss_path, dpi=110)


def main(argv=None) -> list[dict]:
    parser = script_parser("ode_demo", __doc__.splitlines()[0])
    add_solver_flags(parser)
    add_number_flags(parser, niters=1000, data_size=1000, t_end=25.0, batch_time=10, batch_size=20, hidden=50,
                     lr=1e-3, test_freq=50)
    add_method_flags(parser, steps=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.niters, args.data_size, args.batch_time, args.batch_size, args.test_freq = 6, 40, 5, 8, 3
    device = setup(args)
    odeint = solver(args.odeint)
    solve_kw = dict(method=args.method, **tolerance_kwargs(args))
    t, y_true = ground_truth(args.data_size, args.t_end, device)
    func = CubeFeatureMLP(args.hidden).to(device)
    opt = torch.optim.RMSprop(func.parameters(), lr=args.lr)
    grad_scaler = make_grad_scaler(args.precision, device)
    gen = torch.Generator().manual_seed(args.seed)
    title = f"spiral, {args.odeint}, {args.precision}, {args.method} on {args.data_size} points, {args.niters} iterations"
    log = CSVLog(args.out / "log.csv")
    rows: list[dict] = []
    start = time.perf_counter()
    y_pred = y_true
    with tqdm(range(1, args.niters + 1), desc="spiral", unit="it") as bar:
        for it in bar:
            y0, bt, by = get_batch(t, y_true, args.batch_time, args.batch_size, gen)
            opt.zero_grad(set_to_none=True)
            with autocast(args.precision, device):
                pred = odeint(func, y0.to(device), bt, **solve_kw)
                loss = (pred.float() - by).abs().mean()
            grad_scaler.scale(loss).backward()
            grad_scaler.step(opt)
            grad_scaler.update()
            if it % args.test_freq == 0 or it == args.niters:
                with torch.no_grad(), autocast(args.precision, device):
                    y_pred = odeint(func, y_true[0], t, **solve_kw).float()
                test_loss = float((y_pred - y_true).abs().mean())
                row = dict(iter=it, train_loss=float(loss.detach()), test_loss=test_loss,
                           time_s=round(time.perf_counter() - start, 3), precision=args.precision, odeint=args.odeint)
                log.write(**row)
                rows.append(row)
                bar.set_postfix(test=f"{test_loss:.4f}")
    log.close()
    plot_results(t, y_true, y_pred, func, rows, args.out / "ode_demo.png", args.out / "loss.png", title)
    print(f"final test loss {rows[-1]['test_loss']:.4f} after {args.niters} iterations, {rows[-1]['time_s']:.1f} s")
    print(f"wrote {args.out / 'log.csv'}, {args.out / 'ode_demo.png'} and {args.out / 'loss.png'}")
    return rows


if __name__ == "__main__":
    main()
