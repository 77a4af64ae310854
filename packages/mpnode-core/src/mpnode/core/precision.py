"""The precision policy: which dtype each quantity lives in (see docs/precision.md).

=========================================================  ===========================================
quantity                                                   dtype
=========================================================  ===========================================
``y0``, states, stage inputs, stage sums, outputs          ``y0``'s dtype (float32/float64); float32 for a 16-bit ``y0``
vector-field evaluations and their VJPs                    what autocast selects for ``y0.device.type``
checkpoints                                                the strategy's ``checkpoint_dtype``, else the
                                                           autocast dtype when the field runs in it, or ``y0``'s
adjoint, gradient sums for ``y0``, ``t``, parameters       ``y0``'s dtype; parameters' own for their grads
times, step sizes                                          ``t``'s dtype (fixed grids), float64 (adaptive)
=========================================================  ===========================================

What autocast does to a field is read from the field's first evaluation, not from whether
autocast is on: autocast never lowers float64, nor the ops it keeps in float32, and a bfloat16 result promoted to
float32 by a later op still carries bfloat16 rounding ([`RoundoffTrace`][mpnode.core.precision.RoundoffTrace],
[`FieldPrecision`][mpnode.core.precision.FieldPrecision]).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

STATE_DTYPES = (torch.float32, torch.float64)
#: ``y0`` dtypes accepted and solved in float32 (an autocast model's output); outputs return in them.
LOW_PRECISION_Y0_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class PrecisionPolicy:
    """Dtypes of one solve, fixed when ``odeint`` is called.

    Attributes:
        device_type: autocast device type, taken from ``y0.device`` (``"cpu"``, ``"cuda"``, ...).
        autocast_dtype: the low precision of the vector field, or ``None`` when
            autocast is off for ``device_type`` at the call.
        state_dtype: the state's dtype: state, stage inputs, adjoint and outputs
            (``y0``'s, or float32 for a float16/bfloat16 ``y0``).
    """

    device_type: str
    autocast_dtype: torch.dtype | None
    state_dtype: torch.dtype

    @classmethod
    def capture(cls, y0: torch.Tensor) -> PrecisionPolicy:
        """Read the autocast state of ``y0``'s device type at the call site."""
        device_type = y0.device.type
        enabled = torch.is_autocast_enabled(device_type)
        low = torch.get_autocast_dtype(device_type) if enabled else None
        return cls(device_type, low, torch.float32 if y0.dtype in LOW_PRECISION_Y0_DTYPES else y0.dtype)

    @property
    def lowered_dtype(self) -> torch.dtype | None:
        """The dtype autocast lowers this solve's field to: the autocast dtype for a float32 state, ``None`` without
        autocast or for a float64 state (autocast never lowers float64, so a float64 field runs in float64)."""
        return None if self.state_dtype == torch.float64 else self.autocast_dtype

    @property
    def default_checkpoint_dtype(self) -> torch.dtype:
        """Checkpoints' dtype unless the strategy sets one, before the field's first evaluation:
        [`lowered_dtype`][mpnode.core.precision.PrecisionPolicy.lowered_dtype], else the state's dtype."""
        return self.lowered_dtype or self.state_dtype

    def checkpoint_dtype_for(self, field: FieldPrecision | None) -> torch.dtype:
        """Checkpoints' dtype unless the strategy sets one, once the field's precision is known: the lowered dtype
        when every output part of the field carries its rounding (or a coarser one), else the state's dtype (a field
        autocast does not lower is as precise as the state: rounding its checkpoints would cost gradient accuracy
        and no evaluation would be cheaper).  ``None`` (not evaluated yet):
        [`default_checkpoint_dtype`][mpnode.core.precision.PrecisionPolicy.default_checkpoint_dtype]."""
        low = self.lowered_dtype
        if low is None or field is None:
            return self.default_checkpoint_dtype
        finest = min(unit_roundoff(d) for d in field.dtypes)
        return low if finest >= unit_roundoff(low) else self.state_dtype

    def autocast(self) -> torch.autocast:
        """The autocast context of this solve, entered once around a whole loop.

        Its weight-cast cache is on: each weight is cast to the autocast dtype once per
        loop and that copy serves every stage and step.  The per-step VJP then sums a
        step's stage contributions to a weight's gradient in the autocast dtype, converts
        the step's total to the weight's dtype, and the steps are summed there.
        """
        if self.autocast_dtype is None:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.autocast_dtype, cache_enabled=True)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon of a floating dtype: bfloat16 2^-8, float16 2^-11, float32 2^-24, float64 2^-53."""
    return torch.finfo(dtype).eps / 2


def field_roundoff(field_dtype: torch.dtype | None, state_dtype: torch.dtype) -> float:
    """Unit roundoff of the precision a vector field ran in, when it is coarser than the state's; else 0.

    ``field_dtype`` is the coarsest dtype whose rounding reached a field's output part
    ([`FieldPrecision.dtypes`][mpnode.core.precision.FieldPrecision]): bfloat16 or float16 when autocast lowered
    an op the part was computed from, the state's dtype when it did not (a float64 field under autocast, ops
    autocast keeps in float32).  0 means the part is as precise as the state, and adaptive stepping treats it
    exactly as without autocast.
    """
    if field_dtype is None or unit_roundoff(field_dtype) <= unit_roundoff(state_dtype):
        return 0.0
    return unit_roundoff(field_dtype)


def coarser(a: torch.dtype | None, b: torch.dtype | None) -> torch.dtype | None:
    """The floating dtype of the two with the larger unit roundoff (``None`` stands for exact: no rounding)."""
    if a is None or b is None:
        return b if a is None else a
    return b if unit_roundoff(b) > unit_roundoff(a) else a


@dataclass(frozen=True)
class FieldPrecision:
    """The precision a vector field's outputs carry, found on its first evaluation
    ([`RoundoffTrace`][mpnode.core.precision.RoundoffTrace]).

    Attributes:
        dtypes: per output part (one entry for a tensor state), the coarsest floating dtype whose rounding reached
            it: its own dtype, or a coarser one among the tensors it was computed from (a bfloat16 matmul whose
            result a ``.float()``, a float32 scale or ``torch.cat`` with a float32 tensor promoted to float32 still
            carries bfloat16 rounding).
        noise: per output part, the relative size of that rounding: the unit roundoff of ``dtypes``, less where
            the low-precision term is added to a larger, more precise one (a float32 physics model plus a small
            bfloat16 correction).
    """

    dtypes: tuple[torch.dtype, ...]
    noise: tuple[float, ...]

    @property
    def coarsest(self) -> torch.dtype:
        """The least precise of ``dtypes``: what the field ran in, as messages name it."""
        out = None
        for d in self.dtypes:
            out = coarser(out, d)
        assert out is not None, "a field has at least one output part"
        return out

    def roundoff(self, state_dtype: torch.dtype) -> tuple[float, ...]:
        """Per output part, the relative rounding noise it carries where a dtype coarser than the state's reached it
        ([`field_roundoff`][mpnode.core.precision.field_roundoff]), else 0 (then the part is as precise as the state
        and is judged as without autocast)."""
        return tuple(r if field_roundoff(d, state_dtype) else 0.0 for d, r in zip(self.dtypes, self.noise))


class RoundoffTrace(TorchFunctionMode):
    """Follows where rounding comes from, and how large it is, through one evaluation of a vector field.

    Every tensor carries a dtype (the coarsest whose rounding reached it) and a relative noise ``r`` (the size of
    that rounding relative to the tensor, in RMS).  A tensor from outside the evaluation (``y``, ``t``, parameters,
    buffers) carries its own dtype and its unit roundoff.  A torch function's result carries the coarsest dtype of
    its own and its floating tensor arguments', and ``r`` = the larger of its dtype's unit roundoff and

    * for an addition or subtraction ``a ± b``: ``(r_a rms(a) + r_b rms(b)) / rms(a ± b)``, the first-order error
      of a sum, at most the larger of ``r_a``, ``r_b``: a small bfloat16 term added to a large float32 one adds
      little noise;
    * for a concatenation (``cat``, ``stack``): the RMS of the parts' noise over the RMS of the result, and likewise
      for ``where(cond, a, b)`` over the values it selects;
    * for any other function: the largest ``r`` of its arguments (relative rounding passes through a
      well-conditioned op: ``.float()``, a scale, ``tanh``, a matmul, ``torch.autograd.grad``).

    A cancellation (a sum much smaller than its terms) would amplify the relative noise; it is not modelled, here
    as inside a matmul: the noise bound built on ``r`` ([`RoundoffNoise`][mpnode.core.tolerance.RoundoffNoise]) is
    calibrated on the unit roundoff of fields that cancel in places (a CNF's ``1 - tanh^2``), and raising it there
    costs accuracy.

    So ``net(y).float()``, ``gamma * net(y)`` and ``torch.cat([net(y), zeros])`` carry bfloat16 at bfloat16's
    unit roundoff when ``net`` ran in bfloat16 under autocast; a float64 field, or one made of ops autocast keeps in
    float32, carries its own dtype.  Integer and boolean results carry nothing (a comparison selects values, it does
    not round them), and the ``*_like``/``new_*`` factories inherit nothing.  Values that leave tensors
    (``.item()``, ``float(x)``) escape it.  Entered on a field's first evaluation only: Python overhead per torch
    call, and a few reductions (and host reads) per addition, of that one evaluation.
    """

    #: functions whose result depends on their tensor arguments' shape, dtype and device only
    VALUE_FREE = frozenset({"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
                            "randint_like", "new_zeros", "new_ones", "new_empty", "new_full"})
    #: additions and subtractions: the noise of the result is the sum of the operands' noise
    ADDITIVE = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "subtract", "subtract_",
                          "__sub__", "__rsub__", "__isub__", "rsub"})
    #: concatenations: the noise of the result is that of its parts, element by element
    JOINING = frozenset({"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "column_stack"})

    def __init__(self) -> None:
        super().__init__()
        #: id -> (the tensor, the dtype it carries, its relative noise)
        self.carried: dict[int, tuple[weakref.ref, torch.dtype, float]] = {}

    def carries(self, x: torch.Tensor) -> tuple[torch.dtype | None, float]:
        """The coarsest dtype whose rounding reached ``x`` and its relative noise (``(None, 0)`` for integer and
        boolean tensors)."""
        own = x.dtype if x.dtype.is_floating_point else None
        entry = self.carried.get(id(x))
        if entry is not None and entry[0]() is x:
            return coarser(own, entry[1]), entry[2]
        return own, unit_roundoff(own) if own is not None else 0.0

    def precision(self, parts: Sequence[torch.Tensor]) -> FieldPrecision:
        """The [`FieldPrecision`][mpnode.core.precision.FieldPrecision] of a field's (floating) output parts."""
        carried = [self.carries(p) for p in parts]
        return FieldPrecision(tuple(d or p.dtype for (d, _), p in zip(carried, parts)),
                              tuple(max(r, unit_roundoff(p.dtype)) for (_, r), p in zip(carried, parts)))

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in self.VALUE_FREE:
            return out
        inputs = [(x, *self.carries(x)) for x in tensors_in((args, kwargs))]
        inputs = [(x, d, r) for x, d, r in inputs if d is not None or r]
        if not inputs:
            return out
        dtype = None
        for _, d, _ in inputs:
            dtype = coarser(dtype, d)
        targets = list(tensors_in(out))
        if name == "__setitem__" and args and isinstance(args[0], torch.Tensor):
            targets.append(args[0])  # x[i] = v: x now holds v's rounding
        for x in targets:
            if x.dtype.is_floating_point or x.dtype.is_complex:
                noise = self._selected_noise(args, x) if name == "where" else None
                self._mark(x, dtype, _noise_of(name, inputs, x, kwargs.get("alpha")) if noise is None else noise)
        return out

    def _selected_noise(self, args: Any, out: torch.Tensor) -> float | None:
        """``where(cond, a, b)``: the noise of the values it selects, as a concatenation of the selected parts
        (``None``: not that call form, or values a batching transform hides)."""
        if len(args) < 3 or not isinstance(args[0], torch.Tensor):
            return None
        try:
            cond = args[0].bool().broadcast_to(out.shape)
            parts = [(x.broadcast_to(out.shape)[mask], self.carries(x)[1]) for x, mask in ((args[1], cond),
                                                                                           (args[2], ~cond))
                     if isinstance(x, torch.Tensor) and x.dtype.is_floating_point]
            rms = _rms([x for x, _ in parts])
        except RuntimeError:
            return None
        sizes = [x.numel() for x, _ in parts]
        total = sum(n * m * m for n, m in zip(sizes, rms))
        if not total > 0.0 or not math.isfinite(total):
            return max((r for _, r in parts), default=0.0)
        return math.sqrt(sum(n * (r * m) ** 2 for n, (_, r), m in zip(sizes, parts, rms)) / total)

    def _mark(self, x: torch.Tensor, dtype: torch.dtype | None, noise: float) -> None:
        own = x.dtype if x.dtype.is_floating_point else None
        try:
            self.carried[id(x)] = (weakref.ref(x), coarser(own, dtype) or x.dtype,
                                   max(noise, unit_roundoff(own) if own is not None else 0.0))
        except TypeError:  # a tensor type that refuses weak references: it carries its own dtype
            pass


def _noise_of(name: str, inputs: Sequence[tuple[torch.Tensor, Any, float]], out: torch.Tensor,
              alpha: Any) -> float:
    """The relative noise of ``out`` from its inputs' (see [`RoundoffTrace`][mpnode.core.precision.RoundoffTrace])."""
    largest = max(r for _, _, r in inputs)
    additive, joining = name in RoundoffTrace.ADDITIVE, name in RoundoffTrace.JOINING
    if not (additive or joining) or out.dtype.is_complex or any(x.dtype.is_complex for x, _, _ in inputs):
        return largest
    try:
        rms = _rms([out, *(x for x, _, _ in inputs)])
    except RuntimeError:  # values a batching transform (torch.func.vmap) hides: no weights to go by
        return largest
    if not rms[0] > 0.0 or not all(map(math.isfinite, rms)):
        return largest  # an exact zero, or an overflow: no weights to go by
    if additive:
        weights = [1.0] * len(inputs)
        if isinstance(alpha, (int, float)) and len(inputs) == 2:
            weights[1] = abs(alpha)  # add(a, b, alpha=c) adds c * b
        noise = sum(w * r * m for w, (_, _, r), m in zip(weights, inputs, rms[1:])) / rms[0]
    else:
        sizes = [x.numel() for x, _, _ in inputs]
        noise = math.sqrt(sum(n * (r * m) ** 2 for n, (_, _, r), m in zip(sizes, inputs, rms[1:]))
                          / sum(n * m * m for n, m in zip(sizes, rms[1:])))
    return min(noise, largest)  # a cancellation is not modelled (the noise bound is calibrated without it)


def _rms(xs: Sequence[torch.Tensor]) -> list[float]:
    """``sqrt(mean(x^2))`` of each tensor, scaled by its largest element (no overflow in float32); one host read."""
    out = []
    for x in xs:
        x = x.detach().float()
        if x.numel() == 0:
            out.append(x.new_zeros(()))
            continue
        m = x.abs().amax()
        out.append(m * (x / m.clamp_min(torch.finfo(torch.float32).tiny)).pow(2).mean().sqrt())
    return torch.stack(out).tolist()


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts (what torch functions take and return)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from tensors_in(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from tensors_in(x)
