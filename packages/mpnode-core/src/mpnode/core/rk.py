"""One generic explicit Runge–Kutta step over tableau data.

The stages of a step from ``(t0, y)`` with step ``h`` are
``Y_i = y + h sum_{j<i} a_ij k_j`` and ``k_i = f(t_i, Y_i)``.  Stage inputs and
every weighted sum of stages are formed in ``y``'s dtype (``f`` returns its
evaluation already cast to it); only ``f`` runs in whatever precision autocast
selects.

Stage inputs are always formed by one arithmetic path (``_stage_input``):
``h`` is a host float and each term is one fused ``add`` with ``alpha = h a_ij``.
When gradients w.r.t. the times are needed, ``h`` is also given as a 0-dim tensor
``h_traced`` (``t1 - t0`` of leaf nodes) and a term ``(h_traced - h_traced.detach())
sum_j a_ij k_j`` is added: exactly zero in value, ``sum_j a_ij k_j`` in gradient.  So
a step whose times are traced (``t`` requires grad, the direct strategy's kept
graphs) computes bitwise the values of the graph-free march and chooses the same
steps.

Stage times come precomputed ([`stage_time_table`][mpnode.core.rk.stage_time_table] for a whole grid, or
[`traced_stage_times`][mpnode.core.rk.traced_stage_times] for one differentiable step), with optional
perturbation to the neighbouring float (torchdiffeq's ``perturb``): a field that
jumps at a grid time is evaluated on the side of the step it belongs to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .contracts import Nudge
from .tableau import ButcherTableau

VectorField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StagePerturbation:
    """Which stage times are nudged to the neighbouring float (in the state dtype).

    Attributes:
        first: perturbation of the first stage (``c = 0``): ``Nudge.NEXT`` keeps it after ``t0``.
        end: perturbation of the stages at ``c = 1`` (except the first): ``Nudge.PREV`` keeps them before ``t1``.
        direction: +1 for increasing time, -1 for decreasing (``Nudge.NEXT`` moves with it).
    """

    first: Nudge = Nudge.NONE
    end: Nudge = Nudge.NONE
    direction: int = 1

    def for_stage(self, i: int, c_i: float) -> Nudge:
        if i == 0:
            return self.first
        return self.end if c_i == 1.0 else Nudge.NONE


def _nudge(t: torch.Tensor, how: Nudge, direction: int) -> torch.Tensor:
    """``t`` moved to the neighbouring float (``how * direction`` gives the way); gradient passes straight through."""
    if how == Nudge.NONE:
        return t
    target = torch.full_like(t, float("inf") * how * direction)
    moved = torch.nextafter(t.detach(), target)
    return moved if not t.requires_grad else t + (moved - t.detach())


def stage_time_table(
    tableau: ButcherTableau,
    grid: torch.Tensor,
    dtype: torch.dtype,
    perturbation: StagePerturbation | Sequence[StagePerturbation] = StagePerturbation(),
) -> list[tuple[torch.Tensor, ...]]:
    """Stage times ``tau_n + c_i h_n`` of every step of ``grid`` in ``dtype``: one tuple of ``s`` 0-dim tensors per
    step.

    Computed in ``grid``'s dtype, then cast (``c_i = 1`` uses ``tau_{n+1}``
    itself), then perturbed; ``perturbation`` is one rule for all steps or one per
    step.  A few vector ops per solve instead of scalar ops per stage.
    """
    grid = grid.detach()
    t0, t1 = grid[:-1], grid[1:]
    h = t1 - t0
    cols = [t0 if c == 0.0 else (t1 if c == 1.0 else t0 + h * c) for c in tableau.c]
    table = torch.stack(cols, dim=1).to(dtype)
    rules = [perturbation] if isinstance(perturbation, StagePerturbation) else list(perturbation)
    for rule in set(rules):
        rows = slice(None) if len(rules) == 1 else torch.tensor([n for n, r in enumerate(rules) if r == rule])
        for i, c in enumerate(tableau.c):
            how = rule.for_stage(i, c)
            if how != Nudge.NONE:
                table[rows, i] = _nudge(table[rows, i], how, rule.direction)
    return [row.unbind() for row in table]


def traced_stage_times(
    tableau: ButcherTableau,
    t0: torch.Tensor,
    t1: torch.Tensor,
    dtype: torch.dtype,
    perturbation: StagePerturbation = StagePerturbation(),
) -> list[torch.Tensor]:
    """The stage times of one step as differentiable functions of ``t0`` and ``t1`` (same values as the table)."""
    h = t1 - t0
    times = []
    for i, c in enumerate(tableau.c):
        t_i = t0 if c == 0.0 else (t1 if c == 1.0 else t0 + h * c)
        times.append(_nudge(t_i.to(dtype), perturbation.for_stage(i, c), perturbation.direction))
    return times


def first_stage_time(t0: torch.Tensor, dtype: torch.dtype, perturbation: StagePerturbation) -> torch.Tensor:
    """The first stage's time of a step from node ``t0`` (0-dim, grid dtype): cast to ``dtype``, then perturbed
    (the value of the stage-time table's first column; differentiable when ``t0`` is)."""
    return _nudge(t0.to(dtype), perturbation.first, perturbation.direction)


@dataclass
class Stages:
    """The stages of one step: ``ks`` (``s`` tensors in the state dtype) and the last stage's input ``Y_s``."""

    ks: list[torch.Tensor]
    last_input: torch.Tensor


def rk_stages(
    tableau: ButcherTableau,
    f: VectorField,
    y: torch.Tensor,
    h: float,
    stage_times: Sequence[torch.Tensor],
    first_stage: torch.Tensor | None = None,
    h_traced: torch.Tensor | None = None,
) -> Stages:
    """Evaluate the ``s`` stages of a step from ``y`` with step ``h`` at ``stage_times``.

    ``first_stage``, when given, is used as ``k_1`` instead of evaluating
    ``f(t_1, y)`` (a reused or carried first stage).  ``h`` is a host float;
    ``h_traced`` (optional) the same step as a 0-dim tensor that autograd
    differentiates (values unchanged, see the module docstring).
    """
    ks: list[torch.Tensor] = []
    y_i = y
    for i, a_i in enumerate(tableau.a):
        y_i = _stage_input(y, [(a_ij, k_j) for a_ij, k_j in zip(a_i, ks) if a_ij != 0.0], h, h_traced)
        if i == 0 and first_stage is not None:
            ks.append(first_stage)
        else:
            ks.append(f(stage_times[i], y_i))
    return Stages(ks, y_i)


def _stage_input(y: torch.Tensor, terms: list[tuple[float, torch.Tensor]], h: float,
                 h_traced: torch.Tensor | None) -> torch.Tensor:
    """``y + sum (h a_ij) k_j``, one fused ``add`` per term (plus the zero-valued traced term)."""
    out = y
    for a_ij, k_j in terms:
        out = torch.add(out, k_j, alpha=h * a_ij)
    if h_traced is None or not terms:
        return out
    return with_traced_step(out, h_traced, weighted_sum([a for a, _ in terms], [k for _, k in terms]))


def with_traced_step(value: torch.Tensor, h_traced: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``value + (h_traced - h_traced.detach()) * direction``: ``value`` exactly, with gradient ``direction``
    w.r.t. ``h_traced``.

    ``value`` was computed with the host float of ``h_traced`` (one arithmetic path
    for every strategy); this attaches the dependence on the traced step.
    """
    return value + (h_traced - h_traced.detach()).to(value.dtype) * direction


def weighted_sum(weights: Sequence[float], ks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i w_i k_i`` over the non-zero weights (a zero tensor shaped like ``ks[0]`` if all are zero)."""
    out = None
    for w, k in zip(weights, ks):
        if w != 0.0:
            out = k * w if out is None else out.add(k, alpha=w)
    return torch.zeros_like(ks[0]) if out is None else out


def step_end(
    tableau: ButcherTableau, y: torch.Tensor, h: float, stages: Stages, phi: torch.Tensor | None = None
) -> torch.Tensor:
    """``y1 = y + h sum b_i k_i`` (``phi`` that sum when already formed); for first-same-as-last methods the last
    stage's input, exactly.

    Taking ``Y_s`` itself makes ``f(t1, y1)`` of the next step bitwise equal to
    this step's last stage, so the stage can be reused (and recomputed in backward).
    """
    if tableau.is_fsal:
        return stages.last_input
    return torch.add(y, weighted_sum(tableau.b, stages.ks) if phi is None else phi, alpha=h)
