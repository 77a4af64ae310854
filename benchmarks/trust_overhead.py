"""What the gradient guards of docs/guarantees.md cost, on the core CPU MLP problem.

    OMP_NUM_THREADS=1 python benchmarks/trust_overhead.py [--batch 256 --dim 32 --width 128 --steps 64 --rounds 15]

Each guard is measured two ways, forward and backward separately, in one process:

* its own time: the guard's functions are wrapped with a timer during the "on"
  runs; the table gives their median time per solve and its share of the median
  forward or backward time (robust on a loaded machine);
* end to end: "on" (the default) against "off" (switched off by its user-facing
  option or, where there is none, patched out), run back to back in each round
  (order alternating), the median over rounds of the per-round ratio on/off.

* discovery: the probe on the first evaluation (captured tensors, modules called,
  tensors read and their versions; ``adjoint_params=None`` vs the parameters passed
  explicitly with the probe patched out: with ``adjoint_params`` it runs too);
* untracked check: the graph walk of every recomputed step in backward;
* version check: the ``_version`` comparison at the start of backward;
* rng tracking: per-step generator bookkeeping for a deterministic field (``replay_rng``);
* rng replay: the same with a dropout field (states stored and replayed per step);
* buffer restore: copying a BatchNorm field's buffers around backward;
* replaced-tensor check: the tensors the first evaluation read, held with the module attributes bound to them
  (forward), the attributes compared before the first recomputed step and step 0's first evaluation recomputed
  through the probe (backward);
* scaled float16 checkpoints: the per-row power-of-two scale (``checkpoint_dtype=torch.float16``);
* all guards: everything above that applies to the plain MLP at once (end to end only).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os
import platform
import statistics
import time

import torch

import mpnode.core.backward as backward_module
import mpnode.core.checkpoints as checkpoints_module
import mpnode.core.forward as forward_module
import mpnode.core.guards as guards_module
import mpnode.core.parameters as parameters_module
import mpnode.core.replay as replay_module
from mpnode.bench.profilers import time_fn
from mpnode.core import RecomputeAdjoint, odeint
from mpnode.core.testing import MLPField


class _NoisyMLP(MLPField):
    """The MLP field with dropout on its hidden layer (consumes random numbers)."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__(dim, width, hidden_layers=2)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, t, y):
        ty = t.to(y.dtype).expand(y.shape[0], 1)
        h = torch.tanh(self.hidden[0](torch.cat([y, ty], dim=-1)))
        return self.out(self.drop(torch.tanh(self.hidden[1](h))))


class _NormedMLP(MLPField):
    """The MLP field with a BatchNorm on its hidden layer (buffers updated by every evaluation)."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__(dim, width, hidden_layers=2)
        self.bn = torch.nn.BatchNorm1d(width)

    def forward(self, t, y):
        ty = t.to(y.dtype).expand(y.shape[0], 1)
        h = torch.tanh(self.hidden[0](torch.cat([y, ty], dim=-1)))
        return self.out(torch.tanh(self.bn(self.hidden[1](h))))


@contextlib.contextmanager
def _patched(*patches):
    """Temporarily set ``(obj, name, value)`` attributes."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


NO_UNTRACKED_CHECK = (backward_module, "_refuse_untracked", lambda graph, known: None)
NO_VERSION_CHECK = (guards_module.VersionRecord, "check", lambda self: None)
NO_BUFFER_RESTORE = (forward_module, "module_buffers", lambda modules: [])
NO_PROBE = (parameters_module.CapturedTensorProbe, "__call__", lambda self, func, t, y: func(t, y))
UNSCALED_CHECKPOINTS = (checkpoints_module, "needs_row_scaling", lambda dtype: False)
NO_READS_CHECK = (forward_module, "FirstReads", lambda tensors, modules, first=None: None)


