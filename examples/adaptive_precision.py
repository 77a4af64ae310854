"""Adaptive dopri5 in mixed precision: gradient error and accepted steps, mpnode vs torchdiffeq under autocast.

For ``y' = A y`` (8x8, a batch of 4) and a time-dependent tanh MLP field (weights
scaled by 2, the same ``y0``), on ``[0, T]`` with ``L = 1/2 ||y(T)||^2``, prints and
writes to ``<out>/adaptive_precision.csv``:

* the accuracy targets: bfloat16 at ``rtol = atol = 1e-2`` and float16 at ``1e-3``,
  mpnode and torchdiffeq's dopri5 under the same autocast, against a float32 solve at
  the same tolerance: relative error of dL/dtheta against a float64 solve at 1e-10,
  its ratio to float32's, the accepted steps and the vector-field evaluations;
* tolerances below the floor: ``rtol = atol = 1e-7`` under bfloat16, where
  torchdiffeq's controller chases the rounding of the field (evaluations, time) and
  mpnode raises rtol to the floor with one warning.

    python examples/adaptive_precision.py [--T 5] [--out outputs/adaptive_precision]
    python examples/adaptive_precision.py --smoke
"""

from __future__ import annotations

import time
import warnings

import torch

from mpnode.bench.experiment import PRECISIONS, CSVLog, add_device_flag, add_number_flags, autocast, print_table
from mpnode.bench.experiment import pyplot, save_figure, script_parser, setup, solver
from mpnode.core import SolverStats
from mpnode.core.testing import LinearField, LinearODE, MLPField

TARGETS = (("bfloat16", 1e-2), ("float16", 1e-3))


class Counted(torch.nn.Module):
    """Counts the evaluations of ``field`` and the accepted steps a solver reports through ``callback_accept_step``."""

    def __init__(self, field: torch.nn.Module) -> None:
        super().__init__()
        self.field = field
        self.nfe = 0
        self.accepted = 0

    def forward(self, t, y):
        self.nfe += 1
        return self.field(t, y)

    def callback_accept_step(self, t0, y0, dt):
        self.accepted += 1


def problems(seed: int) -> dict[str, torch.nn.Module]:
    linear = LinearODE.random(dim=8, batch=4, seed=seed)
    torch.manual_seed(seed + 1)
    return {"linear": LinearField(linear.A), "mlp": MLPField(dim=8, width=32, gain=2.0).double()}, linear.y0


def solve(field, y0, T, name, precision, tol, device) -> dict:
    """dL/dtheta (flattened, float64), accepted steps, evaluations and seconds of one dopri5 solve."""
    dtype = torch.float64 if precision == "float64" else torch.float32
    counted = Counted(field.to(device=device, dtype=dtype))
    y = y0.to(device=device, dtype=dtype)
    t = torch.tensor([0.0, T], device=device, dtype=dtype)
    stats = SolverStats()
    kwargs = dict(method="dopri5", rtol=tol, atol=tol)
    if name == "mpnode":
        kwargs["options"] = {"stats": stats}
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, autocast(precision if precision in PRECISIONS else "float32", device):
        warnings.simplefilter("always")
        out = solver(name)(counted, y, t, **kwargs)
        loss = 0.5 * out[-1].float().pow(2).sum()
    grads = torch.autograd.grad(loss, list(counted.field.parameters()))
    seconds = time.perf_counter() - start
    accepted = stats.steps if name == "mpnode" else counted.accepted
    return dict(grad=torch.cat([g.flatten() for g in grads]).double().cpu(), accepted=accepted, nfe=counted.nfe,
                seconds=seconds, warned=any("can resolve" in str(w.message) for w in caught))


def rel(g, ref) -> float:
    return float((g - ref).norm() / ref.norm())


def run(args, device) -> list[dict]:
    fields, y0 = problems(args.seed)
    rows = []
    log = CSVLog(args.out / "adaptive_precision.csv")
    for problem, field in fields.items():
        ref = solve(field, y0, args.T, "mpnode", "float64", 1e-10, device)["grad"]
        cases = list(TARGETS) if not args.smoke else [TARGETS[0]]
        for precision, tol in cases:
            base = solve(field, y0, args.T, "mpnode", "float32", tol, device)
            for name, prec in (("mpnode", "float32"), ("mpnode", precision), ("torchdiffeq", precision)):
                r = base if prec == "float32" else solve(field, y0, args.T, name, prec, tol, device)
                row = dict(problem=problem, solver=name, precision=prec, rtol=tol, accepted=r["accepted"], nfe=r["nfe"],
                           grad_err=rel(r["grad"], ref), err_vs_f32=rel(r["grad"], ref) / rel(base["grad"], ref),
                           steps_vs_f32=r["accepted"] / base["accepted"], seconds=r["seconds"], floor_warning=r["warned"])
                log.write(**row)
                rows.append(row)
        if problem == "mlp":
            for name in ("mpnode", "torchdiffeq"):
                r = solve(field, y0, args.T, name, "bfloat16", args.tight, device)
                row = dict(problem=problem, solver=name, precision="bfloat16", rtol=args.tight, accepted=r["accepted"],
                           nfe=r["nfe"], grad_err=rel(r["grad"], ref), err_vs_f32=float("nan"), steps_vs_f32=float("nan"),
                           seconds=r["seconds"], floor_warning=r["warned"])
                log.write(**row)
                rows.append(row)
    log.close()
    return rows


def show(rows: list[dict]) -> None:
    header = ["problem", "solver", "precision", "rtol=atol", "accepted", "evals (fwd+bwd)", "dL/dθ err", "err / f32",
              "steps / f32", "s", "floor warn"]
    cells = [[r["problem"], r["solver"], r["precision"], f"{r['rtol']:.0e}", str(r["accepted"]), str(r["nfe"]),
              f"{r['grad_err']:.2e}", f"{r['err_vs_f32']:.2f}", f"{r['steps_vs_f32']:.2f}", f"{r['seconds']:.2f}",
              "yes" if r["floor_warning"] else ""] for r in rows]
    print_table("dopri5 under autocast: dL/dθ error against float64 (rtol=atol=1e-10), targets: err/f32 <= 3, "
                "steps/f32 <= 1.5", header, cells)


def plot(rows: list[dict], path) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.6))
    for ax, problem in zip(axes, ("linear", "mlp")):
        sel = [r for r in rows if r["problem"] == problem and r["rtol"] >= 1e-3]
        labels = [f"{r['solver']}\n{r['precision']}\n{r['rtol']:.0e}" for r in sel]
        ax.bar(range(len(sel)), [r["grad_err"] for r in sel], color=["tab:blue" if r["solver"] == "mpnode" else "tab:red"
                                                                      for r in sel])
        ax.set_xticks(range(len(sel)), labels, fontsize=6)
        ax.set_yscale("log")
        ax.set(title=f"{problem}: dL/dθ relative error", ylabel="vs float64")
    save_figure(fig, path, dpi=110)


def main(argv=None) -> list[dict]:
    parser = script_parser("adaptive_precision", __doc__.splitlines()[0])
    add_device_flag(parser)
    add_number_flags(parser, T=5.0, tight=1e-7)
    args = parser.parse_args(argv)
    if args.smoke:
        args.T, args.tight = 1.0, 1e-4
    device = setup(args)
    rows = run(args, device)
    show(rows)
    plot(rows, args.out / "adaptive_precision.png")
    print(f"wrote {args.out / 'adaptive_precision.csv'} and {args.out / 'adaptive_precision.png'}")
    return rows


if __name__ == "__main__":
    main()
