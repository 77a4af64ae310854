"""The precision policy: which dtype each quantity lives in (see docs/precision.md).

=========================================================  ===========================================
quantity                                                   dtype
=========================================================  ===========================================
``y0``, states, stage inputs, stage sums, outputs          ``y0``'s dtype (float32/float64); float32 for a 16-bit ``y0``
vector-field evaluations and their VJPs                    what autocast selects for ``y0.device.type``
checkpoints                                                the adjoint strategy's ``checkpoint_dtype``
adjoint, gradient sums for ``y0``, ``t``, parameters       ``y0``'s dtype; parameters' own for their grads
times, step sizes                                          ``t``'s dtype (fixed grids), float64 (adaptive)
=========================================================  ===========================================
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
    def capture(cls, y0: torch.Tensor) -> "PrecisionPolicy":
        """Read the autocast state of ``y0``'s device type at the call site."""
        device_type = y0.device.type
        enabled = torch.is_autocast_enabled(device_type)
        low = torch.get_autocast_dtype(device_type) if enabled else None
        return cls(device_type, low, torch.float32 if y0.dtype in LOW_PRECISION_Y0_DTYPES else y0.dtype)

    @property
    def roundoff(self) -> float:
        """Unit roundoff of the vector field's dtype under autocast (bfloat16 2^-8, float16 2^-11); 0 without autocast."""
        return 0.0 if self.autocast_dtype is None else torch.finfo(self.autocast_dtype).eps / 2

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
