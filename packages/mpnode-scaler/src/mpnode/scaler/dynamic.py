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
  learned target is halved (it learns the headroom the network's reductions need).
  After ``max_retries`` rejections of one block it raises, before any gradient is
  written; a pass that raises changes nothing in the scaler (its backoffs are
  learned only when the pass completes);
* **recovery**: after ``recovery_interval`` consecutive completed backward passes
  without a backoff, a target below the initial one doubles (never above the
  initial target), so occasional overflows over a long training cannot ratchet
  the target down into underflow.

Everything per step is a device-side tensor op; the host reads one flag per block
of ``block_size`` steps (optimistic execution) and the scale history once at the
end of backward, so an N-step backward synchronises about ``N / block_size + 1``
times.

State for resuming training: [`DynamicAdjointScaler.state_dict`][mpnode.scaler.dynamic.DynamicAdjointScaler.state_dict]
returns plain Python numbers, strings, lists and dicts (``torch.save`` it with the model and optimizer;
``torch.load(..., weights_only=True)`` reads it back), and
[`DynamicAdjointScaler.load_state_dict`][mpnode.scaler.dynamic.DynamicAdjointScaler.load_state_dict] validates and
restores it, settings included, like ``torch.amp.GradScaler``.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from mpnode.core import AdjointScaling, NonFiniteGradientError, ScalingPass

FLOAT16_MAX = 65504.0
#: the learned target never goes below float16's smallest subnormal
MIN_TARGET = 2.0**-24
#: version of the layout written by ``state_dict``
STATE_VERSION = 1
EVENT_KINDS = ("init", "grow", "shrink", "backoff")
COUNTER_NAMES = ("backward", "blocks", "backoffs", "grows", "shrinks", "recoveries")
SETTING_DEFAULTS: dict[str, Any] = {
    "target": 2.0**8,
    "growth_interval": 16,
    "block_size": 16,
    "max_retries": 10,
    "history_size": 1000,
    "recovery_interval": 100,
}


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


def _require_int(name: str, value: Any, minimum: int, where: str = "") -> int:
    """``value`` as an int ``>= minimum``; ``bool``, floats and strings are refused (TypeError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{where}{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__}); "
            f"pass a whole number, e.g. {name}={int(SETTING_DEFAULTS.get(name, minimum))}"
        )
    if value < minimum:
        raise ValueError(f"{where}{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _require_power_of_two(name: str, value: Any, low: float, high: float, where: str = "") -> float:
    """``value`` as a float power of two in ``[low, high]``; non-numbers are refused (TypeError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{where}{name} must be a float power of two (e.g. {name}=2.0**8), got {value!r} ({type(value).__name__})"
        )
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high and math.log2(value).is_integer()):
        raise ValueError(
            f"{where}{name} must be a power of two in [2^{math.log2(low):g}, 2^{math.log2(high):g}] "
            f"(below float16's max 65504), got {value}"
        )
    return value


