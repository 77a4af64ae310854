"""mpnode.scaler: adjoint scaling for float16 backward passes of ``mpnode.core.odeint``.

* [`DynamicAdjointScaler`][mpnode.scaler.dynamic.DynamicAdjointScaler]: power-of-two dynamic scaling with block-wise
  optimistic execution (about one host synchronisation per ``block_size`` steps).
* ``GradScalerPassthrough``: deprecated alias of ``mpnode.core.NoAdjointScaling()`` (no scaling; overflow comes
  back as non-finite gradients so ``torch.amp.GradScaler`` skips the optimizer step).
* [`default_scaler`][mpnode.scaler.default_scaler]: what ``odeint(..., scaler=None)`` uses under float16 autocast.
"""

from .dynamic import DynamicAdjointScaler, ScaleEvent
from .passthrough import GradScalerPassthrough


def default_scaler() -> DynamicAdjointScaler:
    """A fresh [`DynamicAdjointScaler`][mpnode.scaler.dynamic.DynamicAdjointScaler] with default settings.

    ``odeint`` calls this for every float16 solve given ``scaler=None``; keep your
    own instance and pass it as ``scaler=`` to carry its state across iterations.
    """
    return DynamicAdjointScaler()


__all__ = ["DynamicAdjointScaler", "GradScalerPassthrough", "ScaleEvent", "default_scaler"]
__version__ = "0.1.0"
