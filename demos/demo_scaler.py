"""Why float16 needs adjoint scaling: a learned linear system trained under float16 autocast.

``y' = A y`` with ``A`` a learned ``nn.Linear`` weight initialised at
``diag(-1, -5, -30)`` (a stiff decaying system), fitted for a few Adam steps to
the trajectory end-point of a target matrix.  Three scenarios change only the
loss scale: ``benign`` (1), ``overflow`` (1e8: the adjoint seeds exceed float16's
65504) and ``underflow`` (1e-10: they fall below its smallest subnormal).  Three
solvers train their own copy of ``A``:

* ``torchdiffeq+GradScaler``: torchdiffeq under autocast, loss scaled by ``torch.amp.GradScaler``;
* ``mpnode unscaled``: ``odeint(..., scaler=False)`` (raises on overflow, loses underflow);
* ``mpnode dynamic``: ``odeint(..., scaler=DynamicAdjointScaler())``.

Each step's gradient is compared with the float64 gradient through the matrix
exponential at the same ``A``.  Prints the errors per scenario and solver, the
scaler's event history, and writes ``demo_scaler.csv`` and ``demo_scaler.png``.

First it prints the errors on the dynamic-range problem (docs/scaler.md;
``mpnode.core.testing.DynamicRangeODE``: ``y' = -(a t^2 + b t + c) y`` from
2e3 down to 2.3e-4, analytic gradients), unscaled and scaled, at three loss scales.

    python demos/demo_scaler.py [--iters 5] [--steps 64] [--smoke]
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

from mpnode.bench.experiment import (
    add_device_flag, add_number_flags, print_table, pyplot, save_figure, script_parser, setup, write_csv,
)
from mpnode.core import NonFiniteGradientError, odeint
from mpnode.core.testing import DynamicRangeODE
from mpnode.scaler import DynamicAdjointScaler

SCENARIOS = {"benign": 1.0, "overflow": 1e8, "underflow": 1e-10}
SOLVERS = ("torchdiffeq+GradScaler", "mpnode unscaled", "mpnode dynamic")
A0 = torch.diag(torch.tensor([-1.0, -5.0, -30.0], dtype=torch.float64))
A_TARGET = A0 + 0.3 * torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.5], [0.0, -0.5, 0.0]], dtype=torch.float64)


def exact_loss_and_grad(A: torch.Tensor, y0: torch.Tensor, target: torch.Tensor, T: float, scale: float):
    """Float64 loss ``scale/2 ||exp(TA) y0 - target||^2`` and its gradient in ``A``."""
    A = A.detach().double().requires_grad_(True)
    yT = y0 @ torch.linalg.matrix_exp(T * A).T
    loss = scale * 0.5 * ((yT - target) ** 2).sum()
    (g,) = torch.autograd.grad(loss, A)
    return float(loss.detach()), g


def run(args) -> tuple[list[dict], DynamicAdjointScaler]:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    y0 = torch.randn(args.batch, 3, dtype=torch.float64) * 10
    target = y0 @ torch.linalg.matrix_exp(args.T * A_TARGET).T
    t = torch.linspace(0, args.T, args.steps + 1, device=device)
    rows, last_scaler = [], None
    for scenario, scale in SCENARIOS.items():
        for solver in SOLVERS:
            layer = torch.nn.Linear(3, 3, bias=False).to(device)
            with torch.no_grad():
                layer.weight.copy_(A0)
            opt = torch.optim.Adam(layer.parameters(), lr=args.lr)
            grad_scaler = (torch.amp.GradScaler(device.type, init_scale=2.0**16) if solver.startswith("torchdiffeq")
                           else None)
            dyn = DynamicAdjointScaler() if solver == "mpnode dynamic" else None
            y0_dev, target_dev = y0.float().to(device), target.float().to(device)
            for it in range(args.iters):
                exact_l, exact_g = exact_loss_and_grad(layer.weight, y0, target, args.T, scale)
                opt.zero_grad(set_to_none=True)
                status = "ok"
                try:
                    with torch.autocast(device.type, dtype=torch.float16):
                        if grad_scaler is not None:
                            import torchdiffeq

                            out = torchdiffeq.odeint(lambda t, y, layer=layer: layer(y), y0_dev, t, method="rk4")
                        else:
                            out = odeint(lambda t, y, layer=layer: layer(y), y0_dev, t, method="rk4",
                                         adjoint_params=(layer.weight,), scaler=dyn if dyn else False)
                        loss = scale * 0.5 * ((out[-1].float() - target_dev) ** 2).sum()
                    if grad_scaler is not None:
                        grad_scaler.scale(loss).backward()
                        grad_scaler.unscale_(opt)
                    else:
                        loss.backward()
                    g = layer.weight.grad.detach().double().cpu()
                    finite = bool(torch.isfinite(g).all())
                    err = float((g - exact_g).norm() / exact_g.norm()) if finite else math.inf
                    if grad_scaler is not None:
                        status = "ok" if finite else "skipped (inf)"
                        grad_scaler.step(opt)
                        grad_scaler.update()
                    else:
                        opt.step()
                except NonFiniteGradientError:
                    status, err = "error (overflow)", math.inf
                rows.append(dict(scenario=scenario, solver=solver, iteration=it, exact_loss=exact_l,
                                 rel_err_dA=err, status=status))
            if dyn is not None:
                last_scaler = dyn if scenario == "overflow" else last_scaler
    return rows, last_scaler


def dynamic_range_table(device: torch.device) -> None:
    """Relative errors on DynamicRangeODE: float32, float16 unscaled, float16 dynamic."""
    cells = []
    for loss_scale in (1.0, 1e-6, 1e8):
        problem = DynamicRangeODE(loss_scale=loss_scale)
        for name, precision, scaler in (("float32", None, False), ("float16 unscaled", torch.float16, False),
                                        ("float16 dynamic", torch.float16, DynamicAdjointScaler())):
            try:
                with torch.autocast(device.type, dtype=precision or torch.float16, enabled=precision is not None):
                    e = problem.errors(problem.solve(odeint, device=device, scaler=scaler))
                errors = [f"{e[k]:.1e}" for k in ("dy0", "da", "db", "dc")]
            except NonFiniteGradientError:
                errors = ["overflow: NonFiniteGradientError", "", "", ""]
            cells.append([f"{loss_scale:.0e}", name, *errors])
    print_table("Dynamic-range problem y' = -(a t^2 + b t + c) y, 200 RK4 steps, relative error vs analytic gradients",
                ["loss scale", "solver", "dL/dy0", "dL/da", "dL/db", "dL/dc"], cells, left=("solver",))


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for scenario in SCENARIOS:
        for solver in SOLVERS:
            sel = [r for r in rows if r["scenario"] == scenario and r["solver"] == solver]
            finite = [r["rel_err_dA"] for r in sel if math.isfinite(r["rel_err_dA"])]
            out.append(dict(
                scenario=scenario, solver=solver,
                median_rel_err=statistics.median(finite) if finite else math.inf,
                usable_steps=f"{len(finite)}/{len(sel)}",
                loss_start=sel[0]["exact_loss"], loss_end=sel[-1]["exact_loss"],
            ))
    return out


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = pyplot().subplots(1, len(SCENARIOS), figsize=(14, 3.8), sharey=True)
    for ax, scenario in zip(axes, SCENARIOS):
        for solver in SOLVERS:
            sel = [r for r in rows if r["scenario"] == scenario and r["solver"] == solver]
            errs = [min(r["rel_err_dA"], 10.0) for r in sel]
            ax.semilogy([r["iteration"] for r in sel], errs, "-o", label=solver, markersize=4)
        ax.set_title(f"{scenario} (loss x {SCENARIOS[scenario]:g})")
        ax.set_xlabel("training step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("rel. error of dL/dA (10 = inf)")
    axes[-1].legend(fontsize=7)
    save_figure(fig, path, dpi=120)


def main(argv=None) -> None:
    p = script_parser("demo_scaler", __doc__.splitlines()[0])
    add_device_flag(p)
    add_number_flags(p, iters=5, steps=64, batch=16, T=1.0, lr=0.05)
    args = p.parse_args(argv)
    if args.smoke:
        args.iters, args.steps = 2, 16
    device = setup(args)
    dynamic_range_table(device)
    rows, scaler = run(args)
    write_csv(args.out / "demo_scaler.csv", rows)
    print_table("Learned stiff linear system under float16 autocast: error of dL/dA per training step",
                ["scenario", "solver", "median rel err dL/dA", "usable steps", "loss start", "loss end"],
                [[s["scenario"], s["solver"], f"{s['median_rel_err']:.2e}", s["usable_steps"],
                  f"{s['loss_start']:.3e}", f"{s['loss_end']:.3e}"] for s in summarise(rows)],
                left=("scenario", "solver"))
    if scaler is not None:
        print("\nDynamicAdjointScaler history, overflow scenario (backward pass, step, event, scale):")
        for e in scaler.history[:12]:
            print(f"  pass {e.backward} step {e.step:>3} {e.kind:<8} S = {e.scale:.3g}")
        print(f"  counters: {scaler.counters}, host syncs: {scaler.host_syncs}")
    plot(rows, args.out / "demo_scaler.png")
    print(f"wrote {args.out / 'demo_scaler.csv'} and {args.out / 'demo_scaler.png'}")


if __name__ == "__main__":
    main()
