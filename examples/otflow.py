"""OT-Flow on a 2-D toy set or a higher-dimensional Gaussian mixture: NLL, L, HJB, MMD, time, memory.

    python examples/otflow.py --data 8gaussians --precision bfloat16 --odeint mpnode
    python examples/otflow.py --data gmm --dim 8
    python examples/otflow.py --method dopri5 --rtol 1e-4 --atol 1e-6     # adaptive steps

Writes ``<out>/otflow.csv`` (per iteration), ``<out>/summary.csv`` and
``<out>/otflow_samples.png`` (data vs generated samples, first two coordinates).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mpnode.bench.experiment import (
    add_method_flags, add_number_flags, add_solver_flags, is_adaptive, make_grad_scaler, pyplot, save_figure,
    script_parser, setup, solver, tolerance_kwargs, train, write_summary,
)
from mpnode.models.otflow import OTPotential, gaussian_mixture, generate, mmd, otflow_loss
from mpnode.models.toy_data import DATASETS, sample


def draw(args, n: int, gen: torch.Generator) -> torch.Tensor:
    if args.data == "gmm":
        return gaussian_mixture(n, args.dim, generator=gen)
    return sample(args.data, n, gen)


def main(argv=None) -> dict:
    p = script_parser("otflow", __doc__.splitlines()[0])
    add_solver_flags(p)
    p.add_argument("--data", choices=[*sorted(DATASETS), "gmm"], default="8gaussians")
    p.add_argument("--dim", type=int, default=8, help="dimension of the Gaussian mixture (--data gmm)")
    add_number_flags(p, iters=300, batch=256, width=32, layers=2, lr=2e-2)
    add_method_flags(p, steps=8)
    p.add_argument("--alphas", type=float, nargs=3, default=[1.0, 100.0, 5.0], metavar=("A_L", "A_C", "A_R"))
    args = p.parse_args(argv)
    if args.smoke:
        args.iters, args.batch, args.width, args.steps = 3, 32, 8, 2
    device = setup(args)
    odeint = solver(args.odeint)
    # a fixed method steps on the output grid; an adaptive one integrates [0, 1] in one output interval
    solve_kw = dict(n_steps=1 if is_adaptive(args.method) else args.steps, method=args.method, **tolerance_kwargs(args))
    dim = args.dim if args.data == "gmm" else 2
    potential = OTPotential(dim, args.width, args.layers).to(device)
    opt = torch.optim.Adam(potential.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    test = draw(args, 2000 if not args.smoke else 200, gen).to(device)
    run = train(potential, opt, make_grad_scaler(args.precision, device), device, args.precision, args.iters,
                draw_batch=lambda: draw(args, args.batch, gen).to(device),
                loss_fn=lambda x: otflow_loss(potential, x, odeint, alphas=tuple(args.alphas), **solve_kw),
                log_path=args.out / "otflow.csv", desc=f"otflow {args.data} {args.odeint} {args.precision}")
    with torch.no_grad():
        _, parts = otflow_loss(potential, test, odeint, alphas=tuple(args.alphas), **solve_kw)
        z = torch.randn(test.shape, generator=gen).to(device)
        generated = generate(potential, z, odeint, **solve_kw)
    summary = dict(data=args.data, dim=dim, odeint=args.odeint, precision=args.precision, method=args.method,
                   iters=args.iters,
                   test_nll=parts["nll"], L=parts["L"], HJB=parts["R"], mmd=mmd(generated.cpu(), test.cpu()),
                   median_iter_s=run.median_iter_s, held_bytes=run.held_bytes)
    write_summary(summary, args.out)
    plot(test.cpu(), generated.cpu(), args.out / "otflow_samples.png")
    return summary


def plot(data: torch.Tensor, generated: torch.Tensor, path: Path) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    for ax, pts, title in zip(axes, (data, generated), ("data", "generated (z ~ N(0, I) pulled back)")):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_title(title, fontsize=9)
    save_figure(fig, path, dpi=100)


if __name__ == "__main__":
    main()
