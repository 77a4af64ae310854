"""Learn a ball's coefficient of restitution from the times at which it bounces.

The ball's height ``x`` and velocity ``v`` follow ``x' = v``, ``v' = -g - c(v) v|v|``
with ``c`` a small fixed drag network (see :class:`Ball`).  It is dropped from
``x0`` with ``v0 = 0``; each time it reaches the ground (``x = 0``, found by
``mpnode.core.odeint_event``) its velocity is reversed and scaled by the
coefficient of restitution ``e``, and the flight continues from just above the
ground.  The observed data are the first ``--bounces`` bounce times of the true
ball (``e = 0.8``, float64 solve).  The model starts from ``e = 0.5`` and learns
``e`` by matching the flight durations; the gradient of each bounce time w.r.t.
``e`` and the earlier bounces comes from the implicit function theorem at every
event, chained through the bounces.

Under ``--precision bfloat16`` the drag network runs in bfloat16 while the state,
the event function and the root finding stay in float32.

Writes ``<out>/log.csv`` (iteration, loss, e, error of e, seconds) and
``<out>/bouncing_ball.png`` (true and learned heights with their bounce times;
``e`` and the loss during training).

Needs torch, mpnode-core, mpnode-models (its flags) and matplotlib (torchdiffeq for ``--odeint torchdiffeq``).

    python examples/bouncing_ball.py --precision bfloat16
    python examples/bouncing_ball.py --smoke
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from matplotlib.figure import Figure
from torch import nn

import mpnode.core
from mpnode.models.cli import (
    PRECISIONS, add_number_flags, add_solver_flags, script_parser, setup, solver, write_csv,
)

GRAVITY = 9.81
TRUE_RESTITUTION = 0.8
#: Height from which a flight restarts after a bounce, so the event function is positive at the start.
LIFT = 1e-5


class Ball(nn.Module):
    """``x' = v``, ``v' = -g - c(v) v |v|`` with ``c(v) = 0.05 (1 + 0.5 tanh(MLP(v)))`` a fixed drag network.

    The drag network stands for a drag model fitted elsewhere: its weights come from
    ``seed`` and are frozen.  Under autocast it is the part that runs in low
    precision.  ``e = sigmoid(logit_e)`` is the learnable coefficient of restitution.
    """

    def __init__(self, restitution: float, seed: int = 0, hidden: int = 32, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.drag = nn.Sequential(nn.Linear(1, hidden, dtype=dtype), nn.Tanh(), nn.Linear(hidden, 1, dtype=dtype))
        with torch.no_grad():
            for p in self.drag.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.5)  # same for any dtype
        self.drag.requires_grad_(False)
        self.logit_e = nn.Parameter(torch.logit(torch.tensor(restitution, dtype=dtype)))

    @property
    def restitution(self) -> torch.Tensor:
        return torch.sigmoid(self.logit_e)

    def drag_coefficient(self, v: torch.Tensor) -> torch.Tensor:
        return 0.05 * (1 + 0.5 * torch.tanh(self.drag(v.unsqueeze(-1) / 5).squeeze(-1).to(v.dtype)))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        v = y[..., 1]
        return torch.stack([v, -GRAVITY - self.drag_coefficient(v) * v * v.abs()], -1)


def ground(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Positive in the air, zero on the ground."""
    return y[..., 0]


def bounce(state: torch.Tensor, restitution: torch.Tensor) -> torch.Tensor:
    """The state just after a bounce: just above the ground, velocity reversed and scaled."""
    return torch.stack([torch.full_like(state[0], LIFT), -restitution * state[1]])


def bounce_times(func: nn.Module, restitution: torch.Tensor, x0: float, n_bounces: int, solve_kw: dict,
                 event_solver) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The first ``n_bounces`` bounce times ``(n_bounces,)`` and each flight's start ``(t, state)``."""
    dtype = restitution.dtype
    t = torch.zeros((), dtype=dtype)
    state = torch.tensor([x0, 0.0], dtype=dtype)
    times, flights = [], []
    for _ in range(n_bounces):
        flights.append((t, state))
        t, solution = event_solver(func, state, t, event_fn=ground, **solve_kw)
        state = bounce(solution[-1], restitution)
        times.append(t)
    return torch.stack(times), flights


def heights(func: nn.Module, flights, times: torch.Tensor, points: int, solve_kw: dict):
    """Height curves of each flight on ``points`` times: a list of ``(t, x)`` float numpy arrays."""
    curves = []
    with torch.no_grad():
        for (t0, y0), t1 in zip(flights, times):
            grid = torch.linspace(float(t0), float(t1), points, dtype=y0.dtype)
            x = mpnode.core.odeint(func, y0, grid, **solve_kw)[:, 0]
            curves.append((grid.numpy(), x.float().numpy()))
    return curves


