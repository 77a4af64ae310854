"""CNF on the 8-Gaussians density (FFJORD's toy): train, report NLL, time and memory, plot densities.

A continuous normalizing flow (:class:`mpnode.models.cnf.CNF` with the hypernetwork field
:class:`~mpnode.models.cnf.HyperNetField`) maps data to a standard normal over ``t`` in [0, 1];
``log p(x) = log N(z(1)) - l(1)`` with ``dl/dt = tr(df/dz)``.  Each iteration draws ``--batch``
points, maximises their log-likelihood with Adam and measures the iteration's wall time and the
bytes autograd keeps for backward (weights excluded).

Writes ``<out>/cnf8g.csv`` (one row per iteration: loss, time, held bytes), ``<out>/summary.csv``
(test NLL on held-out samples, exact NLL of the density, median time per iteration, held bytes)
and ``<out>/cnf8g_density.png`` (true vs learned density).

Needs torch, mpnode-core, mpnode-models (the model, the data and the flags) and matplotlib (torchdiffeq for
``--odeint torchdiffeq``).

    python examples/cnf8g.py --precision bfloat16 --odeint mpnode --iters 300
    python examples/cnf8g.py --method dopri5 --rtol 1e-4 --atol 1e-6      # adaptive steps
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

import mpnode.core
from mpnode.core.meters import held_memory
from mpnode.models.cli import (
    PRECISIONS, add_method_flags, add_number_flags, add_solver_flags, script_parser, setup, solver,
    write_csv,
)
from mpnode.models.cnf import CNF, HyperNetField
from mpnode.models.toy_data import eight_gaussians_log_density, sample

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = script_parser("cnf8g", __doc__.splitlines()[0])
    add_solver_flags(p)
    add_method_flags(p, steps=8)  # a fixed grid of --steps on [0, 1], or adaptive steps
    p.add_argument("--divergence", choices=["exact", "hutchinson"], default="exact")
    p.add_argument("--width", type=int, default=32, help="width of the hypernetwork field")
    add_number_flags(p, iters=300, batch=256, lr=1e-2)
    args = p.parse_args(argv)
    if args.smoke:
        args.iters, args.batch, args.width, args.steps = 3, 32, 8, 2
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = setup(args)
    odeint = solver(args.odeint)
    autocast = torch.autocast(device.type, dtype=PRECISIONS[args.precision], enabled=args.precision != "float32")
    grad_scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "float16")
    t = torch.tensor([0.0, 1.0], device=device)
    solve_kw = dict(method=args.method, rtol=args.rtol, atol=args.atol)  # a fixed-grid method ignores rtol/atol
    if not mpnode.core.get_tableau(args.method).is_adaptive:
        solve_kw["options"] = {"step_size": 1.0 / args.steps}

    cnf = CNF(HyperNetField(width=args.width), divergence=args.divergence).to(device)
    opt = torch.optim.Adam(cnf.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    test = sample("8gaussians", 200 if args.smoke else 2000, gen).to(device)
    weights = list(cnf.parameters())
    rows = []
    for it in range(args.iters):
        x = sample("8gaussians", args.batch, gen).to(device)
        start = time.perf_counter()
        with held_memory(exclude=weights) as held:  # peak_bytes: what the forward held for backward
            with autocast:
                loss = -cnf.log_prob(x, odeint, t, **solve_kw).mean()
            opt.zero_grad(set_to_none=True)
            grad_scaler.scale(loss).backward()
            grad_scaler.step(opt)
            grad_scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append(dict(iteration=it, loss=loss.item(), time_s=time.perf_counter() - start,
                         held_bytes=held.peak_bytes))
        if it % 25 == 0 or it == args.iters - 1:
            print(f"iter {it:4d} | loss {rows[-1]['loss']:.4f} | {rows[-1]['time_s'] * 1e3:.0f} ms", flush=True)
    write_csv(args.out / "cnf8g.csv", rows)

    with torch.no_grad():
        nll = float(-cnf.log_prob(test, odeint, t, **solve_kw).mean())  # evaluated in float32
        true_nll = float(-eight_gaussians_log_density(test.double().cpu()).mean())
    summary = dict(odeint=args.odeint, precision=args.precision, method=args.method, iters=args.iters, test_nll=nll,
                   true_nll=true_nll, median_iter_s=statistics.median(r["time_s"] for r in rows),
                   held_bytes=rows[-1]["held_bytes"])
    write_csv(args.out / "summary.csv", [summary])
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    plot(cnf, odeint, solve_kw, t, device, args.out / "cnf8g_density.png")
    return summary


def plot(cnf: CNF, odeint, solve_kw: dict, t: torch.Tensor, device: torch.device, path: Path) -> None:
    """True and learned density on a 100 x 100 grid over [-4, 4]^2."""
    grid = torch.linspace(-4, 4, 100)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    with torch.no_grad():
        learned = torch.cat([cnf.log_prob(c.to(device), odeint, t, **solve_kw).cpu() for c in pts.split(2500)]).exp()
    true = eight_gaussians_log_density(pts.double()).exp()
    fig = Figure(figsize=(8, 4))
    for ax, density, title in zip(fig.subplots(1, 2), (true, learned), ("true density", "learned density")):
        ax.imshow(density.reshape(100, 100).numpy(), origin="lower", extent=(-4, 4, -4, 4), cmap="viridis")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
