"""CNF on the 8-Gaussians density (FFJORD's toy): train, report NLL, time and memory, plot densities.

    python examples/cnf8g.py --precision bfloat16 --odeint mpnode --iters 300
    python examples/cnf8g.py --method dopri5 --rtol 1e-4 --atol 1e-6      # adaptive steps

Writes ``<out>/cnf8g.csv`` (one row per iteration), ``<out>/summary.csv`` and
``<out>/cnf8g_density.png`` (true vs learned density).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mpnode.bench.experiment import (
    add_method_flags, add_number_flags, add_solver_flags, is_adaptive, make_grad_scaler, pyplot, save_figure,
    script_parser, setup, solver, tolerance_kwargs, train, write_summary,
)
from mpnode.models.cnf import CNF, HyperNetField
from mpnode.models.toy_data import eight_gaussians_log_density, sample


def main(argv=None) -> dict:
    p = script_parser("cnf8g", __doc__.splitlines()[0])
    add_solver_flags(p)
    add_number_flags(p, iters=300, batch=256, width=32, lr=1e-2)
    add_method_flags(p, steps=8)
    p.add_argument("--divergence", choices=["exact", "hutchinson"], default="exact")
    args = p.parse_args(argv)
    if args.smoke:
        args.iters, args.batch, args.width, args.steps = 3, 32, 8, 2
    device = setup(args)
    odeint = solver(args.odeint)
    cnf = CNF(HyperNetField(width=args.width), divergence=args.divergence).to(device)
    opt = torch.optim.Adam(cnf.parameters(), lr=args.lr)
    t = torch.tensor([0.0, 1.0], device=device)
    kw = dict(method=args.method, **tolerance_kwargs(args))
    if not is_adaptive(args.method):
        kw["options"] = {"step_size": 1.0 / args.steps}
    gen = torch.Generator().manual_seed(args.seed)
    test = sample("8gaussians", 2000 if not args.smoke else 200, gen).to(device)
    run = train(cnf, opt, make_grad_scaler(args.precision, device), device, args.precision, args.iters,
                draw_batch=lambda: sample("8gaussians", args.batch, gen).to(device),
                loss_fn=lambda x: -cnf.log_prob(x, odeint, t, **kw).mean(),
                log_path=args.out / "cnf8g.csv", desc=f"cnf8g {args.odeint} {args.precision}")
    with torch.no_grad():
        nll = float(-cnf.log_prob(test, odeint, t, **kw).mean())  # evaluated in float32
        true_nll = float(-eight_gaussians_log_density(test.double().cpu()).mean())
    summary = dict(odeint=args.odeint, precision=args.precision, method=args.method, iters=args.iters, test_nll=nll,
                   true_nll=true_nll,
                   median_iter_s=run.median_iter_s, held_bytes=run.held_bytes)
    write_summary(summary, args.out)
    plot(cnf, odeint, kw, t, device, args.out / "cnf8g_density.png")
    return summary


def plot(cnf, odeint, kw, t, device, path: Path) -> None:
    grid = torch.linspace(-4, 4, 100)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    with torch.no_grad():
        learned = torch.cat([cnf.log_prob(c.to(device), odeint, t, **kw).cpu() for c in pts.split(2500)]).exp()
    true = eight_gaussians_log_density(pts.double()).exp()
    fig, axes = pyplot().subplots(1, 2, figsize=(8, 4))
    for ax, dens, title in zip(axes, (true, learned), ("true density", "learned density")):
        ax.imshow(dens.reshape(100, 100).numpy(), origin="lower", extent=(-4, 4, -4, 4), cmap="viridis")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, path, dpi=100)


if __name__ == "__main__":
    main()
