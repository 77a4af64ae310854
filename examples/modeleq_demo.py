"""The main job: accuracy of mixed-precision solves of y' = A y against the matrix exponential.

For torchdiffeq under autocast (with autocast's weight-cast cache, its default, and
without it), and for mpnode, with euler and rk4, at 32 ... 8192 steps, in bfloat16
and float16, prints the relative errors of the solution y(T), of dL/dy0 and of
dL/dA (L = 1/2 ||y(T)||^2) against float64 ground truth and the bytes each solve
holds for backward, writes them to ``<out>/modeleq.csv`` and plots them to
``<out>/modeleq.png``.

    python examples/modeleq_demo.py [--out outputs/modeleq_demo]
    python examples/modeleq_demo.py --steps 32 256 2048     # a shorter run
    python examples/modeleq_demo.py --smoke                  # 32 and 256 steps (the tests)
"""

from __future__ import annotations

import time
from pathlib import Path

from mpnode.bench.experiment import (
    PRECISIONS, CSVLog, add_device_flag, autocast, label_steps, print_table, progress, pyplot, save_figure,
    script_parser, setup, solver,
)
from mpnode.core.testing import LinearODE, held_memory

QUANTITIES = ("yT", "dy0", "dA")


def run(args) -> list[dict]:
    device = setup(args)
    problem = LinearODE.random(dim=args.dim, batch=args.batch, seed=args.seed)
    grid = [(p, m, n, s) for p in args.precisions for m in args.methods for n in args.steps for s in args.solvers]
    log = CSVLog(args.out / "modeleq.csv")
    rows = []
    for precision, method, n, name in progress(grid, desc="solves", unit="solve"):
        start = time.perf_counter()
        # solve() runs the backward pass too: the held figure is the most held at once, before backward frees it
        with autocast(precision, device, cache=name != "torchdiffeq-nocache"), held_memory() as held:
            result = problem.solve(solver(name), n, method=method, device=device)
        errors = problem.errors(result)
        row = dict(precision=precision, method=method, steps=n, solver=name,
                   **{f"err_{q}": errors[q] for q in QUANTITIES}, held_bytes=held.peak_bytes,
                   seconds=time.perf_counter() - start)
        log.write(**row)
        rows.append(row)
    log.close()
    return rows


def print_results(rows: list[dict]) -> None:
    header = ["precision", "method", "steps", "solver", "rel err y(T)", "rel err dL/dy0", "rel err dL/dA",
              "held for backward"]
    cells = [[r["precision"], r["method"], str(r["steps"]), r["solver"]] + [f"{r[f'err_{q}']:.2e}" for q in QUANTITIES]
             + [f"{r['held_bytes'] / 2**10:.1f} KiB"] for r in rows]
    print_table("Relative error against the float64 matrix exponential (y' = A y)", header, cells)


def plot(rows: list[dict], path: Path) -> None:
    precisions = sorted({r["precision"] for r in rows}, key=list(PRECISIONS).index)
    methods = sorted({r["method"] for r in rows})
    fig, axes = pyplot().subplots(len(precisions), len(methods), figsize=(5 * len(methods), 3.6 * len(precisions)),
                             squeeze=False, sharex=True)
    styles = {"dA": "-o", "dy0": "--s", "yT": ":^"}
    colors = {"torchdiffeq": "tab:red", "torchdiffeq-nocache": "tab:orange", "mpnode": "tab:blue"}
    for i, p in enumerate(precisions):
        for j, m in enumerate(methods):
            ax = axes[i][j]
            for s in colors:
                sel = sorted((r for r in rows if (r["precision"], r["method"], r["solver"]) == (p, m, s)),
                             key=lambda r: r["steps"])
                if not sel:
                    continue
                for q, style in styles.items():
                    ax.loglog([r["steps"] for r in sel], [r[f"err_{q}"] for r in sel], style, color=colors[s],
                              label=f"{s} {q}", markersize=4)
            ax.set_title(f"{m}, {p} autocast")
            label_steps(ax, (r["steps"] for r in rows))
            ax.set_xlabel("steps")
            ax.set_ylabel("relative error")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, path, dpi=120)


def main(argv=None) -> None:
    parser = script_parser("modeleq_demo", __doc__.splitlines()[0])
    add_device_flag(parser)
    parser.add_argument("--steps", type=int, nargs="+", default=[32, 128, 512, 2048, 8192])
    parser.add_argument("--methods", nargs="+", default=["euler", "rk4"])
    parser.add_argument("--precisions", nargs="+", choices=["bfloat16", "float16"], default=["bfloat16", "float16"])
    parser.add_argument("--solvers", nargs="+", choices=["torchdiffeq", "torchdiffeq-nocache", "mpnode"],
                        default=["torchdiffeq", "torchdiffeq-nocache", "mpnode"],
                        help="torchdiffeq-nocache: torchdiffeq under autocast(..., cache_enabled=False)")
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = [32, 256]
    rows = run(args)
    print_results(rows)
    plot(rows, args.out / "modeleq.png")
    print(f"wrote {args.out / 'modeleq.csv'} and {args.out / 'modeleq.png'}")


if __name__ == "__main__":
    main()
