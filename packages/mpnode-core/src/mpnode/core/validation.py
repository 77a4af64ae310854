"""Checks of user input, each raising an error that names the fix: the solve's arguments, and the one number
checker every option, controller and strategy setting goes through
([`check_number`][mpnode.core.validation.check_number]).

``odeint``'s options are parsed with these into validated objects in [`mpnode.core.options`][mpnode.core.options];
a user tableau checks itself ([`ButcherTableau`][mpnode.core.tableau.ButcherTableau]).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .precision import LOW_PRECISION_Y0_DTYPES, STATE_DTYPES
from .state import State


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
        raise TypeError("all tensors of a tuple y0 must share one dtype, got "
                        f"{sorted(map(str, dtypes))}; cast them to one")
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
            f"t has dtype {t.dtype}; times must be float32 or float64 (low-precision time grids lose the "
            "step sizes): use t.float()"
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
        raise ValueError(f"{name} must be strictly increasing or strictly decreasing (no repeats); "
                         "sort it and drop duplicates")


def check_func(func: Any) -> None:
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y) -> dy/dt (a function or an nn.Module), got "
                        f"{type(func).__name__}")


def check_grid(grid: Any, t: torch.Tensor, t_host: torch.Tensor) -> torch.Tensor:
    """Validate a constructed grid against ``t``; returns the grid's host copy."""
    if not isinstance(grid, torch.Tensor) or grid.dim() != 1 or grid.numel() < 2:
        raise ValueError("grid_constructor must return a 1-D tensor of at least two times")
    if grid.dtype != t.dtype or grid.device != t.device:
        raise ValueError(f"grid_constructor returned {grid.dtype} on {grid.device}; it must match t "
                         f"({t.dtype} on {t.device})")
    host = grid.detach().cpu()
    if not (bool(host[0] == t_host[0]) and bool(host[-1] == t_host[-1])):
        raise ValueError("the grid must start at t[0] and end at t[-1] exactly")
    check_strictly_monotone("the grid", host)
    if bool((host[1] - host[0]) * (t_host[1] - t_host[0]) < 0):
        raise ValueError("the grid must run in the same direction as t")
    return host


def check_number(name: str, value: Any, *, positive: bool = True, finite: bool = True, at_most: float | None = None,
                 integer: bool = False, hint: str = "") -> Any:
    """``value`` checked and returned as a float (an int with ``integer``); the errors name ``name`` and the range.

    ``positive``: ``> 0``, else ``>= 0``; ``finite``: inf is refused; ``at_most``: an upper bound; ``integer``: a whole
    number (an int, ``numpy.int64``, a one-element integer tensor or an integral float such as ``1e4``; not a bool) is
    required and returned as an ``int``; ``hint`` is appended to the messages.  A value that is not a number (a bool or
    a string such as ``"0.1"`` included) raises
    ``TypeError`` (``ValueError`` for a count), one out of range ``ValueError``, e.g. ``"options['first_step'] must
    be positive and finite, got -1.0"``.
    """
    if integer:
        return _check_count(name, value, 1 if positive else 0, hint)
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}{hint}")
    if isinstance(value, (str, bytes)):  # float() would parse it; torchdiffeq refuses strings too
        raise TypeError(f"{name} must be a number, got the string {value!r}{hint}; pass the number itself, e.g. "
                        f"float({value!r})")
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a number, got {value!r}{hint}") from None
    if math.isnan(number) or number < 0 or (positive and number == 0) or (finite and math.isinf(number)) or (
        at_most is not None and number > at_most
    ):
        bounds = ("positive" if positive else "non-negative") + (" and finite" if finite else "") + (
            f" and at most {at_most}" if at_most is not None else "")
        raise ValueError(f"{name} must be {bounds}, got {value!r}{hint}")
    return number


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``; else ``TypeError`` naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_count(name: str, value: Any, least: int, hint: str) -> int:
    """``value`` as an ``int >= least``: integers of any kind (``numbers.Integral``, integer tensors of one element)
    and integral floats are accepted (as torchdiffeq accepts them); a bool, a fraction or a non-number raises
    ``ValueError``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        count = int(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
            and float(value).is_integer():
        count = int(float(value))
    else:
        kind = "a fraction" if isinstance(value, numbers.Real) and not isinstance(value, bool) else "not a whole number"
        raise ValueError(f"{name} must be a whole number >= {least}, got {value!r} ({kind}){hint}")
    if count < least:
        raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}{hint}")
    return count
