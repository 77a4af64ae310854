"""Taylor test of mpnode's gradients for inputs, weights and times, in float64, float32, bfloat16 and float16.

For a loss ``L(p)`` of an ``odeint`` solve, its gradient ``g`` computed in one
precision, and a random unit direction ``v``, the remainder

    r(eps) = |L(p + eps v) - L(p) - eps g.v|

falls as ``eps^2`` while ``g`` is right, until ``eps |dg.v|`` (the error of
``g`` along ``v``) takes over and ``r`` falls only as ``eps``.  ``L`` itself is
always evaluated in float64 (the same discrete RK4 solve, no autocast), so the
floor comes from the gradient alone; the gradients are computed in float64,
float32 and, with a float32 state, under bfloat16 and float16 autocast.
The first difference ``|L(p + eps v) - L(p)|`` falls as ``eps``.

Prints, for each precision and parameter kind, the slope of ``log r`` against
``log eps`` fitted over the longest run of ``eps^2`` behaviour, its width in
decades, and the relative error of ``g.v``; writes ``<out>/taylor.csv`` and
``<out>/taylor.png``.

    python demos/demo_taylor.py [--smoke] [--out outputs/demo_taylor]
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import torch
from torch import nn

from mpnode.bench.experiment import print_table, progress, pyplot, save_figure, script_parser, setup, write_csv
from mpnode.bench.report import linear_fit
from mpnode.core import odeint

PRECISIONS = ("float64", "float32", "bfloat16", "float16")
KINDS = ("inputs", "weights", "times")
EPS0 = {"inputs": 1.0, "weights": 1.0}  # times: the largest eps that keeps the perturbed times ordered (see run)


class Field(nn.Module):
    """``f(t, y) = W2 tanh(W1 y + b1) (1 + 0.5 sin 3t)`` on states ``(B, dim)``."""

    def __init__(self, dim: int = 4, width: int = 32) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim, width)
        self.l2 = nn.Linear(width, dim, bias=False)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(y))) * (1 + 0.5 * torch.sin(3 * t))


class Problem:
    """The point ``p`` (``y0 (B, 4)``, the field's weights, output times ``(9,)``) and the loss.

    Every tensor is created in float32 and copied to float64, so all
    precisions differentiate at exactly the same point.
    ``L = 1/2 mean_j ||y(t_j) - target_j||^2`` with the target the float64
    solution at ``p`` plus ``offset`` times fixed Gaussian noise.
    """

    def __init__(self, seed: int = 0, batch: int = 8, offset: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.field32 = Field()
        self.y0 = 0.5 * torch.randn(batch, 4, generator=g)
        self.t = torch.linspace(0.0, 2.0, 9)
        self.field64 = copy.deepcopy(self.field32).double()
        with torch.no_grad():
            fit = odeint(self.field64, self.y0.double(), self.t.double(), method="rk4")
        # a nearby target: the gradient is small, so its roundoff error is too, while the curvature is not
        self.target = fit + offset * torch.randn(fit.shape, generator=g, dtype=torch.float64)

    def loss(self, field: nn.Module, y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = odeint(field, y0, t, method="rk4")
        return 0.5 * ((out.double() - self.target) ** 2).sum(-1).mean()

    def gradient(self, precision: str, kind: str) -> torch.Tensor:
        """``dL/dp`` for one kind of parameter, computed in ``precision`` (float64 result)."""
        high = torch.float64 if precision == "float64" else torch.float32
        field = copy.deepcopy(self.field32).to(high)
        y0, t = self.y0.to(high), self.t.to(high)
        p = {"inputs": y0, "times": t, "weights": field.l1.weight}[kind]
        p.requires_grad_(True)
        ctx = (torch.autocast("cpu", dtype=getattr(torch, precision)) if precision in ("bfloat16", "float16")
               else contextlib.nullcontext())
        with ctx:
            loss = self.loss(field, y0, t)
        (g,) = torch.autograd.grad(loss, p)
        return g.double()

    @torch.no_grad()
    def loss64(self, kind: str, eps: float, v: torch.Tensor) -> float:
        """Float64 ``L(p + eps v)``."""
        y0, t = self.y0.double(), self.t.double()
        if kind == "inputs":
            return float(self.loss(self.field64, y0 + eps * v, t))
        if kind == "times":
            return float(self.loss(self.field64, y0, t + eps * v))
        w = self.field64.l1.weight
        saved = w.clone()
        w.add_(eps * v)
        try:
            return float(self.loss(self.field64, y0, t))
        finally:
            w.copy_(saved)

    def direction(self, kind: str, seed: int = 1) -> torch.Tensor:
        shape = {"inputs": self.y0.shape, "times": self.t.shape, "weights": self.field32.l1.weight.shape}[kind]
        v = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return v / v.norm()


def fit_second_order(eps: list[float], rem: list[float], lo: float = 1.5, hi: float = 2.5) -> tuple[float, float]:
    """Least-squares slope of ``log r`` vs ``log eps`` over the longest run of local slopes in ``[lo, hi]``.

    Returns ``(slope, decades)``; ``(nan, 0)`` when no halving behaves as ``eps^2``.
    """
    best, run_start, best_span = None, 0, (0, 0)
    for k in range(len(rem) - 1):
        ok = rem[k] > 0 and rem[k + 1] > 0 and lo <= math.log(rem[k] / rem[k + 1]) / math.log(eps[k] / eps[k + 1]) <= hi
        if not ok:
            run_start = k + 1
            continue
        if best is None or (k + 1 - run_start) > (best_span[1] - best_span[0]):
            best, best_span = True, (run_start, k + 1)
    if best is None:
        return float("nan"), 0.0
    a, b = best_span
    xs = [math.log10(e) for e in eps[a : b + 1]]
    ys = [math.log10(r) for r in rem[a : b + 1]]
    return linear_fit(xs, ys).slope, xs[0] - xs[-1]


def run(n_eps: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    prob = Problem(seed)
    points, summary = [], []
    for kind in KINDS:
        v = prob.direction(kind)
        l0 = prob.loss64(kind, 0.0, v)
        if kind == "times":  # eps max |v_j+1 - v_j| at most 80% of the spacing, so t + eps v stays increasing
            eps0 = 0.8 * float((prob.t[1] - prob.t[0]) / (v[1:] - v[:-1]).abs().max())
        else:
            eps0 = EPS0[kind]
        eps = [eps0 * 2.0**-k for k in range(n_eps)]
        lk = [prob.loss64(kind, e, v) for e in progress(eps, desc=f"L64({kind})")]
        g64v = None
        for precision in PRECISIONS:
            gv = float((prob.gradient(precision, kind) * v).sum())
            g64v = gv if precision == "float64" else g64v
            rem = [abs(loss - l0 - e * gv) for e, loss in zip(eps, lk)]
            first = [abs(loss - l0) for loss in lk]
            for e, r, z in zip(eps, rem, first):
                points.append(dict(kind=kind, precision=precision, eps=e, remainder=r, first_difference=z))
            slope, decades = fit_second_order(eps, rem)
            fslope, _ = fit_second_order(eps, first, 0.8, 1.2)
            summary.append(dict(kind=kind, precision=precision, slope=slope, decades=decades,
                                first_difference_slope=fslope, grad_dot_v=gv,
                                rel_err_grad_dot_v=abs(gv - g64v) / abs(g64v)))
    return points, summary


def print_summary(summary: list[dict]) -> None:
    header = ["kind", "gradient in", "fitted slope of r", "decades of eps^2", "slope of |L(p+ev)-L(p)|", "rel err g.v"]
    cells = [[s["kind"], s["precision"], f"{s['slope']:.3f}", f"{s['decades']:.1f}",
              f"{s['first_difference_slope']:.3f}", f"{s['rel_err_grad_dot_v']:.1e}"] for s in summary]
    print_table("Taylor test: r(eps) = |L(p+eps v) - L(p) - eps g.v|, L in float64", header, cells)


def plot(points: list[dict], summary: list[dict], path: Path) -> None:
    colors = {"float64": "black", "float32": "tab:blue", "bfloat16": "tab:orange", "float16": "tab:green"}
    fig, axes = pyplot().subplots(1, len(KINDS), figsize=(5 * len(KINDS), 4))
    for ax, kind in zip(axes, KINDS):
        for precision in PRECISIONS:
            sel = [p for p in points if p["kind"] == kind and p["precision"] == precision]
            s = next(x for x in summary if x["kind"] == kind and x["precision"] == precision)
            ax.loglog([p["eps"] for p in sel], [max(p["remainder"], 1e-300) for p in sel], "o-", ms=3,
                      color=colors[precision], label=f"{precision} grad (slope {s['slope']:.2f})")
        sel = [p for p in points if p["kind"] == kind and p["precision"] == "float64"]
        e = [p["eps"] for p in sel]
        ax.loglog(e, [p["first_difference"] for p in sel], ":", color="gray", label="|L(p+ev)-L(p)|")
        r0 = sel[0]["remainder"]
        ax.loglog(e, [r0 * (x / e[0]) ** 2 for x in e], "--", color="silver", label="eps^2")
        ax.set(title=f"Taylor test: {kind}", xlabel="eps", ylabel="remainder")
        ax.set_ylim(bottom=1e-18)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=120)


def main(argv=None) -> list[dict]:
    parser = script_parser("demo_taylor", __doc__.splitlines()[0])
    args = parser.parse_args(argv)
    setup(args)
    points, summary = run(16 if args.smoke else 34, args.seed)  # --smoke: 16 values of eps instead of 34
    write_csv(args.out / "taylor.csv", points)
    write_csv(args.out / "taylor_slopes.csv", summary)
    print_summary(summary)
    plot(points, summary, args.out / "taylor.png")
    print(f"wrote {args.out / 'taylor.csv'}, {args.out / 'taylor_slopes.csv'} and {args.out / 'taylor.png'}")
    return summary


if __name__ == "__main__":
    main()
