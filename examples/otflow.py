"""OT-Flow on a 2-D toy set or a higher-dimensional Gaussian mixture: NLL, L, HJB, MMD, time, memory.

OT-Flow (:mod:`mpnode.models.otflow`) moves data to a standard normal along the gradient of a
potential ``Phi(x, t)``; the ODE carries the state ``x``, the log-determinant ``l``, the transport
cost ``L`` and the HJB penalty ``R``, and the loss is ``a_L L + a_C C + a_R R`` with ``C`` the
negative log-likelihood.  Each iteration draws ``--batch`` points, takes an Adam step and measures
the iteration's wall time and the bytes autograd keeps for backward (weights excluded).

Writes ``<out>/otflow.csv`` (per iteration: loss, L, C, R, NLL, time, held bytes),
``<out>/summary.csv`` (test NLL, L, HJB, MMD of generated vs held-out samples, median time per
iteration, held bytes) and ``<out>/otflow_samples.png`` (data vs generated samples, first two
coordinates).

Needs torch, mpnode-core, mpnode-models (the model, the data and the flags) and matplotlib (torchdiffeq for
``--odeint torchdiffeq``).

    python examples/otflow.py --data 8gaussians --precision bfloat16 --odeint mpnode
    python examples/otflow.py --data gmm --dim 8
    python examples/otflow.py --method dopri5 --rtol 1e-4 --atol 1e-6     # adaptive steps
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
from mpnode.models.otflow import OTPotential, gaussian_mixture, generate, mmd, otflow_loss
from mpnode.models.toy_data import DATASETS, sample

def draw(args: argparse.Namespace, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` samples ``(n, d)`` of the training density (``--data``)."""
    if args.data == "gmm":
        return gaussian_mixture(n, args.dim, generator=gen)
    return sample(args.data, n, gen)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = script_parser("otflow", __doc__.splitlines()[0])
    p.add_argument("--data", choices=[*sorted(DATASETS), "gmm"], default="8gaussians")
    p.add_argument("--dim", type=int, default=8, help="dimension of the Gaussian mixture (--data gmm)")
    add_solver_flags(p)
    add_method_flags(p, steps=8)  # a fixed grid of --steps on [0, 1], or adaptive steps
    p.add_argument("--alphas", type=float, nargs=3, default=[1.0, 100.0, 5.0], metavar=("A_L", "A_C", "A_R"),
                   help="weights of the transport cost L, the NLL C and the HJB penalty R")
    add_number_flags(p, iters=300, batch=256, width=32, layers=2, lr=2e-2)
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
    # the output times: a fixed method steps on them (n_steps + 1 points on [0, 1]); an adaptive one
    # integrates [0, 1] in one output interval, choosing its own steps
    adaptive = mpnode.core.get_tableau(args.method).is_adaptive
    solve_kw = dict(n_steps=1 if adaptive else args.steps, method=args.method, rtol=args.rtol, atol=args.atol)
    alphas = tuple(args.alphas)

    dim = args.dim if args.data == "gmm" else 2
    potential = OTPotential(dim, args.width, args.layers).to(device)
    opt = torch.optim.Adam(potential.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    test = draw(args, 200 if args.smoke else 2000, gen).to(device)
    weights = list(potential.parameters())
    rows = []
    for it in range(args.iters):
        x = draw(args, args.batch, gen).to(device)
        start = time.perf_counter()
        with held_memory(exclude=weights) as held:  # peak_bytes: what the forward held for backward
            with autocast:
                loss, parts = otflow_loss(potential, x, odeint, alphas=alphas, **solve_kw)
            opt.zero_grad(set_to_none=True)
            grad_scaler.scale(loss).backward()
            grad_scaler.step(opt)
            grad_scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append(dict(iteration=it, loss=loss.item(), **parts, time_s=time.perf_counter() - start,
                         held_bytes=held.peak_bytes))
        if it % 25 == 0 or it == args.iters - 1:
            print(f"iter {it:4d} | loss {rows[-1]['loss']:.4f} | NLL {parts['nll']:.4f} | "
                  f"{rows[-1]['time_s'] * 1e3:.0f} ms", flush=True)
    write_csv(args.out / "otflow.csv", rows)

    with torch.no_grad():
        _, parts = otflow_loss(potential, test, odeint, alphas=alphas, **solve_kw)
        z = torch.randn(test.shape, generator=gen).to(device)
        generated = generate(potential, z, odeint, **solve_kw)
    summary = dict(data=args.data, dim=dim, odeint=args.odeint, precision=args.precision, method=args.method,
                   iters=args.iters, test_nll=parts["nll"], L=parts["L"], HJB=parts["R"],
                   mmd=mmd(generated.cpu(), test.cpu()), median_iter_s=statistics.median(r["time_s"] for r in rows),
                   held_bytes=rows[-1]["held_bytes"])
    write_csv(args.out / "summary.csv", [summary])
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    plot(test.cpu(), generated.cpu(), args.out / "otflow_samples.png")
    return summary


def plot(data: torch.Tensor, generated: torch.Tensor, path: Path) -> None:
    fig = Figure(figsize=(8, 4))
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, pts, title in zip(axes, (data, generated), ("data", "generated (z ~ N(0, I) pulled back)")):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
