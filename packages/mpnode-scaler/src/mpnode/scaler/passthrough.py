"""The GradScaler mode: no adjoint scaling, overflow returned as inf/NaN gradients."""

from __future__ import annotations

from mpnode.core import NoAdjointScaling


class GradScalerPassthrough(NoAdjointScaling):
    """Use with ``torch.amp.GradScaler``: the loss scale is the only scale.

    The backward recurrence runs unscaled and returns non-finite gradients when
    float16 overflows; ``GradScaler.step`` then skips the optimizer step and
    ``GradScaler.update`` lowers its scale.  Choose this when you already train
    with a GradScaler and overflow is rare; choose :class:`DynamicAdjointScaler`
    when the adjoint's magnitude varies along the trajectory (long horizons,
    stiff or decaying dynamics), where one global loss scale cannot keep every
    step inside float16's range.
    """

    def __init__(self) -> None:
        super().__init__(raise_on_nonfinite=False)
