"""Counters a caller can read after a solve without changing ``odeint``'s return type."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class SolverStats:
    """Work done by one or more ``odeint`` calls and their backward passes.

    Pass an instance as ``options={"stats": stats}``; forward and backward add
    to it in place (so one object can accumulate over a training run).

    Attributes:
        steps: Runge–Kutta steps taken in forward passes.
        nfe_forward: vector-field evaluations in forward passes.
        nfe_backward: evaluations made while recomputing steps in backward
            passes, retries included.
        backward_steps: steps whose vector-Jacobian product was accepted.
        retries: steps recomputed again because the adjoint scaler rejected a
            block (float16 overflow).
        host_syncs: device-to-host synchronisations made by the backward
            recurrence itself (scaler block checks).
    """

    steps: int = 0
    nfe_forward: int = 0
    nfe_backward: int = 0
    backward_steps: int = 0
    retries: int = 0
    host_syncs: int = 0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
