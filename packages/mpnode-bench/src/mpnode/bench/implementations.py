"""The solvers being compared: mpnode with each adjoint strategy and precision, torchdiffeq, torchode.

An [`Impl`][mpnode.bench.implementations.Impl] turns a problem [`Instance`][mpnode.bench.problems.Instance] and a
[`Discretization`][mpnode.bench.implementations.Discretization] into one forward+backward call: ``y_T`` from ``t = 0``
to ``1`` (fixed RK4 (3/8 rule) steps, or an adaptive method at ``rtol``/``atol``), ``loss(y_T)``, ``loss.backward()``,
all inside ``torch.autocast`` for a low precision.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from . import experiment
from .experiment import MPNODE_STRATEGIES, PRECISIONS, SOLVERS
from .problems import Instance

FIXED_METHODS = ("rk4",)
ADAPTIVE_METHODS = ("dopri5", "tsit5")
METHODS = FIXED_METHODS + ADAPTIVE_METHODS
"""Methods a benchmark case can use (mpnode's and torchdiffeq's names; ``rk4`` is the 3/8 rule)."""

STORES_CHECKPOINTS = ("mpnode", "mpnode-segmented", "mpnode-auto")
"""mpnode solvers whose strategy stores checkpoints (``checkpoint_dtype`` applies)."""


@dataclass(frozen=True)
class Discretization:
    """How ``t in [0, 1]`` is stepped.

    Attributes:
        method: ``"rk4"`` (fixed grid) or an adaptive method (``"dopri5"``, ``"tsit5"``).
        steps: fixed grid: the number of equal steps; adaptive: 0 (the solver chooses).
        rtol, atol: adaptive tolerances (``None`` for fixed grids).
    """

    method: str = "rk4"
    steps: int = 0
    rtol: float | None = None
    atol: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.adaptive:
            if self.rtol is None or self.atol is None or self.steps != 0:
                raise ValueError(f"adaptive method {self.method!r} needs rtol and atol and steps=0 "
                                 f"(got steps={self.steps}, rtol={self.rtol}, atol={self.atol})")
        elif self.steps < 1 or self.rtol is not None or self.atol is not None:
            raise ValueError(f"fixed-grid method {self.method!r} needs steps >= 1 and no tolerances "
                             f"(got steps={self.steps}, rtol={self.rtol}, atol={self.atol})")

    @property
    def adaptive(self) -> bool:
        return self.method in ADAPTIVE_METHODS

    def with_method(self, method: str | None) -> Discretization:
        """The same stepping with another method of the same kind (``None``: unchanged)."""
        if method is None or method == self.method:
            return self
        if (method in ADAPTIVE_METHODS) != self.adaptive:
            raise ValueError(f"method {method!r} cannot replace {self.method!r}: one is adaptive, the other not")
        return Discretization(method, self.steps, self.rtol, self.atol)

    def solve_kwargs(self) -> dict:
        """``method``, ``options`` and (adaptive) ``rtol``/``atol`` for an ``odeint``-like call."""
        if self.adaptive:
            return {"method": self.method, "rtol": self.rtol, "atol": self.atol, "options": {}}
        return {"method": self.method, "options": {"step_size": 1.0 / self.steps}}


class StepCount:
    """Accepted steps of the last measured solve, however the solver reports them."""

    def __init__(self) -> None:
        self.accepted: int | None = None


@dataclass(frozen=True)
class Impl:
    """One solver configuration.

    Attributes:
        solver: a name of [`SOLVERS`][mpnode.bench.experiment.SOLVERS]: ``"mpnode"``
            (recompute adjoint), ``"mpnode-direct"``, ``"mpnode-segmented"`` (default
            ``sqrt(N)`` checkpoints), ``"mpnode-auto"`` (needs ``budget``),
            ``"torchdiffeq"`` (direct backprop through the steps), ``"torchdiffeq-nocache"``
            (the same under autocast with the weight-cast cache off),
            ``"torchdiffeq-adjoint"`` (``odeint_adjoint``), ``"torchode"`` (``AutoDiffAdjoint``).
        precision: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (autocast dtype; the
            state ``y0`` is float32 in every case).
        checkpoint: mpnode strategies that store checkpoints: ``checkpoint_dtype`` name
            (e.g. ``"bfloat16"``), or ``None`` for the default (the autocast dtype, else float32).
        method: a method replacing the case's (same kind: fixed or adaptive), e.g.
            ``"tsit5"`` in a ``dopri5`` case; ``None`` runs the case's method.
        budget: ``mpnode-auto`` only: the byte budget of ``AutoAdjoint``.
    """

    solver: str
    precision: str = "float32"
    checkpoint: str | None = None
    method: str | None = None
    budget: int | None = None

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {SOLVERS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {list(PRECISIONS)}")
        if self.checkpoint is not None and (self.solver not in STORES_CHECKPOINTS or self.checkpoint not in PRECISIONS):
            raise ValueError(f"checkpoint applies to the mpnode solvers that store checkpoints {STORES_CHECKPOINTS} "
                             "only and must be a precision name")
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if (self.budget is not None) != (self.solver == "mpnode-auto"):
            raise ValueError("mpnode-auto needs budget (bytes), and only mpnode-auto takes one")
        if self.budget is not None and self.budget <= 0:
            raise ValueError(f"budget must be a positive number of bytes, got {self.budget}")

    @property
    def label(self) -> str:
        """``solver/precision`` then ``+ckpt-<dtype>``, ``+budget-<size>``, ``+<method>``, ``+scaler`` if they apply."""
        out = f"{self.solver}/{self.precision}"
        if self.checkpoint is not None:
            out += f"+ckpt-{self.checkpoint}"
        if self.budget is not None:
            out += f"+budget-{_size_text(self.budget)}"
        if self.method is not None:
            out += f"+{self.method}"
        if self.is_mpnode and self.precision == "float16":
            out += "+scaler"
        return out

    @property
    def is_mpnode(self) -> bool:
        return self.solver in MPNODE_STRATEGIES

    @property
    def is_low_precision(self) -> bool:
        return self.precision != "float32"

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        return experiment.autocast(self.precision, device, cache=self.solver != "torchdiffeq-nocache")

    def unavailable(self, inst: Instance | None = None, disc: Discretization | None = None) -> str | None:
        """Why this implementation cannot run here or on this problem and stepping, or ``None``."""
        reason = experiment.solver_unavailable(self.solver)
        if reason is not None or disc is None:
            return reason
        method = disc.with_method(self.method).method
        if self.solver.startswith("torchdiffeq") and method not in _torchdiffeq_methods(method):
            return f"unavailable: torchdiffeq has no method {method!r}"
        if self.solver == "torchode":
            return _torchode_unfit(inst, method)
        return None

    def strategy_options(self) -> dict:
        """Keyword arguments of the mpnode adjoint strategy (empty for the other solvers)."""
        options: dict = {}
        if self.checkpoint is not None:
            options["checkpoint_dtype"] = PRECISIONS[self.checkpoint] or torch.float32
        if self.budget is not None:
            options["budget_bytes"] = self.budget
        return options

    def forward_fn(self, inst: Instance, disc: Discretization, device: torch.device,
                   count: StepCount | None = None) -> Callable[[], torch.Tensor]:
        """A closure computing the loss (to be called inside this implementation's autocast).

        With ``count``, each call stores the solve's accepted steps in ``count.accepted``.
        """
        solve = experiment.solver(self.solver, **self.strategy_options())
        disc = disc.with_method(self.method)
        t = torch.tensor([0.0, 1.0], device=device)
        kwargs = disc.solve_kwargs()

        def forward() -> torch.Tensor:
            call = dict(kwargs, options=dict(kwargs["options"]))
            with self._counting_steps(inst, disc, call, count):
                out = solve(inst.func, inst.y0, t, **call)
            y_T = out[-1] if isinstance(out, torch.Tensor) else tuple(o[-1] for o in out)
            return inst.loss(y_T)

        return forward

    @contextlib.contextmanager
    def _counting_steps(self, inst: Instance, disc: Discretization, call: dict,
                        count: StepCount | None) -> Iterator[None]:
        """Arrange for the solve in ``call`` to report its accepted steps into ``count``."""
        if count is None:
            yield
            return
        if self.is_mpnode:
            from mpnode.core import SolverStats

            stats = call["options"]["stats"] = SolverStats()
            yield
            count.accepted = stats.steps
        elif self.solver == "torchode":
            found: dict = {}
            call["options"]["stats"] = found
            yield
            count.accepted = found["accepted_steps"]
        elif disc.adaptive:  # torchdiffeq calls callback_accept_step on its func after each accepted step
            accepted = [0]
            setattr(inst.func, "callback_accept_step", lambda t0, y0, dt: accepted.__setitem__(0, accepted[0] + 1))
            try:
                yield
            finally:
                del inst.func.callback_accept_step
            count.accepted = accepted[0]
        else:  # torchdiffeq's fixed grid: the steps are the grid's
            yield
            count.accepted = disc.steps

    def step_fn(self, inst: Instance, disc: Discretization, device: torch.device) -> Callable[[], torch.Tensor]:
        """A closure running forward and backward (gradients accumulate into ``inst.func``)."""
        forward = self.forward_fn(inst, disc, device)

        def step() -> torch.Tensor:
            with self.autocast(device):
                loss = forward()
                loss.backward()
            return loss

        return step


def _torchdiffeq_methods(method: str) -> Iterable[str]:
    """torchdiffeq's method names (its solver table is private: if it moves, every method is assumed present)."""
    try:
        from torchdiffeq._impl.odeint import SOLVERS as TORCHDIFFEQ_METHODS
    except ImportError:
        return (method,)
    return TORCHDIFFEQ_METHODS


def _torchode_unfit(inst: Instance | None, method: str) -> str | None:
    """Why torchode cannot run ``method`` on ``inst`` (every reason, joined), or ``None``."""
    from .peers import TORCHODE_METHODS

    reasons = []
    if method not in TORCHODE_METHODS:
        reasons.append(f"torchode has no method {method!r} (it runs {', '.join(TORCHODE_METHODS)})")
    if inst is not None and not inst.time_column:
        reasons.append("this field needs one scalar time for the whole batch, but torchode's adaptive steps give "
                       "each sample its own time")
    if inst is not None and (not isinstance(inst.y0, torch.Tensor) or inst.y0.ndim != 2):
        reasons.append("torchode needs a state of shape (batch, features); this problem's state is not one")
    return "unavailable: " + "; ".join(reasons) if reasons else None


_SIZE_UNITS = {"": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _size_text(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if n % _SIZE_UNITS[unit] == 0:
            return f"{n // _SIZE_UNITS[unit]}{unit}"
    return str(n)


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)(KiB|MiB|GiB)?", text)
    if m is None:
        raise ValueError(f"cannot parse the budget {text!r}; write bytes, e.g. 1048576 or 1MiB")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2) or ""]


def parse_impl(text: str) -> Impl:
    """``"mpnode/bfloat16"``, ``"torchdiffeq-adjoint/float32"``, ``"mpnode/float32+ckpt-bfloat16"``,
    ``"mpnode-auto/float32+budget-8MiB"``, ``"torchode/float32+tsit5"``: the inverse of
    [`Impl.label`][mpnode.bench.implementations.Impl.label]."""
    solver, _, rest = text.partition("/")
    precision, *extras = (rest or "float32").split("+")
    fields: dict = {}
    for extra in extras:
        if extra.startswith("ckpt-"):
            fields["checkpoint"] = extra[len("ckpt-"):]
        elif extra.startswith("budget-"):
            fields["budget"] = _parse_size(extra[len("budget-"):])
        elif extra in METHODS:
            fields["method"] = extra
        elif extra != "scaler":
            raise ValueError(f"cannot parse implementation {text!r}; write "
                             "solver/precision[+ckpt-<dtype>][+budget-<bytes>][+<method>]")
    return Impl(solver, precision, **fields)
