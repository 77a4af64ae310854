"""Where mpnode's float32 time goes on the core MLP problem, against torchdiffeq direct backprop.

    python benchmarks/profile_core_mlp.py [--batch 256 --width 128 --steps 64 --repeats 15 --threads 1]

Times (medians of interleaved rounds, one process):
  * each solver's forward alone and forward+backward (backward = the difference):
    torchdiffeq direct, mpnode float32 (recompute adjoint) and mpnode with ``DirectAdjoint``;
  * the bare work mpnode cannot avoid: ``s*N`` vector-field evaluations without
    a graph (its forward), and per step ``s`` evaluations with a graph plus one
    vector-Jacobian product (its backward);
  * what a kept-graph backward costs by itself: ``N`` step graphs (4 evaluations each)
    differentiated by one backward pass into ``.grad``, or by one ``torch.autograd.grad``
    per step with the parameter gradients summed outside autograd (as ``DirectAdjoint`` does);
  * the same at a tiny size, where per-step Python overhead dominates.
Then a ``torch.profiler`` table of mpnode's forward+backward by operator.
The lower bound of mpnode's time ratio is ``(td + F_nograd) / td``: direct
backprop plus one extra forward without a graph.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mpnode.bench.experiment import add_number_flags
from mpnode.bench.problems import build
from mpnode.core import DirectAdjoint, odeint


def _rounds(fns: dict, repeats: int) -> dict[str, float]:
    for f in fns.values():
        f()
    samples = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            t0 = time.perf_counter()
            fns[k]()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def measure(batch: int, dim: int, width: int, steps: int, repeats: int) -> dict[str, float]:
    import torchdiffeq

    inst = build("mlp", {"batch": batch, "dim": dim, "width": width}, "cpu")
    f, y0 = inst.func, inst.y0
    t = torch.tensor([0.0, 1.0])
    opts = {"step_size": 1.0 / steps}
    params = list(f.parameters())
    y = y0.clone()
    tt = torch.tensor(0.5)

    def td_fwd():
        return inst.loss(torchdiffeq.odeint(f, y0, t, method="rk4", options=opts)[-1])

    def mp_fwd():
        return inst.loss(odeint(f, y0, t, method="rk4", options=opts)[-1])

    def direct_fwd():
        return inst.loss(odeint(f, y0, t, method="rk4", options=opts, adjoint=DirectAdjoint())[-1])

    def fb(fwd):
        def run():
            f.zero_grad(set_to_none=True)
            fwd().backward()
        return run

    def evals_nograd():
        with torch.no_grad():
            for _ in range(4 * steps):
                f(tt, y)

    def evals_grad_vjp():
        for _ in range(steps):
            yr = y.detach().requires_grad_(True)
            phi = sum(f(tt, yr) for _ in range(4))
            torch.autograd.grad(phi, [yr, *params], grad_outputs=y)

    def kept_graphs(detach: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(start, end)`` of each step; ``detach``: every step's graph starts at its own leaf."""
        graphs, state = [], y0
        for _ in range(steps):
            start = state.detach().requires_grad_(True) if detach else state
            state = start + sum(f(tt, start) for _ in range(4)) / (4 * steps)
            graphs.append((start, state))
        return graphs

    def one_backward():
        f.zero_grad(set_to_none=True)
        kept_graphs(detach=False)[-1][1].backward(y)

    def grad_per_step():
        lam, sums = y, [torch.zeros_like(p) for p in params]
        for start, end in reversed(kept_graphs(detach=True)):
            g = torch.autograd.grad(end, [start, *params], grad_outputs=lam)
            lam = g[0]
            torch._foreach_add_(sums, g[1:])

    med = _rounds({"td_fwd": td_fwd, "td_fwd_bwd": fb(td_fwd), "mp_fwd": mp_fwd, "mp_fwd_bwd": fb(mp_fwd),
                   "direct_fwd": direct_fwd, "direct_fwd_bwd": fb(direct_fwd),
                   "bare_fwd_nograd": evals_nograd, "bare_bwd": evals_grad_vjp,
                   "kept_one_backward": one_backward, "kept_grad_per_step": grad_per_step}, repeats)
    for name in ("td", "mp", "direct"):
        med[f"{name}_bwd"] = med[f"{name}_fwd_bwd"] - med[f"{name}_fwd"]
    return med


def report(name: str, m: dict[str, float], steps: int) -> None:
    ms = lambda x: f"{x * 1e3:8.1f} ms"  # noqa: E731
    print(f"\n== {name}")
    print(f"torchdiffeq direct: forward {ms(m['td_fwd'])}, backward {ms(m['td_bwd'])}, total {ms(m['td_fwd_bwd'])}")
    print(f"mpnode float32    : forward {ms(m['mp_fwd'])}, backward {ms(m['mp_bwd'])}, total {ms(m['mp_fwd_bwd'])}")
    print(f"mpnode direct     : forward {ms(m['direct_fwd'])}, backward {ms(m['direct_bwd'])}, "
          f"total {ms(m['direct_fwd_bwd'])} ({m['direct_fwd_bwd'] / m['td_fwd_bwd']:.3f}x torchdiffeq)")
    print(f"kept step graphs  : one backward pass {ms(m['kept_one_backward'])}; one autograd.grad per step "
          f"{ms(m['kept_grad_per_step'])} (forward with graphs included in both)")
    print(f"bare work         : {4 * steps} evaluations without graph {ms(m['bare_fwd_nograd'])}; "
          f"{steps} x (4 evaluations with graph + 1 VJP) {ms(m['bare_bwd'])}")
    ratio = m["mp_fwd_bwd"] / m["td_fwd_bwd"]
    bound = (m["td_fwd_bwd"] + m["bare_fwd_nograd"]) / m["td_fwd_bwd"]
    over_f = (m["mp_fwd"] - m["bare_fwd_nograd"]) / steps
    over_b = (m["mp_bwd"] - m["bare_bwd"]) / steps
    print(f"time ratio mpnode / torchdiffeq: {ratio:.2f}; one extra graph-free forward alone gives {bound:.2f}")
    print(f"forward share of torchdiffeq's step: {m['td_fwd'] / m['td_fwd_bwd']:.2f}")
    print(f"mpnode overhead over the bare work: forward {over_f * 1e6:.0f} us/step, "
          f"backward {over_b * 1e6:.0f} us/step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_number_flags(p, batch=256, width=128, dim=32, steps=64, repeats=15, threads=1)
    p.add_argument("--no-profiler", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    report(f"MLP batch {a.batch}, dim {a.dim}, width {a.width}, {a.steps} RK4 steps",
           measure(a.batch, a.dim, a.width, a.steps, a.repeats), a.steps)
    report(f"tiny MLP batch 4, dim 4, width 8, {a.steps} steps (per-step overhead)",
           measure(4, 4, 8, a.steps, a.repeats), a.steps)
    if a.no_profiler:
        return
    from torch.profiler import ProfilerActivity, profile

    inst = build("mlp", {"batch": a.batch, "dim": a.dim, "width": a.width}, "cpu")
    t = torch.tensor([0.0, 1.0])
    run = lambda: inst.loss(odeint(inst.func, inst.y0, t, options={"step_size": 1.0 / a.steps})[-1]).backward()  # noqa: E731
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print("\n== torch.profiler, mpnode float32 forward+backward (self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))


if __name__ == "__main__":
    main()
