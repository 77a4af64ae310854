"""Peer solvers behind torchdiffeq's calling convention, for side-by-side benchmarks.

[`torchode_odeint`][mpnode.bench.peers.torchode_odeint] runs torchode (Lienen & Günnemann, "torchode: A Parallel ODE
Solver for PyTorch", 2022; ``pip install torchode``, an optional dependency:
``pip install "./packages/mpnode-bench[peers]"``) like ``torchdiffeq.odeint(func, y0, t, ...)``:

* ``y0`` of shape ``(batch, features)``; the result has shape ``(len(t), batch, features)``;
* methods ``"dopri5"`` and ``"tsit5"``; with ``options={"step_size": h}`` a
  ``FixedStepController`` (steps of ``h``), otherwise an adaptive
  ``IntegralController`` with ``rtol``/``atol`` (torchdiffeq's defaults 1e-7 / 1e-9);
* backward by ``AutoDiffAdjoint`` (autograd through the steps, step-size control included).

torchode solves every sample of the batch as its own problem, with its own step
sizes and times: ``func`` is called as ``func(t, y)`` with ``t`` of shape
``(batch, 1)`` (one time per sample, as a column that broadcasts against ``y``).
A field that needs one scalar time for the whole batch cannot run here.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["TORCHODE_METHODS", "torchode_unavailable", "torchode_odeint"]

TORCHODE_METHODS = ("dopri5", "tsit5")
"""The methods [`torchode_odeint`][mpnode.bench.peers.torchode_odeint] runs (torchode's ``Dopri5`` and ``Tsit5``)."""

TORCHODE_OPTIONS = ("step_size", "max_num_steps", "stats")
"""Keys [`torchode_odeint`][mpnode.bench.peers.torchode_odeint] accepts in ``options``."""

DEFAULT_RTOL, DEFAULT_ATOL = 1e-7, 1e-9  # torchdiffeq's, so a call reads the same for both


def torchode_unavailable() -> str | None:
    """``"unavailable: pip install torchode"`` when torchode is not importable, else ``None``."""
    if importlib.util.find_spec("torchode") is None:
        return 'unavailable: pip install torchode (or pip install "./packages/mpnode-bench[peers]")'
    return None


def torchode_odeint(
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    t: torch.Tensor,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    method: str = "dopri5",
    options: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Solve ``dy/dt = func(t, y)`` with torchode, called like ``torchdiffeq.odeint``.

    Args:
        func: ``func(t, y) -> dy/dt`` with ``t`` of shape ``(batch, 1)`` and ``y`` of
            shape ``(batch, features)``.
        y0: ``(batch, features)`` floating tensor.
        t: 1-D increasing output times (at least two), on ``y0``'s device.
        rtol: relative tolerance of the adaptive controller (ignored with ``step_size``).
        atol: absolute tolerance of the adaptive controller (ignored with ``step_size``).
        method: ``"dopri5"`` or ``"tsit5"``.
        options: ``step_size`` (fixed steps), ``max_num_steps`` (torchode's
            ``max_steps``), ``stats`` (a dict that receives, as ints, ``accepted_steps``
            and ``steps``: the most of any sample, and ``nfe``: batched evaluations).

    Returns:
        ``(len(t), batch, features)`` tensor in ``y0``'s dtype.

    Raises:
        ValueError: a state that is not 2-D, bad times, an unknown method or option.
        RuntimeError: torchode stopped before ``t[-1]`` for some sample (its status names why).
    """
    reason = torchode_unavailable()
    if reason is not None:
        raise ImportError(f"torchode_odeint: torchode is {reason}")
    torchode: Any = importlib.import_module("torchode")  # an optional peer: its call signatures are not checked here

    _check_inputs(y0, t, method, options or {})
    opts = dict(options or {})
    batch = y0.shape[0]
    term = torchode.ODETerm(lambda tt, y: func(tt.unsqueeze(-1), y))
    step_method = {"dopri5": torchode.Dopri5, "tsit5": torchode.Tsit5}[method](term=term)
    dt0 = None
    if opts.get("step_size") is not None:
        controller = torchode.FixedStepController()
        dt0 = torch.full((batch,), float(opts["step_size"]), dtype=t.dtype, device=t.device)
    else:
        controller = torchode.IntegralController(
            atol=DEFAULT_ATOL if atol is None else atol, rtol=DEFAULT_RTOL if rtol is None else rtol, term=term
        ).to(y0.device)
    solver = torchode.AutoDiffAdjoint(step_method, controller, max_steps=opts.get("max_num_steps"))
    t_eval = t.expand(batch, -1)
    problem = torchode.InitialValueProblem(y0=y0, t_start=t_eval[:, 0], t_end=t_eval[:, -1], t_eval=t_eval)
    solution = solver.solve(problem, dt0=dt0)
    _check_status(solution, torchode)
    if opts.get("stats") is not None:
        opts["stats"].update(_stats(solution))
    return solution.ys.transpose(0, 1)


def _check_inputs(y0: torch.Tensor, t: torch.Tensor, method: str, options: Mapping[str, Any]) -> None:
    if not isinstance(y0, torch.Tensor) or y0.ndim != 2 or not y0.is_floating_point():
        shape = tuple(y0.shape) if isinstance(y0, torch.Tensor) else type(y0).__name__
        raise ValueError(f"torchode_odeint needs a floating state of shape (batch, features), got {shape}; "
                         "flatten the features of each sample into one dimension")
    if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.shape[0] < 2 or not bool((t[1:] > t[:-1]).all()):
        raise ValueError("torchode_odeint needs t: a 1-D tensor of at least two increasing times")
    if method not in TORCHODE_METHODS:
        raise ValueError(f"torchode_odeint: method {method!r} is not available; choose one of {TORCHODE_METHODS}")
    unknown = sorted(set(options) - set(TORCHODE_OPTIONS))
    if unknown:
        raise ValueError(f"torchode_odeint: unknown options {unknown}; accepted: {list(TORCHODE_OPTIONS)}")
    stats = options.get("stats")
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"options['stats'] must be a dict to fill, got {type(stats).__name__}")


def _check_status(solution, torchode) -> None:
    status = solution.status
    failed = status != torchode.Status.SUCCESS.value
    if bool(failed.any()):
        codes = sorted({torchode.Status(int(c)).name for c in status[failed].unique()})
        raise RuntimeError(f"torchode stopped before the last output time for {int(failed.sum())} of "
                           f"{status.numel()} samples: {', '.join(codes)}")


def _stats(solution) -> dict[str, int]:
    s = solution.stats
    out = {"accepted_steps": int(s["n_accepted"].max()), "steps": int(s["n_steps"].max())}
    if "n_f_evals" in s:  # counted by the ODETerm unless it was built with_stats=False
        out["nfe"] = int(s["n_f_evals"].max())
    return out
