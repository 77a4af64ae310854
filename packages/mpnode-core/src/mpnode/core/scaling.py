"""The adjoint-scaling interface of the backward recurrence.

The backward pass ([`mpnode.core.backward`][mpnode.core.backward]) seeds each step's
vector-Jacobian product with ``S * lambda`` and unscales the result by
``h / S`` in high precision.  A scaling policy chooses ``S`` and may reject
a block of steps (after which the loop restores its snapshot and redoes
the block).  ``mpnode.scaler.DynamicAdjointScaler`` implements it for
float16; [`NoAdjointScaling`][mpnode.core.scaling.NoAdjointScaling] is the policy used otherwise.

A policy object is shared by every solve it is passed to (and may be shared by threads); everything that belongs to one
backward pass lives in the [`ScalingPass`][mpnode.core.scaling.ScalingPass] that
[`AdjointScaling.begin`][mpnode.core.scaling.AdjointScaling.begin] returns, and the policy learns from a pass only when
the pass completes ([`ScalingPass.end`][mpnode.core.scaling.ScalingPass.end]).  A backward pass that raises leaves the
policy as it was.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from importlib.metadata import entry_points

import torch

#: Entry-point group through which a package supplies the float16 default (mpnode-scaler does).
SCALING_ENTRY_POINTS = "mpnode.adjoint_scaling"


class ScalingPass(abc.ABC):
    """The scaling state of one backward pass over ``n_steps`` steps.

    Call order::

        repeat per block of steps (latest first):
            snap = snapshot()                          # only if block_size is not None
            per step m:  S = scale(lam); ...; observe(m, lam, S, grads)
            accepted = end_block(lo, hi)               # False: restore(snap), redo
        end(results)                                   # the pass completed: the policy learns from it

    Every method except ``end_block`` and ``end`` must stay on the device
    (no ``.item()``, no ``bool(tensor)``) so the loop runs without host
    synchronisation between checks.
    """

    #: steps between host checks; ``None`` means the pass never rejects a block.
    block_size: int | None = None
    #: host synchronisations made by this pass (reported in ``SolverStats.host_syncs``).
    host_syncs: int = 0

    @abc.abstractmethod
    def scale(self, lam: torch.Tensor) -> torch.Tensor | None:
        """The scale ``S`` (float32 0-dim tensor on ``lam``'s device) for the next step's VJP.

        ``lam`` holds what seeds that VJP (high precision): the adjoint ``(D,)``, or,
        when outputs are interpolated inside the step, the adjoint stacked with their
        gradients ``(1 + J, D)``; every seed is multiplied by ``S``.  ``None`` means
        exactly 1: the loop then skips the scaling arithmetic.
        """

    def observe(self, step: int, lam: torch.Tensor, scale: torch.Tensor | None, grads: Sequence[torch.Tensor]) -> None:
        """See the scaled VJP results ``grads`` of ``step`` (computed with ``scale`` from the seeds ``lam``)."""

    def snapshot(self) -> object:
        return None

    def restore(self, snap: object) -> None:
        pass

    def end_block(self, lo: int, hi: int) -> bool:
        """Accept (True) or reject (False) steps ``lo .. hi-1``; may raise when it cannot recover."""
        return True

    def end(self, results: Sequence[torch.Tensor]) -> None:
        """Called with the final gradients before they are returned to autograd; may raise.

        When it returns, the pass is complete and its policy has learned from it.
        """


class AdjointScaling(abc.ABC):
    """A scaling policy: starts one [`ScalingPass`][mpnode.core.scaling.ScalingPass] per backward pass.

    Attributes:
        host_syncs: host synchronisations made by this policy's completed passes.
    """

    host_syncs: int = 0

    @abc.abstractmethod
    def begin(self, lam: torch.Tensor, n_steps: int) -> ScalingPass:
        """Start a backward pass over ``n_steps`` steps; ``lam`` holds the gradients arriving at the solution,
        ``dL/d outputs`` ``(T, D)`` (high precision)."""


class NonFiniteGradientError(FloatingPointError):
    """The backward pass produced inf/NaN that no scaling policy recovered."""


#: What NoAdjointScaling(raise_on_nonfinite=True) tells the user when no scaler was found.
INSTALL_SCALER_ADVICE = (
    "no adjoint scaler was used. Install mpnode-scaler (pip install ./packages/mpnode-scaler from the "
    "torchmpnode checkout) and pass "
    "scaler=mpnode.scaler.DynamicAdjointScaler(), or autocast to torch.bfloat16."
)


class NoAdjointScaling(AdjointScaling):
    """Scale 1.  Optionally raise when the final gradients are not finite.

    Args:
        raise_on_nonfinite: check the gradients once at the end of backward (one
            host synchronisation) and raise [`NonFiniteGradientError`][mpnode.core.scaling.NonFiniteGradientError].
            With ``False`` non-finite gradients are returned as they are, which is
            what ``torch.amp.GradScaler`` needs to skip the optimizer step.
        advice: what the error says to do about an overflow (default: install
            and pass mpnode-scaler's dynamic scaler).
    """

    def __init__(self, raise_on_nonfinite: bool = False, advice: str = INSTALL_SCALER_ADVICE) -> None:
        self.raise_on_nonfinite = raise_on_nonfinite
        self.advice = advice
        self.host_syncs = 0

    def begin(self, lam: torch.Tensor, n_steps: int) -> ScalingPass:
        return _UnscaledPass(self, lam)


class _UnscaledPass(ScalingPass):
    """Scale 1; with ``raise_on_nonfinite`` one finiteness check of the results (and of the incoming gradients) at
    the end."""

    def __init__(self, policy: NoAdjointScaling, lam: torch.Tensor) -> None:
        self.policy = policy
        self.host_syncs = 0
        # device flag, read only together with the results: was a gradient arriving at the solution already inf/NaN?
        self._incoming_finite = torch.isfinite(lam).all() if policy.raise_on_nonfinite else None

    def scale(self, lam: torch.Tensor) -> None:
        return None

    def end(self, results: Sequence[torch.Tensor]) -> None:
        if self._incoming_finite is not None and results:
            flags = torch.stack([self._incoming_finite, *(torch.isfinite(r).all() for r in results)])
            self.host_syncs += 1
            incoming, *finite = flags.tolist()
            if not incoming:
                raise NonFiniteGradientError(
                    "odeint's backward received an inf/NaN gradient at the solution (check the loss for inf/NaN, "
                    "e.g. log(0)); no scale can fix that. No gradient was written."
                )
            if not all(finite):
                raise NonFiniteGradientError(
                    "the float16 backward pass overflowed (inf/NaN gradients) and " + self.policy.advice
                    + " No gradient was written."
                )
        self.policy.host_syncs += self.host_syncs


def default_scaling(float16: bool) -> AdjointScaling:
    """The scaling a solve uses when none is given.

    Without float16 in the solve: none.  With float16: the policy registered under
    the entry point ``float16`` of group ``mpnode.adjoint_scaling`` (installing
    mpnode-scaler registers its dynamic scaler there), else no scaling with an
    error on overflow that names the package.
    """
    if not float16:
        return NoAdjointScaling()
    for entry in entry_points(group=SCALING_ENTRY_POINTS, name="float16"):
        try:
            return entry.load()()
        except ImportError:  # registered but not importable (e.g. a broken install): run unscaled, raise on overflow
            break
    return NoAdjointScaling(raise_on_nonfinite=True)
