"""Dynamic adjoint scaling: a power-of-two scale S for the float16 backward recurrence.

The backward loop seeds each step's VJP with ``S * lambda`` (cast to float16
inside the network) and unscales by ``h / S`` in high precision.  This policy
keeps ``max|S lambda|`` near a target inside float16's range:

* **init**: at the first step with a non-zero adjoint (the loss may use only
  intermediate outputs, so the terminal adjoint can be zero),
  ``S = 2^floor(log2(target / max|lambda|))``;
* **grow**: after ``growth_interval`` consecutive steps whose *scaled* adjoint
  stayed below ``target / 2``, S doubles;
* **shrink**: a scaled adjoint above ``2 * target`` re-centres S down at once;
* **backoff**: inf/NaN in a step's VJP rejects the block of steps it belongs to;
  the loop restores its snapshot and redoes the block with half the scale, and the
  target is halved for the rest of this scaler's life (it learns the headroom the
  network's reductions need).  After ``max_retries`` rejections of one block it
  raises, before any gradient is written.

Everything per step is a device-side tensor op; the host reads one flag per block
of ``block_size`` steps (optimistic execution) and the scale history once at the
end of backward, so an N-step backward synchronises about ``N / block_size + 1``
times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from mpnode.core import AdjointScaling, NonFiniteGradientError

FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class ScaleEvent:
    """One change of the scale: ``kind`` in ``init``, ``grow``, ``shrink``, ``backoff``.

    ``backward`` counts backward passes of this scaler (from 0), ``step`` is the
    step index ``n`` of the recurrence (``N-1`` first), ``scale`` the scale after
    the event.
    """

    kind: str
    backward: int
    step: int
    scale: float


class DynamicAdjointScaler(AdjointScaling):
    """Dynamic power-of-two adjoint scaling for float16 (see the module docstring).

    Args:
        target: the scaled adjoint's intended max magnitude (a power of two); the
            default 2^8 leaves 2^8 of headroom below float16's max 65504 for the
            sums inside the network's VJP, and 2^32 above its smallest subnormal.
        growth_interval: clean steps below ``target / 2`` before the scale grows.
        block_size: steps per host check (``K``); a backward of N steps makes
            about ``N / K + 1`` host synchronisations.
        max_retries: rejections of one block before giving up with an error.

    Keep one instance across training iterations to keep its learned target,
    counters and history (``history``, ``counters``, ``host_syncs``).
    """

    def __init__(
        self,
        target: float = 2.0**8,
        growth_interval: int = 16,
        block_size: int = 16,
        max_retries: int = 10,
    ) -> None:
        if target <= 0 or target >= FLOAT16_MAX or not math.log2(target).is_integer():
            raise ValueError(f"target must be a power of two below float16's max 65504, got {target}")
        if growth_interval < 1 or block_size < 1 or max_retries < 0:
            raise ValueError("growth_interval and block_size must be >= 1 and max_retries >= 0")
        self.target = float(target)
        self.growth_interval = int(growth_interval)
        self.block_size = int(block_size)
        self.max_retries = int(max_retries)
        self.history: list[ScaleEvent] = []
        self.counters = {"backward": 0, "blocks": 0, "backoffs": 0, "grows": 0, "shrinks": 0}
        self.host_syncs = 0
        self._pass = -1

    # -- one backward pass ------------------------------------------------------------
    def begin(self, lam: torch.Tensor, n_steps: int) -> None:
        dev = lam.device
        self._pass += 1
        self.counters["backward"] += 1
        self._scale = torch.ones((), dtype=torch.float32, device=dev)
        self._ready = torch.zeros((), dtype=torch.bool, device=dev)  # initialised from a non-zero adjoint
        self._clean = torch.zeros((), dtype=torch.int32, device=dev)  # consecutive steps below target/2
        self._bad = torch.zeros((), dtype=torch.bool, device=dev)  # inf/NaN seen in this block
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=dev)
        self._trace = torch.zeros(n_steps, dtype=torch.float32, device=dev)  # S used at each step
        self._retries = 0
        self._target_at_begin = self.target
        self._n_steps = n_steps
        self._backoffs: list[ScaleEvent] = []

    def _centred(self, amax: torch.Tensor) -> torch.Tensor:
        """``2^floor(log2(target / amax))`` (clamped to float32's range; amax > 0)."""
        exponent = torch.floor(torch.log2(self.target / amax.clamp_min(1e-30))).clamp(-100, 100)
        return torch.exp2(exponent)

    def scale(self, lam: torch.Tensor) -> torch.Tensor:
        amax = lam.detach().abs().amax().float()
        nonzero = amax > 0
        centred = self._centred(amax)
        scaled = amax * self._scale
        start = ~self._ready & nonzero
        too_big = self._ready & (scaled > 2 * self.target)
        grow = self._ready & (self._clean >= self.growth_interval)
        recentre = (start | too_big) & nonzero
        self._scale = torch.where(recentre, centred, torch.where(grow, 2 * self._scale, self._scale))
        self._clean = torch.where(grow | too_big, torch.zeros_like(self._clean), self._clean)
        self._ready = self._ready | nonzero
        self._amax = amax
        self._started = start
        return self._scale

    def observe(self, step: int, lam: torch.Tensor, scale: torch.Tensor, grads: Sequence[torch.Tensor]) -> None:
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.ones_like(self._bad)
        # code 2*step + 1 when the adjoint entering the step is itself inf/NaN (no scale can fix that)
        code = 2 * step + (~torch.isfinite(self._amax)).to(self._first_bad.dtype)
        self._first_bad = torch.where(~finite & (self._first_bad < 0), code, self._first_bad)
        self._bad = self._bad | ~finite
        quiet = (self._amax * scale < self.target / 2) & self._ready
        self._clean = torch.where(quiet, self._clean + 1, torch.zeros_like(self._clean))
        self._trace[step] = torch.where(self._started, -scale, scale)  # negative marks the init step

    def snapshot(self) -> object:
        return (self._scale.clone(), self._ready.clone(), self._clean.clone())

    def restore(self, snap: object) -> None:
        scale, ready, clean = snap
        self._scale = scale / 2  # redo the block with half the scale it started with
        self._ready, self._clean = ready, torch.zeros_like(clean)
        self._bad = torch.zeros_like(self._bad)
        self._first_bad = torch.full_like(self._first_bad, -1)

    def end_block(self, lo: int, hi: int) -> bool:
        self.counters["blocks"] += 1
        self.host_syncs += 1
        if not bool(self._bad):
            self._retries = 0
            return True
        self.host_syncs += 1
        step, lam_bad = divmod(int(self._first_bad), 2)
        if lam_bad:
            self._give_up()
            raise NonFiniteGradientError(
                f"DynamicAdjointScaler: the adjoint entering step {step} of {self._n_steps} is already inf/NaN, so no "
                "scale can help: the gradient of the loss w.r.t. odeint's output is not finite (check the loss for "
                "inf/NaN, e.g. log(0)), or it overflowed y0's dtype. No gradient was written."
            )
        self._retries += 1
        if self._retries > self.max_retries:
            self._give_up()
            raise NonFiniteGradientError(
                f"DynamicAdjointScaler: the float16 backward still gives inf/NaN at step {step} of {self._n_steps} "
                f"after {self.max_retries} halvings of the adjoint scale. The vector field itself is probably "
                "non-finite there (check its inputs and weights), or float16 cannot represent it: use bfloat16. "
                "No gradient was written."
            )
        self.counters["backoffs"] += 1
        self.target = max(self.target / 2, 2.0**-24)  # learned headroom, kept across iterations
        self._backoffs.append(ScaleEvent("backoff", self._pass, step, float("nan")))
        return False

    def _give_up(self) -> None:
        """Before raising: record this pass's backoffs and undo its changes to the learned target."""
        self.history.extend(self._backoffs)
        self.target = self._target_at_begin

    def end(self, results: Sequence[torch.Tensor]) -> None:
        self.host_syncs += 1
        trace = self._trace.tolist()  # one transfer for the whole history of this pass
        events, previous = [], None
        for step in range(self._n_steps - 1, -1, -1):
            value = abs(trace[step])
            if trace[step] < 0:
                events.append(ScaleEvent("init", self._pass, step, value))
            elif previous is not None and value != previous:
                kind = "grow" if value > previous else "shrink"
                events.append(ScaleEvent(kind, self._pass, step, value))
                self.counters[kind + "s"] += 1
            if trace[step] < 0 or previous is not None:
                previous = value
        events += [ScaleEvent("backoff", b.backward, b.step, abs(trace[b.step])) for b in self._backoffs]
        self.history.extend(sorted(events, key=lambda e: -e.step))  # chronological order of the backward pass

    @property
    def scale_value(self) -> float:
        """The current scale (one host read)."""
        return float(self._scale)