def variants(fields: dict[str, torch.nn.Module]) -> dict[str, tuple]:
    """``guard -> (field, odeint kwargs on, patches on, kwargs off, patches off)``."""
    mlp = fields["mlp"]
    explicit = {"adjoint_params": tuple(mlp.parameters())}
    return {
        "discovery": (mlp, {}, (), explicit, (NO_PROBE,)),
        "untracked check": (mlp, {}, (), {}, (NO_UNTRACKED_CHECK,)),  # runs without adjoint_params only
        "version check": (mlp, explicit, (), explicit, (NO_VERSION_CHECK,)),
        "rng tracking (deterministic)": (mlp, explicit, (), {**explicit, "adjoint": RecomputeAdjoint(replay_rng=False)},
                                         ()),
        "rng replay (dropout)": (fields["noisy"], {}, (), {"adjoint": RecomputeAdjoint(replay_rng=False)}, ()),
        "buffer restore (batchnorm)": (fields["normed"], {}, (), {}, (NO_BUFFER_RESTORE,)),
        "replaced-tensor check": (mlp, {}, (), {}, (NO_READS_CHECK,)),
        "scaled float16 checkpoints": (mlp, {**explicit, "options": {"checkpoint_dtype": torch.float16}}, (),
                                       {**explicit, "options": {"checkpoint_dtype": torch.float16}},
                                       (UNSCALED_CHECKPOINTS,)),
        "all guards (mlp)": (mlp, {}, (), {**explicit, "adjoint": RecomputeAdjoint(replay_rng=False)},
                             (NO_UNTRACKED_CHECK, NO_VERSION_CHECK, NO_BUFFER_RESTORE, NO_PROBE, NO_READS_CHECK)),
    }


def _merge_options(kwargs: dict, steps: int) -> dict:
    out = dict(kwargs)
    out["options"] = {"step_size": 1.0 / steps, **kwargs.get("options", {})}
    return out


#: the functions each guard runs (timed during its "on" runs): ``guard -> [(owner, name), ...]``
GUARD_FUNCTIONS = {
    "discovery": [(parameters_module.CapturedTensorProbe, "__call__")],
    "untracked check": [(backward_module, "_refuse_untracked")],
    "version check": [(guards_module.VersionRecord, "check")],
    "rng tracking (deterministic)": [(replay_module.StepRandomness, n) for n in ("start", "at_step", "finish")],
    "rng replay (dropout)": [(replay_module.StepRandomness, n) for n in ("start", "at_step", "finish")]
    + [(replay_module.Replay, "before_step")],
    "buffer restore (batchnorm)": [(replay_module.Replay, "session")],
    "replaced-tensor check": [(guards_module.FirstReads, n)
                              for n in ("__init__", "check_bindings", "_compare", "_same_output")],
    "scaled float16 checkpoints": [(checkpoints_module, "row_scale"),
                                   (checkpoints_module.StoredRows, "row")],
}


class _SelfTimer:
    """Wraps functions to add their wall time to ``self.total`` (context managers: time of enter and exit)."""

    def __init__(self) -> None:
        self.total = 0.0

    def wrap(self, fn):
        timer = self

        if getattr(fn, "__name__", "") == "session":  # a context manager: time entering and leaving it
            @contextlib.contextmanager
            def timed_cm(*args, **kwargs):
                t0 = time.perf_counter()
                cm = fn(*args, **kwargs)
                cm.__enter__()
                timer.total += time.perf_counter() - t0
                try:
                    yield
                finally:
                    t1 = time.perf_counter()
                    cm.__exit__(None, None, None)
                    timer.total += time.perf_counter() - t1
            return timed_cm

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timer.total += time.perf_counter() - t0
        return timed


def _run_once(field, y0, t, kwargs, patches, timer_patches=()):
    """Forward and backward of one solve: ``(forward_s, backward_s)`` via ``time_fn``."""
    holder = {}

    def forward():
        field.zero_grad(set_to_none=True)
        holder["loss"] = (odeint(field, y0, t, method="rk4", **kwargs)[-1] ** 2).mean()

    def backward():
        holder["loss"].backward()

    with _patched(*patches, *timer_patches):
        fwd = time_fn(forward, "cpu", warmup=0, repeats=1)
        bwd = time_fn(backward, "cpu", warmup=0, repeats=1)
    return fwd.median_s, bwd.median_s


