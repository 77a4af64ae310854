"""Flat views of tensor and tuple states, and the vector field on them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from .precision import LOW_PRECISION_Y0_DTYPES, FieldPrecision, RoundoffTrace

State = torch.Tensor | tuple[torch.Tensor, ...]


class FlatState:
    """The layout of a state: one tensor or a tuple of tensors of one dtype.

    The solver works on a 1-D vector of ``numel`` entries in ``dtype``; this
    object converts between that vector and the user's structure.

    Attributes:
        dtype: the state's dtype: ``y0``'s when float32/float64, float32 for a
            float16/bfloat16 ``y0`` (states, stage sums and the adjoint stay in it).
        user_dtype: ``y0``'s own dtype: ``func`` receives ``t`` and ``y`` in it and
            ``odeint`` returns its outputs in it, as torchdiffeq does.
    """

    def __init__(self, y0: State) -> None:
        self.is_tuple = not isinstance(y0, torch.Tensor)
        parts = (y0,) if isinstance(y0, torch.Tensor) else tuple(y0)
        self.shapes = tuple(p.shape for p in parts)
        self.sizes = tuple(p.numel() for p in parts)
        self.numel = sum(self.sizes)
        self.user_dtype = parts[0].dtype
        self.dtype = torch.float32 if self.user_dtype in LOW_PRECISION_Y0_DTYPES else self.user_dtype
        self.device = parts[0].device

    def flatten(self, y: State) -> torch.Tensor:
        """User state -> 1-D vector in ``dtype`` (a view when the state is a single tensor in ``dtype``)."""
        if isinstance(y, torch.Tensor):  # (a state has its layout's structure)
            return y.reshape(-1).to(self.dtype)
        return torch.cat([p.reshape(-1).to(self.dtype) for p in y])

    def unflatten(self, flat: torch.Tensor, lead: tuple[int, ...] = (), dtype: torch.dtype | None = None) -> State:
        """``(*lead, numel)`` -> user structure with leading dims ``lead`` (views), cast to ``dtype`` if given."""
        if dtype is not None:
            flat = flat.to(dtype)
        if not self.is_tuple:
            return flat.reshape((*lead, *self.shapes[0]))  # a tuple: works for 0-dim states too
        parts = torch.split(flat, list(self.sizes), dim=-1)
        return tuple(p.reshape((*lead, *s)) for p, s in zip(parts, self.shapes))


#: What a field that modifies its input in place is told (the solver hands it a copy of y0, left as it was).
IN_PLACE_INPUT = (
    "odeint: func modified its input y in place (y.mul_(...), y[...] = ..., y += ..., an in-place activation such as "
    "relu_ or nn.ReLU(inplace=True) applied to y); the solver reuses y for the step's other stages and the next "
    "state, so the solution would be wrong. Compute a new tensor instead (y = y * 0.5, torch.relu(y)), or clone "
    "first (y = y.clone()). Your y0 was not changed."
)


class FlatVectorField:
    """``func(t, y)`` seen as a map on flat high-precision vectors.

    ``t`` is passed to ``func`` as a 0-dim tensor and ``y`` in the user's
    structure, both in ``y0``'s dtype (``layout.user_dtype``, as torchdiffeq does).  The result is checked
    (structure, shape, floating dtype) and cast to the state dtype, so stage
    sums are accumulated in high precision whatever dtype autocast produced.
    Every call is counted in ``nfe``.  ``precision`` is the precision the field actually runs in, per output part
    ([`FieldPrecision`][mpnode.core.precision.FieldPrecision]): found on the first call by following every torch
    call of that evaluation ([`RoundoffTrace`][mpnode.core.precision.RoundoffTrace]), ``None`` before it.  A
    ``func`` that modifies
    ``y`` in place raises (`IN_PLACE_INPUT`): the solver reuses ``y`` for
    the step's other stages and the next state.
    """

    def __init__(self, func: Callable, layout: FlatState) -> None:
        self.func = func
        self.layout = layout
        self.nfe = 0
        self.precision: FieldPrecision | None = None
        #: one-shot hook: the next evaluation runs as ``hook(func, t, y)`` (e.g. a CapturedTensorProbe)
        self.next_call_hook: Callable | None = None

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        lay = self.layout
        version = None if y.is_inference() else y._version
        trace = RoundoffTrace() if self.precision is None else None
        with trace if trace is not None else contextlib.nullcontext():
            if self.next_call_hook is not None:
                hook, self.next_call_hook = self.next_call_hook, None
                out = hook(self.func, t.to(lay.user_dtype), lay.unflatten(y, dtype=lay.user_dtype))
            else:
                out = self.func(t.to(lay.user_dtype), lay.unflatten(y, dtype=lay.user_dtype))
        if version is not None and y._version != version:
            raise RuntimeError(IN_PLACE_INPUT)
        if not lay.is_tuple and isinstance(out, torch.Tensor) and out.shape == lay.shapes[0] \
                and out.dtype.is_floating_point:  # the common case, checked without the general path
            if trace is not None:
                self.precision = trace.precision((out,))
            return out.reshape(-1).to(lay.dtype)
        parts = self._check(out)
        if trace is not None:
            self.precision = trace.precision(parts)
        if not lay.is_tuple:
            return parts[0].reshape(-1).to(lay.dtype)
        return torch.cat([p.reshape(-1).to(lay.dtype) for p in parts])

    def _check(self, out) -> Sequence[torch.Tensor]:
        lay = self.layout
        if lay.is_tuple:
            if not isinstance(out, (tuple, list)) or len(out) != len(lay.shapes):
                raise TypeError(
                    f"func must return a tuple of {len(lay.shapes)} tensors like y0, got {type(out).__name__}"
                    + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
                )
            parts = tuple(out)
        else:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"func must return a tensor shaped like y0, got {type(out).__name__}")
            parts = (out,)
        for i, (p, shape) in enumerate(zip(parts, lay.shapes)):
            where = f"func output {i}" if lay.is_tuple else "func output"
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{where} must be a tensor, got {type(p).__name__}")
            if p.shape != shape:
                raise ValueError(f"{where} has shape {tuple(p.shape)} but the state has shape "
                                 f"{tuple(shape)}; dy/dt must match y")
            if not p.dtype.is_floating_point:
                raise TypeError(f"{where} has dtype {p.dtype}; the vector field must return a real floating tensor")
        return parts