def _validated_settings(settings: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """The constructor's settings, type- and range-checked (one home for both __init__ and load)."""
    return {
        "target": _require_power_of_two("target", settings["target"], MIN_TARGET, 2.0**15, where),
        "growth_interval": _require_int("growth_interval", settings["growth_interval"], 1, where),
        "block_size": _require_int("block_size", settings["block_size"], 1, where),
        "max_retries": _require_int("max_retries", settings["max_retries"], 0, where),
        "history_size": _require_int("history_size", settings["history_size"], 0, where),
        "recovery_interval": _require_int("recovery_interval", settings["recovery_interval"], 1, where),
    }


class DynamicAdjointScaler(AdjointScaling):
    """Dynamic power-of-two adjoint scaling for float16 (see the module docstring).

    Args:
        target: the scaled adjoint's intended max magnitude, a power of two in
            ``[2^-24, 2^15]``; the default 2^8 leaves 2^8 of headroom below float16's
            max 65504 for the sums inside the network's VJP, and 2^32 above its
            smallest subnormal.  It is also the ceiling of the learned target.
        growth_interval: clean steps below ``target / 2`` before the scale grows.
        block_size: steps per host check (``K``); a backward of N steps makes
            about ``N / K + 1`` host synchronisations.
        max_retries: rejections of one block before giving up with an error.
        history_size: the most events ``history`` keeps (oldest dropped first,
            counted in ``history_dropped``); 0 keeps none.  The counters count
            every event regardless.
        recovery_interval: completed backward passes in a row without a backoff
            after which a learned target below ``target`` doubles.

    Integer arguments must be ints (``1.5``, ``True`` or ``"3"`` raise TypeError).

    What it keeps (keep one instance across training iterations; save it with
    [`state_dict`][mpnode.scaler.dynamic.DynamicAdjointScaler.state_dict]):

    * ``target``: the learned target (float), ``initial_target``: the setting;
    * ``history``: a list of the last ``history_size`` [`ScaleEvent`][mpnode.scaler.dynamic.ScaleEvent], oldest
      first; ``history_dropped``: how many older events were dropped from it;
    * ``counters``: ``backward`` (passes completed), ``blocks``, ``backoffs``, ``grows``,
      ``shrinks``, ``recoveries``; ``host_syncs``;
    * ``clean_passes``: completed passes without a backoff since the target was
      last lowered or raised (counted only while it is below ``initial_target``).

    Thread-safe: each backward pass keeps its scale, trace and backoffs in its own pass object
    ([`begin`][mpnode.scaler.dynamic.DynamicAdjointScaler.begin]); the learned state above changes only when a pass
    completes, under a lock, so one scaler may serve several threads (e.g. one per device).  A backward pass that raises
    changes nothing here.
    """

    def __init__(
        self,
        target: float = SETTING_DEFAULTS["target"],
        growth_interval: int = SETTING_DEFAULTS["growth_interval"],
        block_size: int = SETTING_DEFAULTS["block_size"],
        max_retries: int = SETTING_DEFAULTS["max_retries"],
        history_size: int = SETTING_DEFAULTS["history_size"],
        recovery_interval: int = SETTING_DEFAULTS["recovery_interval"],
    ) -> None:
        settings = _validated_settings(
            {
                "target": target,
                "growth_interval": growth_interval,
                "block_size": block_size,
                "max_retries": max_retries,
                "history_size": history_size,
                "recovery_interval": recovery_interval,
            }
        )
        self._apply(settings, learned=None)

    def _apply(self, settings: dict[str, Any], learned: dict[str, Any] | None) -> None:
        """Set settings and learned state together (``learned=None``: a fresh scaler)."""
        if not hasattr(self, "_lock"):
            self._lock = threading.Lock()
        self.initial_target = settings["target"]
        self.growth_interval = settings["growth_interval"]
        self.block_size = settings["block_size"]
        self.max_retries = settings["max_retries"]
        self.history_size = settings["history_size"]
        self.recovery_interval = settings["recovery_interval"]
        learned = learned or {
            "learned_target": self.initial_target,
            "counters": dict.fromkeys(COUNTER_NAMES, 0),
            "host_syncs": 0,
            "clean_passes": 0,
            "history": [],
            "history_dropped": 0,
            "last_scale": None,
        }
        self.target = learned["learned_target"]
        self.counters = dict(learned["counters"])
        self.host_syncs = learned["host_syncs"]
        self.clean_passes = learned["clean_passes"]
        self.history: list[ScaleEvent] = list(learned["history"])
        self.history_dropped = learned["history_dropped"]
        self._last_scale = learned["last_scale"]

    # -- one backward pass ------------------------------------------------------------
    def begin(self, lam: torch.Tensor, n_steps: int) -> _DynamicPass:
        """Start a backward pass: its scale, trace and backoffs live in the returned pass object."""
        with self._lock:
            target = self.target
        return _DynamicPass(self, lam.device, n_steps, target)

    def _commit(self, done: _DynamicPass, trace: list[float]) -> None:
        """Learn from a completed pass (under the lock, so concurrent passes commit one at a time).

        The pass's backoffs halve the learned target as it is *now* (another pass may
        have changed it since this one began); its events go to ``history`` numbered
        by completion order.
        """
        with self._lock:
            index = self.counters["backward"]
            self.counters["backward"] += 1
            self.counters["blocks"] += done.blocks
            self.counters["backoffs"] += len(done.backoff_steps)
            self.host_syncs += done.host_syncs
            events = _trace_events(index, trace, done.backoff_steps)
            for event in events:
                if event.kind in ("grow", "shrink"):
                    self.counters[event.kind + "s"] += 1
            self._record(events)
            if trace:
                self._last_scale = abs(trace[0])
            for _ in done.backoff_steps:
                self.target = max(self.target / 2, MIN_TARGET)
            self._update_recovery(clean=not done.backoff_steps)

    def _record(self, events: Sequence[ScaleEvent]) -> None:
        """Append to ``history`` and drop its oldest events beyond ``history_size``, counting them."""
        self.history.extend(events)
        excess = len(self.history) - self.history_size
        if excess > 0:
            del self.history[:excess]
            self.history_dropped += excess

    def _update_recovery(self, clean: bool) -> None:
        """After a completed pass: count clean passes while the target is lowered; double it every
        ``recovery_interval`` of them (never above ``initial_target``)."""
        if not clean or self.target >= self.initial_target:
            self.clean_passes = 0
            return
        self.clean_passes += 1
        if self.clean_passes >= self.recovery_interval:
            self.target = min(2 * self.target, self.initial_target)
            self.counters["recoveries"] += 1
            self.clean_passes = 0

    @property
    def scale_value(self) -> float | None:
        """The scale used at the last step (``n = 0``) of the latest completed backward pass.

        ``None`` before any backward pass has completed (the scale is chosen from
        the adjoint when a pass starts, so there is none yet).  No host read: the
        value was read with the pass's trace.
        """
        return self._last_scale

    # -- saving and resuming ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: settings, learned target, counters, history, last scale.

        Only plain ``int``/``float``/``str``/``None``/``list``/``dict`` values, so
        ``torch.load(path, weights_only=True)`` reads a ``torch.save``-d copy.
        Safe to call while other threads run backward passes (it reads under the lock).
        """
        with self._lock:
            return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "settings": {
                "target": self.initial_target,
                "growth_interval": self.growth_interval,
                "block_size": self.block_size,
                "max_retries": self.max_retries,
                "history_size": self.history_size,
                "recovery_interval": self.recovery_interval,
            },
            "learned_target": self.target,
            "counters": dict(self.counters),
            "host_syncs": self.host_syncs,
            "clean_passes": self.clean_passes,
            "history": [
                {"kind": e.kind, "backward": e.backward, "step": e.step, "scale": e.scale} for e in self.history
            ],
            "history_dropped": self.history_dropped,
            "last_scale": self._last_scale,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a [`state_dict`][mpnode.scaler.dynamic.DynamicAdjointScaler.state_dict], settings included (they
        overwrite this instance's, as ``torch.amp.GradScaler.load_state_dict`` does).

        Everything is validated before anything changes: a missing or unexpected
        key or an out-of-range value raises ``ValueError``, a wrong type ``TypeError``,
        each naming the entry, and the scaler is left as it was.
        """
        settings, learned = _parse_state(state)
        with self._lock:
            self._apply(settings, learned)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (``copy.deepcopy``, ``torch.save`` of the object): the lock is not copied."""
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._lock = threading.Lock()


class _DynamicPass(ScalingPass):
    """The per-pass state of one backward pass of a
    [`DynamicAdjointScaler`][mpnode.scaler.dynamic.DynamicAdjointScaler].

    Device tensors (0-dim unless stated): ``scale`` (float32), ``ready`` (initialised
    from a non-zero adjoint), ``clean`` (consecutive steps below ``target / 2``),
    ``bad`` (inf/NaN seen in this block), ``first_bad`` (``2 * step + lam_bad`` of
    the first bad step, -1 if none), ``trace`` ``(n_steps,)`` float32: the scale used
    at each step, negative at the init step.  Host values: ``target`` (this pass's
    copy of the learned target, halved by each backoff), ``backoff_steps``,
    ``blocks``, ``retries``, ``host_syncs``.
    """

    def __init__(self, scaler: DynamicAdjointScaler, device: torch.device, n_steps: int, target: float) -> None:
        self.scaler = scaler
        self.block_size = scaler.block_size
        self.growth_interval = scaler.growth_interval
        self.max_retries = scaler.max_retries
        self.target = target
        self.n_steps = n_steps
        self.host_syncs = 0
        self.blocks = 0
        self.retries = 0
        self.backoff_steps: list[int] = []
        self.scale_t = torch.ones((), dtype=torch.float32, device=device)
        self.ready = torch.zeros((), dtype=torch.bool, device=device)
        self.clean = torch.zeros((), dtype=torch.int32, device=device)
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.trace = torch.zeros(n_steps, dtype=torch.float32, device=device)
        self.amax = torch.zeros((), dtype=torch.float32, device=device)
        self.started = torch.zeros((), dtype=torch.bool, device=device)

    def _centred(self, amax: torch.Tensor) -> torch.Tensor:
        """``2^floor(log2(target / amax))`` (clamped to float32's range; amax > 0)."""
        exponent = torch.floor(torch.log2(self.target / amax.clamp_min(1e-30))).clamp(-100, 100)
        return torch.exp2(exponent)

    def scale(self, lam: torch.Tensor) -> torch.Tensor:
        amax = lam.detach().abs().amax().float()
        nonzero = amax > 0
        centred = self._centred(amax)
        scaled = amax * self.scale_t
        start = ~self.ready & nonzero
        too_big = self.ready & (scaled > 2 * self.target)
        grow = self.ready & (self.clean >= self.growth_interval)
        recentre = (start | too_big) & nonzero
        self.scale_t = torch.where(recentre, centred, torch.where(grow, 2 * self.scale_t, self.scale_t))
        self.clean = torch.where(grow | too_big, torch.zeros_like(self.clean), self.clean)
        self.ready = self.ready | nonzero
        self.amax = amax
        self.started = start
        return self.scale_t

    def observe(self, step: int, lam: torch.Tensor, scale: torch.Tensor | None, grads: Sequence[torch.Tensor]) -> None:
        assert scale is not None, "this pass always scales"
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.ones_like(self.bad)
        # code 2*step + 1 when the adjoint entering the step is itself inf/NaN (no scale can fix that)
        code = 2 * step + (~torch.isfinite(self.amax)).to(self.first_bad.dtype)
        self.first_bad = torch.where(~finite & (self.first_bad < 0), code, self.first_bad)
        self.bad = self.bad | ~finite
        quiet = (self.amax * scale < self.target / 2) & self.ready
        self.clean = torch.where(quiet, self.clean + 1, torch.zeros_like(self.clean))
        self.trace[step] = torch.where(self.started, -scale, scale)  # negative marks the init step

    def snapshot(self) -> object:
        return (self.scale_t.clone(), self.ready.clone(), self.clean.clone())

    def restore(self, snap: object) -> None:
        scale, ready, clean = cast(tuple[torch.Tensor, torch.Tensor, torch.Tensor], snap)
        self.scale_t = scale / 2  # redo the block with half the scale it started with
        self.ready, self.clean = ready, torch.zeros_like(clean)
        self.bad = torch.zeros_like(self.bad)
        self.first_bad = torch.full_like(self.first_bad, -1)

    def end_block(self, lo: int, hi: int) -> bool:
        self.blocks += 1
        self.host_syncs += 1
        if not bool(self.bad):
            self.retries = 0
            return True
        self.host_syncs += 1
        step, lam_bad = divmod(int(self.first_bad), 2)
        if lam_bad:
            raise NonFiniteGradientError(
                f"DynamicAdjointScaler: the adjoint entering step {step} of {self.n_steps} is already inf/NaN, so no "
                "scale can help: the gradient of the loss w.r.t. odeint's output is not finite (check the loss for "
                "inf/NaN, e.g. log(0)), or it overflowed y0's dtype. No gradient was written."
            )
        self.retries += 1
        if self.retries > self.max_retries:
            raise NonFiniteGradientError(
                f"DynamicAdjointScaler: the float16 backward still gives inf/NaN at step {step} of {self.n_steps} "
                f"after {self.max_retries} halvings of the adjoint scale. The vector field itself is probably "
                "non-finite there (check its inputs and weights), or float16 cannot represent it: use bfloat16. "
                "No gradient was written."
            )
        self.target = max(self.target / 2, MIN_TARGET)  # learned headroom: committed when the pass completes
        self.backoff_steps.append(step)
        return False

    def end(self, results: Sequence[torch.Tensor]) -> None:
        self.host_syncs += 1
        trace = self.trace.tolist()  # one transfer for the whole history of this pass
        self.scaler._commit(self, trace)


def _trace_events(index: int, trace: list[float], backoff_steps: Sequence[int]) -> list[ScaleEvent]:
    """The scale events of pass ``index`` read off its trace (``trace[step]``: the scale used at ``step``,
    negative at the init step), backoffs included, in the chronological order of the pass (step ``N-1`` first)."""
    events, previous = [], None
    for step in range(len(trace) - 1, -1, -1):
        value = abs(trace[step])
        if trace[step] < 0:
            events.append(ScaleEvent("init", index, step, value))
        elif previous is not None and value != previous:
            events.append(ScaleEvent("grow" if value > previous else "shrink", index, step, value))
        if trace[step] < 0 or previous is not None:
            previous = value
    events += [ScaleEvent("backoff", index, step, abs(trace[step])) for step in backoff_steps]
    return sorted(events, key=lambda e: -e.step)


def _check_keys(where: str, value: Any, expected: Sequence[str]) -> None:
    """``value`` must be a mapping with exactly the keys ``expected``."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{where} must be a dict (from DynamicAdjointScaler.state_dict()), got {type(value).__name__}")
    missing = [k for k in expected if k not in value]
    unexpected = [k for k in value if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match DynamicAdjointScaler.state_dict(): missing {missing}, unexpected {unexpected}"
        )


def _parse_state(state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate a state dict; returns ``(settings, learned)`` ready for ``_apply``."""
    where = "DynamicAdjointScaler.load_state_dict: "
    top = ("version", "settings", "learned_target", "counters", "host_syncs", "clean_passes", "history",
           "history_dropped", "last_scale")
    _check_keys(where + "state", state, top)
    if _require_int("version", state["version"], 1, where + "state: ") != STATE_VERSION:
        raise ValueError(f"{where}state['version'] is {state['version']}; this mpnode-scaler "
                         f"reads version {STATE_VERSION}")
    _check_keys(where + "state['settings']", state["settings"], tuple(SETTING_DEFAULTS))
    settings = _validated_settings(state["settings"], where + "state['settings']: ")
    _check_keys(where + "state['counters']", state["counters"], COUNTER_NAMES)
    counters = {k: _require_int(k, state["counters"][k], 0, where + "state['counters']: ") for k in COUNTER_NAMES}
    clean = _require_int("clean_passes", state["clean_passes"], 0, where + "state: ")
    if clean >= settings["recovery_interval"]:
        raise ValueError(f"{where}state['clean_passes'] = {clean} must be below recovery_interval = "
                         f"{settings['recovery_interval']}")
    history = state["history"]
    if not isinstance(history, (list, tuple)):
        raise TypeError(f"{where}state['history'] must be a list of events, got {type(history).__name__}")
    if len(history) > settings["history_size"]:
        raise ValueError(f"{where}state['history'] has {len(history)} events, more than history_size = "
                         f"{settings['history_size']}")
    learned = {
        "learned_target": _require_power_of_two("learned_target", state["learned_target"], MIN_TARGET,
                                                settings["target"], where + "state: "),
        "counters": counters,
        "host_syncs": _require_int("host_syncs", state["host_syncs"], 0, where + "state: "),
        "clean_passes": clean,
        "history": [_parse_event(e, i, where) for i, e in enumerate(history)],
        "history_dropped": _require_int("history_dropped", state["history_dropped"], 0, where + "state: "),
        "last_scale": _parse_last_scale(state["last_scale"], where),
    }
    return settings, learned


def _parse_event(event: Any, index: int, where: str) -> ScaleEvent:
    """One ``state['history']`` entry as a [`ScaleEvent`][mpnode.scaler.dynamic.ScaleEvent]."""
    at = f"{where}state['history'][{index}]"
    _check_keys(at, event, ("kind", "backward", "step", "scale"))
    if event["kind"] not in EVENT_KINDS:
        raise ValueError(f"{at}['kind'] must be one of {EVENT_KINDS}, got {event['kind']!r}")
    scale = event["scale"]
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{at}['scale'] must be a float, got {scale!r} ({type(scale).__name__})")
    return ScaleEvent(
        event["kind"],
        _require_int("backward", event["backward"], 0, at + ": "),
        _require_int("step", event["step"], 0, at + ": "),
        float(scale),
    )


def _parse_last_scale(value: Any, where: str) -> float | None:
    """``state['last_scale']``: ``None`` or a positive finite float."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        math.isfinite(value) and float(value) > 0
    ):
        raise ValueError(f"{where}state['last_scale'] must be None or a positive finite float, got {value!r}")
    return float(value)
