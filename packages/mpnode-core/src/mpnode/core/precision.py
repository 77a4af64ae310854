"""The precision policy (DESIGN.md section 3): which dtype each quantity lives in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
STATE_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class PrecisionPolicy:
    """Dtypes of one solve, fixed when ``odeint`` is called.

    Attributes:
        device_type: autocast device type, taken from ``y0.device`` (``"cpu"``, ``"cuda"``, ...).
        autocast_dtype: the low precision of the vector field, or ``None`` when
            autocast is off for ``device_type`` at the call.
        state_dtype: dtype of ``y0``: state, stage inputs, adjoint and outputs.
        checkpoint_dtype: dtype of the one stored state per step.
    """

    device_type: str
    autocast_dtype: torch.dtype | None
    state_dtype: torch.dtype
    checkpoint_dtype: torch.dtype

    @classmethod
    def capture(cls, y0: torch.Tensor, checkpoint_dtype: torch.dtype | None = None) -> "PrecisionPolicy":
        """Read the autocast state of ``y0``'s device type at the call site."""
        device_type = y0.device.type
        enabled = torch.is_autocast_enabled(device_type)
        low = torch.get_autocast_dtype(device_type) if enabled else None
        if checkpoint_dtype is None:
            checkpoint_dtype = low if low is not None else y0.dtype
        elif not isinstance(checkpoint_dtype, torch.dtype) or not checkpoint_dtype.is_floating_point:
            raise TypeError(
                f"options['checkpoint_dtype'] must be a floating torch.dtype such as torch.bfloat16, got {checkpoint_dtype!r}"
            )
        return cls(device_type, low, y0.dtype, checkpoint_dtype)

    @property
    def is_float16(self) -> bool:
        """True when float16's narrow range makes adjoint overflow possible."""
        return self.autocast_dtype == torch.float16 or self.checkpoint_dtype == torch.float16

    def autocast(self) -> torch.autocast:
        """The autocast context of this solve, entered once around a whole loop."""
        if self.autocast_dtype is None:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)
