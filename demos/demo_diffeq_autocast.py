"""What torchdiffeq does under autocast, next to mpnode: the dtype of every quantity, and gradient error growth.

Part 1 solves ``y' = A y`` (``A`` 8x8, 4 states, float32 ``y0``, 8 RK4 steps)
under bfloat16 autocast with each solver and reports

* through a wrapper of ``func``: the dtypes of the time and state handed to the
  vector field, of its output ``k_i``, of the gradient arriving at ``k_i`` in
  backward, of the returned solution and of the final ``.grad`` fields;
* through a ``TorchDispatchMode`` census: every elementwise sum or product
  (``add``, ``sub``, ``mul``, ``div``, their in-place and ``_foreach_`` forms) outside the vector
  field, by phase (forward/backward), size (state-sized, weight-sized) and
  dtype; these are the Runge-Kutta stage and state sums, the adjoint and the
  gradient accumulation.

Part 2 measures the relative error of ``dL/dA`` and ``dL/dy0``
(``L = 1/2 ||y(1)||^2``) against the float64 matrix exponential as the number
of RK4 steps grows, for both solvers in bfloat16 and float16.

Writes ``<out>/dtypes.csv``, ``<out>/census.csv``, ``<out>/errors.csv`` and
``<out>/diffeq_autocast.png``.

    python demos/demo_diffeq_autocast.py [--smoke] [--out outputs/demo_diffeq_autocast]
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mpnode.bench.experiment import (
    label_steps, print_table, progress, pyplot, save_figure, script_parser, setup, solver, write_csv,
)
from mpnode.core.testing import LinearField, LinearODE

SOLVERS = ("torchdiffeq", "mpnode")
ARITH = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "addcmul_", "lerp_"}


def _name(t) -> str:
    return str(t.dtype).replace("torch.", "") if isinstance(t, torch.Tensor) else type(t).__name__


class Recorder(nn.Module):
    """Wraps a vector field; records the dtypes of what goes in and out (and of the gradient at its output)."""

    def __init__(self, func: nn.Module) -> None:
        super().__init__()
        self.func = func
        self.seen: dict[str, set[str]] = {"t given to func": set(), "y given to func (stage inputs)": set(),
                                          "k = func(t, y)": set(), "gradient arriving at k (backward)": set()}
        self.inside = False

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen["t given to func"].add(_name(t))
        self.seen["y given to func (stage inputs)"].add(_name(y))
        self.inside = True
        try:
            k = self.func(t, y)
        finally:
            self.inside = False
        self.seen["k = func(t, y)"].add(_name(k))
        if k.requires_grad:
            k.register_hook(lambda g: self.seen["gradient arriving at k (backward)"].add(_name(g)))
        return k


class ArithmeticCensus(TorchDispatchMode):
    """Counts elementwise arithmetic outside the vector field by (phase, size class, dtype)."""

    def __init__(self, recorder: Recorder, state_numel: int, weight_numel: int) -> None:
        super().__init__()
        self.recorder, self.sizes = recorder, {state_numel: "state-sized", weight_numel: "weight-sized"}
        self.phase = "forward"
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = func.overloadpacket.__name__
        if self.recorder.inside or op.lstrip("_").removeprefix("foreach_") not in ARITH:
            return out
        if op.startswith("_foreach_"):  # fused list ops: one sum per tensor of the list (in place: the first argument)
            results = args[0] if op.endswith("_") else out
        else:
            results = [out]
        for r in results:
            if isinstance(r, torch.Tensor) and r.is_floating_point():
                size = self.sizes.get(r.numel())
                if size is not None:
                    self.counts[(self.phase, size, _name(r))] += 1
        return out


def dtype_census(solver_name: str, dtype: torch.dtype, steps: int = 8, seed: int = 0
                 ) -> tuple[dict[str, str], Counter]:
    """Part 1 for one solver: ``(quantity -> dtypes, arithmetic census)``."""
    problem = LinearODE.random(dim=8, batch=4, seed=seed)
    rec = Recorder(LinearField(problem.A.float()))
    y0 = problem.y0.float().requires_grad_(True)
    t = torch.linspace(0.0, 1.0, steps + 1)
    census = ArithmeticCensus(rec, y0.numel(), problem.A.numel())
    with census:
        with torch.autocast("cpu", dtype=dtype):
            out = solver(solver_name)(rec, y0, t, method="rk4")
            loss = 0.5 * (out[-1].float() ** 2).sum()
        census.phase = "backward"
        loss.backward()
    table = {k: ", ".join(sorted(v)) or "-" for k, v in rec.seen.items()}
    table["solution returned"] = _name(out)
    table["y0.grad"] = _name(y0.grad)
    table["A.grad"] = _name(rec.func.A.grad)
    return table, census.counts


def error_growth(steps: list[int], precisions: list[str], seed: int = 0) -> list[dict]:
    """Part 2: relative errors of dL/dA and dL/dy0 against the matrix exponential."""
    problem = LinearODE.random(dim=8, batch=4, seed=seed)
    rows = []
    grid = [(p, n, s) for p in precisions for n in steps for s in SOLVERS]
    for precision, n, name in progress(grid, desc="solves", unit="solve"):
        with torch.autocast("cpu", dtype=getattr(torch, precision)):
            result = problem.solve(solver(name), n, method="rk4")
        err = problem.errors(result)
        rows.append(dict(precision=precision, steps=n, solver=name, err_dA=err["dA"], err_dy0=err["dy0"],
                         err_yT=err["yT"]))
    return rows


def print_tables(dtypes: dict[str, dict[str, str]], census: dict[str, Counter], rows: list[dict], low: str) -> None:
    print_table(f"dtypes under {low} autocast (float32 y0 and A, RK4)", ["quantity", *SOLVERS],
                [[q, *(dtypes[s][q] for s in SOLVERS)] for q in dtypes[SOLVERS[0]]], left=("quantity", *SOLVERS))
    keys = sorted({(p, z) for s in SOLVERS for (p, z, _) in census[s]}, key=lambda k: (k[0] != "forward", k[1]))
    cells = []
    for phase, size in keys:
        counts = []
        for s in SOLVERS:
            c = {d: n for (p, z, d), n in census[s].items() if (p, z) == (phase, size)}
            counts.append(", ".join(f"{n} {d}" for d, n in sorted(c.items())) or "-")
        cells.append([phase, size, *counts])
    print_table("elementwise sums/products outside the vector field (count by dtype)", ["phase", "size", *SOLVERS],
                cells, left=("phase", "size", *SOLVERS))
    print_table("relative error against the float64 matrix exponential (RK4, y' = A y)",
                ["precision", "steps", "solver", "dL/dA", "dL/dy0", "y(1)"],
                [[r["precision"], str(r["steps"]), r["solver"], f"{r['err_dA']:.2e}", f"{r['err_dy0']:.2e}",
                  f"{r['err_yT']:.2e}"] for r in rows])


def plot(rows: list[dict], path: Path) -> None:
    precisions = sorted({r["precision"] for r in rows})
    fig, axes = pyplot().subplots(1, len(precisions), figsize=(5.5 * len(precisions), 4), squeeze=False)
    colors = {"torchdiffeq": "tab:red", "mpnode": "tab:blue"}
    for ax, p in zip(axes[0], precisions):
        for s, c in colors.items():
            sel = sorted((r for r in rows if r["precision"] == p and r["solver"] == s), key=lambda r: r["steps"])
            ax.loglog([r["steps"] for r in sel], [r["err_dA"] for r in sel], "-o", color=c, label=f"{s} dL/dA")
            ax.loglog([r["steps"] for r in sel], [r["err_dy0"] for r in sel], "--s", color=c, label=f"{s} dL/dy0")
        ax.set(title=f"{p} autocast, RK4", xlabel="steps", ylabel="relative gradient error")
        label_steps(ax, (r["steps"] for r in rows))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def main(argv=None) -> dict:
    parser = script_parser("demo_diffeq_autocast", __doc__.splitlines()[0])
    parser.add_argument("--census-dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = parser.parse_args(argv)  # --smoke: steps 16, 64, 256 and bfloat16 only in part 2
    setup(args)
    low = getattr(torch, args.census_dtype)
    dtypes, census = {}, {}
    for s in SOLVERS:
        dtypes[s], census[s] = dtype_census(s, low, seed=args.seed)
    steps = [16, 64, 256] if args.smoke else [32, 128, 512, 2048, 8192]
    precisions = ["bfloat16"] if args.smoke else ["bfloat16", "float16"]
    rows = error_growth(steps, precisions, seed=args.seed)
    print_tables(dtypes, census, rows, args.census_dtype)
    write_csv(args.out / "dtypes.csv",
              [dict(quantity=q, **{s: dtypes[s][q] for s in SOLVERS}) for q in dtypes[SOLVERS[0]]])
    write_csv(args.out / "census.csv", [dict(solver=s, phase=p, size=z, dtype=d, count=n)
                                        for s in SOLVERS for (p, z, d), n in sorted(census[s].items())])
    write_csv(args.out / "errors.csv", rows)
    plot(rows, args.out / "diffeq_autocast.png")
    print(f"wrote dtypes.csv, census.csv, errors.csv and diffeq_autocast.png under {args.out}")
    return {"dtypes": dtypes, "census": census, "errors": rows}


if __name__ == "__main__":
    main()
