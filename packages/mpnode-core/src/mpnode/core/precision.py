"""The precision policy: which dtype each quantity lives in (see docs/precision.md).

=========================================================  ===========================================
quantity                                                   dtype
=========================================================  ===========================================
``y0``, states, stage inputs, stage sums, outputs          ``y0``'s dtype (float32/float64); float32 for a 16-bit ``y0``
vector-field evaluations and their VJPs                    what autocast selects for ``y0.device.type``
checkpoints                                                the strategy's ``checkpoint_dtype``, else the
                                                           autocast dtype (float32 states) or ``y0``'s
adjoint, gradient sums for ``y0``, ``t``, parameters       ``y0``'s dtype; parameters' own for their grads
times, step sizes                                          ``t``'s dtype (fixed grids), float64 (adaptive)
=========================================================  ===========================================

What autocast does to a field is read from the field's output, not from whether
autocast is on: autocast never lowers float64, nor the ops it keeps in float32
([`field_roundoff`][mpnode.core.precision.field_roundoff]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
        """Checkpoints' dtype unless the strategy sets one:
        [`lowered_dtype`][mpnode.core.precision.PrecisionPolicy.lowered_dtype], else the state's dtype."""
        return self.lowered_dtype or self.state_dtype

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

    ``field_dtype`` is the least precise dtype among the field's outputs (see
    ``FlatVectorField.out_dtype``): bfloat16 or float16 when autocast lowered the
    field's last op, the state's dtype when it did not (a float64 field under
    autocast, ops autocast keeps in float32).  0 means the field is as precise
    as the state, and adaptive stepping behaves exactly as without autocast.
    """
    if field_dtype is None or unit_roundoff(field_dtype) <= unit_roundoff(state_dtype):
        return 0.0
    return unit_roundoff(field_dtype)
