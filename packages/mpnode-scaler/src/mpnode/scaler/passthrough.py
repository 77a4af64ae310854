"""Deprecated: ``GradScalerPassthrough`` is ``mpnode.core.NoAdjointScaling()`` under another name."""

from __future__ import annotations

import warnings

from mpnode.core import NoAdjointScaling


class GradScalerPassthrough(NoAdjointScaling):
    """Deprecated alias of ``mpnode.core.NoAdjointScaling()``; constructing it warns (``DeprecationWarning``).

    Both run the backward recurrence unscaled and return non-finite gradients when
    float16 overflows, so ``torch.amp.GradScaler`` skips the optimizer step and lowers
    its scale: pass ``scaler=mpnode.core.NoAdjointScaling()`` instead.
    """

    def __init__(self) -> None:
        warnings.warn(
            "mpnode.scaler.GradScalerPassthrough is deprecated: pass scaler=mpnode.core.NoAdjointScaling(), the same "
            "policy (no adjoint scaling; an overflow comes back as inf/NaN gradients for torch.amp.GradScaler)",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(raise_on_nonfinite=False)
