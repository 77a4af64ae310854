"""Checks of user input, each raising an error that names the fix."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .precision import LOW_PRECISION_Y0_DTYPES, STATE_DTYPES
from .state import State

FIXED_GRID_OPTIONS = ("step_size", "grid_constructor", "interp", "perturb")
ADAPTIVE_OPTIONS = (
    "first_step", "max_num_steps", "min_step", "max_step", "safety", "ifactor", "dfactor", "norm", "step_t", "jump_t",
    "controller",
)
COMMON_OPTIONS = ("checkpoint_dtype", "stats")
KNOWN_OPTIONS = FIXED_GRID_OPTIONS + ADAPTIVE_OPTIONS + COMMON_OPTIONS
#: torchdiffeq options mpnode refuses, with the reason (see docs/migration.md).
REFUSED_OPTIONS = {
    "dtype": "mpnode keeps the times of adaptive solves in float64 always (torchdiffeq's default); remove it",
    "max_iters": "it configures torchdiffeq's implicit Adams method, which mpnode does not provide",
    "max_order": "it configures torchdiffeq's Adams methods, which mpnode does not provide",
    "solver": "it configures torchdiffeq's scipy_solver, which mpnode does not provide",
}


def check_y0(y0: State) -> None:
    parts = (y0,) if isinstance(y0, torch.Tensor) else y0
    if not isinstance(parts, tuple) or not parts or not all(isinstance(p, torch.Tensor) for p in parts):
        raise TypeError(f"y0 must be a tensor or a non-empty tuple of tensors, got {type(y0).__name__}")
    dtypes = {p.dtype for p in parts}
    for p in parts:
        if p.layout != torch.strided:
            raise TypeError(f"y0 must be a dense tensor, got layout {p.layout}; convert it with y0.to_dense()")
        if p.device.type == "meta":
            raise ValueError(
                "y0 is on the meta device (a shape without data); create it on a real device, e.g. "
                "torch.zeros(shape, device='cpu'), or materialise the module that produced it with "
                "module.to_empty(device=...) and load its weights"
            )
        if p.dtype not in STATE_DTYPES + LOW_PRECISION_Y0_DTYPES:
            raise TypeError(
                f"y0 must be a real floating tensor (float32/float64, or float16/bfloat16 solved in float32), got "
                f"{p.dtype}; convert it with y0.float()"
                + (" (split a complex state into its real and imaginary parts)" if p.dtype.is_complex else "")
            )
    if len(dtypes) > 1:
        raise TypeError(f"all tensors of a tuple y0 must share one dtype, got {sorted(map(str, dtypes))}; cast them to one")
    devices = {p.device for p in parts}
    if len(devices) > 1:
        raise ValueError(f"all tensors of a tuple y0 must be on one device, got {sorted(map(str, devices))}")
    if not all(bool(torch.isfinite(p.detach()).all()) for p in parts):
        raise ValueError("y0 contains inf or NaN; check the data or the layer that produced the initial state")


def check_t(t: Any, device: torch.device) -> torch.Tensor:
    """Validate the output times; returns their host copy."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a 1-D tensor of times, got {type(t).__name__}; use torch.tensor([t0, t1, ...])")
    if t.dim() != 1:
        raise ValueError(f"t must be 1-D, got shape {tuple(t.shape)}; pass t.flatten() or the output times as a vector")
    if not t.dtype.is_floating_point:
        raise TypeError(f"t must be a floating tensor, got {t.dtype}; use t.float()")
    if t.dtype not in STATE_DTYPES:
        raise TypeError(
            f"t has dtype {t.dtype}; times must be float32 or float64 (low-precision time grids lose the step sizes): use t.float()"
        )
    if t.device != device:
        raise ValueError(f"t is on {t.device} but y0 is on {device}; move it with t.to(y0.device)")
    if t.numel() < 1:
        raise ValueError("t must hold at least one time (the start; a single time returns y0)")
    host = t.detach().cpu()  # the one device-to-host copy of t; all value checks run on it
    if not bool(torch.isfinite(host).all()):
        raise ValueError("t contains inf or NaN")
    check_strictly_monotone("t", host)
    return host


def check_strictly_monotone(name: str, t: torch.Tensor) -> None:
    d = t[1:] - t[:-1]
    if not (bool((d > 0).all()) or bool((d < 0).all())):
        raise ValueError(f"{name} must be strictly increasing or strictly decreasing (no repeats); sort it and drop duplicates")


def check_func(func: Any) -> None:
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y) -> dy/dt (a function or an nn.Module), got {type(func).__name__}")


def check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options as a dict; unknown keys raise, naming the known ones."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict such as {{'step_size': 0.1}}, got {type(options).__name__}")
    opts = dict(options)
    refused = sorted(set(opts) & set(REFUSED_OPTIONS))
    if refused:
        raise ValueError(f"option {refused[0]!r} (torchdiffeq) is not supported: {REFUSED_OPTIONS[refused[0]]}")
    unknown = sorted(set(opts) - set(KNOWN_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; odeint accepts {list(KNOWN_OPTIONS)}")
    if opts.get("step_size") is not None and opts.get("grid_constructor") is not None:
        raise ValueError("options 'step_size' and 'grid_constructor' are mutually exclusive; pass one of them")
    return opts


def refuse_options(opts: Mapping[str, Any], names: tuple[str, ...], why: str) -> None:
    """Raise if any of ``names`` is set (not ``None``) in ``opts``; ``why`` says what the solve is and the fix."""
    given = sorted(n for n in names if opts.get(n) is not None)
    if given:
        raise ValueError(f"option(s) {given} {why}")


def check_grid(grid: Any, t: torch.Tensor, t_host: torch.Tensor) -> torch.Tensor:
    """Validate a constructed grid against ``t``; returns the grid's host copy."""
    if not isinstance(grid, torch.Tensor) or grid.dim() != 1 or grid.numel() < 2:
        raise ValueError("grid_constructor must return a 1-D tensor of at least two times")
    if grid.dtype != t.dtype or grid.device != t.device:
        raise ValueError(f"grid_constructor returned {grid.dtype} on {grid.device}; it must match t ({t.dtype} on {t.device})")
    host = grid.detach().cpu()
    if not (bool(host[0] == t_host[0]) and bool(host[-1] == t_host[-1])):
        raise ValueError("the grid must start at t[0] and end at t[-1] exactly")
    check_strictly_monotone("the grid", host)
    if bool((host[1] - host[0]) * (t_host[1] - t_host[0]) < 0):
        raise ValueError("the grid must run in the same direction as t")
    return host
