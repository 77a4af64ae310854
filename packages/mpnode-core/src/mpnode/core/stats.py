"""Counters a caller can read after a solve without changing ``odeint``'s return type."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

COUNTERS = (
    "steps", "rejected_steps", "noise_accepted_steps", "nfe_forward", "nfe_backward", "backward_steps", "retries",
    "host_syncs",
)


@dataclass
class SolverStats:
    """Work done by one or more ``odeint`` calls and their backward passes.

    Pass an instance as ``options={"stats": stats}``; each forward and each
    backward pass adds to it when it completes (a call that raises adds nothing),
    so one object can accumulate over a training run.

    Attributes:
        steps: accepted steps of forward passes.
        rejected_steps: rejected attempts of adaptive forward passes.
        noise_accepted_steps: accepted steps of adaptive forward passes whose error
            estimate was above the tolerance but within its own rounding noise (the
            vector field ran in bfloat16/float16): there the solution is as accurate
            as the field's precision allows, not as rtol/atol ask.
        nfe_forward: vector-field evaluations in forward passes (the initial-step
            selection of adaptive methods included).
        nfe_backward: evaluations made while recomputing steps in backward passes,
            retries included.
        backward_steps: steps whose vector-Jacobian product was accepted.
        retries: steps recomputed again because the adjoint scaler rejected a block
            (float16 overflow).
        host_syncs: device-to-host synchronisations made by backward passes
            (scaler block checks).
        last_grid: the accepted step nodes ``tau_0 .. tau_N`` of the latest forward
            pass (host floats, in integration order).
        last_adjoint: the adjoint strategy used by the latest forward pass (its ``name``).
    """

    steps: int = 0
    rejected_steps: int = 0
    noise_accepted_steps: int = 0
    nfe_forward: int = 0
    nfe_backward: int = 0
    backward_steps: int = 0
    retries: int = 0
    host_syncs: int = 0
    last_grid: tuple[float, ...] | None = field(default=None, repr=False)
    last_adjoint: str | None = None

    def reset(self) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)
        self.last_grid = None
        self.last_adjoint = None

    def add(self, other: SolverStats) -> None:
        """Add ``other``'s counters to this one and take its ``last_*`` values (when set)."""
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.last_grid is not None:
            self.last_grid = other.last_grid
        if other.last_adjoint is not None:
            self.last_adjoint = other.last_adjoint

    def as_dict(self) -> dict[str, int]:
        """The counters (not ``last_grid``/``last_adjoint``) as a dict."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in COUNTERS}