def measure(batch: int, dim: int, width: int, steps: int, rounds: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    fields = {"mlp": MLPField(dim, width, hidden_layers=2), "noisy": _NoisyMLP(dim, width),
              "normed": _NormedMLP(dim, width)}
    y0 = torch.randn(batch, dim)
    t = torch.tensor([0.0, 1.0])
    table = variants(fields)
    keys = ("fwd_on", "bwd_on", "fwd_off", "bwd_off", "fwd_ratio", "bwd_ratio", "fwd_self", "bwd_self")
    samples = {g: {k: [] for k in keys} for g in table}
    for r in range(rounds + 1):  # round 0 warms up
        for guard, (field, on_kwargs, on_patches, off_kwargs, off_patches) in table.items():
            fwd_timer, bwd_timer = _SelfTimer(), _SelfTimer()
            on = (_merge_options(on_kwargs, steps), on_patches)
            off = (_merge_options(off_kwargs, steps), off_patches)
            originals = [(owner, name, getattr(owner, name)) for owner, name in GUARD_FUNCTIONS.get(guard, ())]
            timed_fwd = [(o, n, fwd_timer.wrap(f)) for o, n, f in originals]
            timed_bwd = [(o, n, bwd_timer.wrap(f)) for o, n, f in originals]
            result = {}
            for state in (("on", "off") if r % 2 else ("off", "on")):
                kwargs, patches = on if state == "on" else off
                if state == "on":
                    result["on"] = _run_timed_phases(field, y0, t, kwargs, patches, timed_fwd, timed_bwd)
                else:
                    result["off"] = _run_once(field, y0, t, kwargs, patches)
            if r == 0:
                continue
            (f_on, b_on), (f_off, b_off) = result["on"], result["off"]
            for k, v in (("fwd_on", f_on), ("bwd_on", b_on), ("fwd_off", f_off), ("bwd_off", b_off),
                         ("fwd_ratio", f_on / f_off), ("bwd_ratio", b_on / b_off),
                         ("fwd_self", fwd_timer.total), ("bwd_self", bwd_timer.total)):
                samples[guard][k].append(v)
    return {g: {k: statistics.median(v) for k, v in d.items()} for g, d in samples.items()}


def _run_timed_phases(field, y0, t, kwargs, patches, timed_fwd, timed_bwd):
    """Like :func:`_run_once`, with the guard functions timed separately in forward and backward."""
    holder = {}

    def forward():
        field.zero_grad(set_to_none=True)
        with _patched(*timed_fwd):
            holder["loss"] = (odeint(field, y0, t, method="rk4", **kwargs)[-1] ** 2).mean()

    def backward():
        with _patched(*timed_bwd):
            holder["loss"].backward()

    with _patched(*patches):
        fwd = time_fn(forward, "cpu", warmup=0, repeats=1)
        bwd = time_fn(backward, "cpu", warmup=0, repeats=1)
    return fwd.median_s, bwd.median_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    med = measure(args.batch, args.dim, args.width, args.steps, args.rounds)
    print(f"# trust_overhead: batch {args.batch}, state {args.dim}, width {args.width}, {args.steps} rk4 steps, "
          f"float32 CPU, {args.threads} thread(s), {args.rounds} interleaved rounds, medians; "
          f"{datetime.date.today()} on {platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}")
    print(f"{'guard':30s} {'fwd ms':>8s} {'own ms':>7s} {'share':>7s} {'on/off':>7s}   "
          f"{'bwd ms':>8s} {'own ms':>7s} {'share':>7s} {'on/off':>7s}")
    for g, m in med.items():
        print(f"{g:30s} {1e3 * m['fwd_on']:8.1f} {1e3 * m['fwd_self']:7.2f} {m['fwd_self'] / m['fwd_on']:7.2%} "
              f"{m['fwd_ratio']:7.3f}   {1e3 * m['bwd_on']:8.1f} {1e3 * m['bwd_self']:7.2f} "
              f"{m['bwd_self'] / m['bwd_on']:7.2%} {m['bwd_ratio']:7.3f}")


if __name__ == "__main__":
    main()
