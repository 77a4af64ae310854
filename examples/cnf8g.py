"""CNF on the 8-Gaussians density (FFJORD's toy): train, report NLL, time and memory, plot densities.

    python examples/cnf8g.py --precision bfloat16 --odeint mpnode --iters 300

Writes ``<out>/cnf8g.csv`` (one row per iteration), ``<out>/summary.csv`` and
``<out>/cnf8g_density.png`` (true vs learned density).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import CSVLog, autocast, base_parser, profiled_train_step, setup, solver  # noqa: E402

from mpnode.models.cnf import CNF, HyperNetField  # noqa: E402
from mpnode.models.toy_data import eight_gaussians_log_density, sample  # noqa: E402


def main(argv=None) -> dict:
    p = base_parser("cnf8g", __doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="RK4 steps on [0, 1]")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--divergence", choices=["exact", "hutchinson"], default="exact")
    args = p.parse_args(argv)
    if args.smoke:
        args.iters, args.batch, args.width, args.steps = 3, 32, 8, 2
    device = setup(args)
    odeint = solver(args.odeint)
    cnf = CNF(HyperNetField(width=args.width), divergence=args.divergence).to(device)
    opt = torch.optim.Adam(cnf.parameters(), lr=args.lr)
    grad_scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "float16")
    t = torch.tensor([0.0, 1.0], device=device)
    kw = dict(method="rk4", options={"step_size": 1.0 / args.steps})
    gen = torch.Generator().manual_seed(args.seed)
    test = sample("8gaussians", 2000 if not args.smoke else 200, gen).to(device)
    log = CSVLog(args.out / "cnf8g.csv")
    times = []
    held = None
    for it in tqdm(range(args.iters), desc=f"cnf8g {args.odeint} {args.precision}"):
        x = sample("8gaussians", args.batch, gen).to(device)
        def compute_loss():
            with autocast(args, device):
                return -cnf.log_prob(x, odeint, t, **kw).mean()

        rec, loss = profiled_train_step(device, cnf, opt, grad_scaler, compute_loss)
        times.append(rec.time_s)
        held = rec.held_bytes
        log.write(iteration=it, loss=float(loss.detach()), time_s=rec.time_s, held_bytes=rec.held_bytes)
    log.close()
    with torch.no_grad():
        nll = float(-cnf.log_prob(test, odeint, t, **kw).mean())  # evaluated in float32
        true_nll = float(-eight_gaussians_log_density(test.double().cpu()).mean())
    summary = dict(odeint=args.odeint, precision=args.precision, iters=args.iters, test_nll=nll, true_nll=true_nll,
                   median_iter_s=statistics.median(times), held_bytes=held)
    s = CSVLog(args.out / "summary.csv")
    s.write(**summary)
    s.close()
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    plot(cnf, odeint, kw, t, device, args.out / "cnf8g_density.png")
    return summary


def plot(cnf, odeint, kw, t, device, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.linspace(-4, 4, 100)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    with torch.no_grad():
        learned = torch.cat([cnf.log_prob(c.to(device), odeint, t, **kw).cpu() for c in pts.split(2500)]).exp()
    true = eight_gaussians_log_density(pts.double()).exp()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, dens, title in zip(axes, (true, learned), ("true density", "learned density")):
        ax.imshow(dens.reshape(100, 100).numpy(), origin="lower", extent=(-4, 4, -4, 4), cmap="viridis")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