def _flight_loss(predicted: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Mean squared relative error of the flight durations (the intervals between bounces)."""
    zero = observed.new_zeros(1)
    flights = torch.diff(predicted, prepend=zero)
    target = torch.diff(observed, prepend=zero)
    return ((flights - target) / target).square().mean()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = script_parser("bouncing_ball", __doc__.splitlines()[0])  # --seed: of the fixed drag network
    add_solver_flags(p, what="the drag network", device=False)  # --odeint: whose odeint_event finds the bounces
    p.add_argument("--method", choices=["dopri5", "rk4"], default="dopri5")
    p.add_argument("--step-size", type=float, default=0.01, help="step of rk4")
    p.add_argument("--height", type=float, default=3.0, help="drop height x0")
    add_number_flags(p, niters=150, bounces=5, lr=0.1, print_freq=25)
    args = p.parse_args(argv)
    if args.smoke:
        args.niters, args.bounces, args.print_freq = 3, 2, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)  # a scalar ODE: it runs on the CPU
    setup(args)
    # only the drag network runs in the autocast dtype; the state, events and root finding stay float32
    autocast = torch.autocast("cpu", dtype=PRECISIONS[args.precision], enabled=args.precision != "float32")
    event_solver = solver(args.odeint, "odeint_event")
    solve_kw = {"method": args.method, "rtol": 1e-6, "atol": 1e-8}
    if args.method == "rk4":
        solve_kw["options"] = {"step_size": args.step_size}

    truth = Ball(TRUE_RESTITUTION, seed=args.seed, dtype=torch.float64)
    with torch.no_grad():
        observed, true_flights = bounce_times(truth, truth.restitution, args.height, args.bounces,
                                              {"rtol": 1e-10, "atol": 1e-12}, mpnode.core.odeint_event)
    observed = observed.float()
    print(f"observed bounce times: {[round(float(t), 4) for t in observed]}")

    model = Ball(0.5, seed=args.seed)
    optimizer = torch.optim.Adam([model.logit_e], lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.niters)
    history = []
    start = time.perf_counter()
    for it in range(1, args.niters + 1):
        optimizer.zero_grad()
        with autocast:
            predicted, _ = bounce_times(model, model.restitution, args.height, args.bounces, solve_kw, event_solver)
        loss = _flight_loss(predicted, observed)
        loss.backward()
        optimizer.step()
        schedule.step()
        e = float(model.restitution.detach())
        row = {"iteration": it, "loss": loss.item(), "restitution": e, "error": abs(e - TRUE_RESTITUTION),
               "seconds": time.perf_counter() - start}
        history.append(row)
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"the loss became {row['loss']} at iteration {it}; lower --lr")
        if it % args.print_freq == 0 or it == args.niters:
            print(f"iter {it:4d}  loss {row['loss']:.3e}  e {e:.5f} (true {TRUE_RESTITUTION})  "
                  f"{row['seconds']:.1f}s")
    write_csv(args.out / "log.csv", history)

    with torch.no_grad():
        predicted, flights = bounce_times(model, model.restitution, args.height, args.bounces, solve_kw, event_solver)
    _plot(args, history, observed, predicted, true_flights, flights, truth, model, solve_kw)
    final = history[-1]
    print(f"final: e = {final['restitution']:.4f} (true {TRUE_RESTITUTION}), loss {final['loss']:.3e}; "
          f"wrote {args.out / 'log.csv'} and {args.out / 'bouncing_ball.png'}")
    return final


def _plot(args, history, observed, predicted, true_flights, flights, truth, model, solve_kw) -> None:
    fig = Figure(figsize=(11, 4))
    ax_x, ax_e = fig.subplots(1, 2)
    exact_kw = {"rtol": 1e-10, "atol": 1e-12}
    for label, color, curves, times in (
        ("true", "black", heights(truth, true_flights, observed.double(), 60, exact_kw), observed),
        ("learned", "tab:orange", heights(model, flights, predicted, 60, solve_kw), predicted),
    ):
        for k, (t, x) in enumerate(curves):
            ax_x.plot(t, x, color=color, lw=1.5 if label == "true" else 1.0, ls="-" if label == "true" else "--",
                      label=label if k == 0 else None)
        ax_x.plot(times.numpy(), [0.0] * len(times), "o", color=color, ms=4)
    ax_x.set_xlabel("t")
    ax_x.set_ylabel("height x")
    ax_x.set_title(f"bounces ({args.precision}, {args.method})")
    ax_x.legend()
    its = [h["iteration"] for h in history]
    ax_e.plot(its, [h["restitution"] for h in history], color="tab:blue", label="learned e")
    ax_e.axhline(TRUE_RESTITUTION, color="tab:blue", ls=":", label="true e")
    ax_e.set_xlabel("iteration")
    ax_e.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)
    ax_e.set_ylabel("coefficient of restitution e")
    ax_loss = ax_e.twinx()
    ax_loss.semilogy(its, [h["loss"] for h in history], color="tab:red", alpha=0.6, label="loss (right axis)")
    ax_loss.set_ylabel("loss: mean squared relative error of flight times")
    lines = ax_e.get_legend_handles_labels()[0] + ax_loss.get_legend_handles_labels()[0]
    ax_e.legend(lines, [ln.get_label() for ln in lines], loc="center right")
    fig.tight_layout()
    fig.savefig(args.out / "bouncing_ball.png", dpi=120)


if __name__ == "__main__":
    main()
