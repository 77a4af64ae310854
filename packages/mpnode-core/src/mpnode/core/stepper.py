"""One generic explicit Runge–Kutta step over tableau data."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .tableau import ButcherTableau

VectorField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def rk_increment(
    tableau: ButcherTableau,
    f: VectorField,
    t0: torch.Tensor,
    t1: torch.Tensor,
    y: torch.Tensor,
    h: float | None = None,
    stage_times: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The increment ``Phi = sum_i b_i k_i`` of one step from ``(t0, y)`` to ``t1``.

    The step is ``y1 = y + (t1 - t0) * Phi``.  Stage inputs
    ``Y_i = y + h sum_j a_ij k_j`` and the sum are formed in ``y``'s dtype
    (``f`` returns its evaluation already cast to it); only ``f`` itself runs
    in whatever precision autocast selects.  Stage times are ``t0 + c_i h``,
    using ``t1`` itself where ``c_i = 1``.  Differentiable in ``t0``, ``t1``,
    ``y`` and whatever ``f`` closes over.

    When no gradient w.r.t. the times is needed, pass the step as a host float
    ``h`` and the precomputed ``stage_times`` (a row of :func:`stage_time_table`):
    the stage sums are then fused into one ``add`` per coefficient.
    """
    fused = h is not None
    if not fused:
        h_t = t1 - t0
    ks: list[torch.Tensor] = []
    for i, (a_i, c_i) in enumerate(zip(tableau.a, tableau.c)):
        terms = [(a_ij, k_j) for a_ij, k_j in zip(a_i, ks) if a_ij != 0.0]
        if not terms:
            y_i = y
        elif fused:
            y_i = y
            for a_ij, k_j in terms:
                y_i = torch.add(y_i, k_j, alpha=h * a_ij)
        else:
            acc = terms[0][1] * terms[0][0]
            for a_ij, k_j in terms[1:]:
                acc = acc.add(k_j, alpha=a_ij)
            y_i = y + h_t * acc
        if stage_times is not None:
            t_i = stage_times[i]
        else:
            t_i = t0 if c_i == 0.0 else (t1 if c_i == 1.0 else t0 + h_t * c_i)
        ks.append(f(t_i, y_i))
    phi = None
    for b_i, k_i in zip(tableau.b, ks):
        if b_i != 0.0:
            phi = k_i * b_i if phi is None else phi.add(k_i, alpha=b_i)
    return phi


def stage_time_table(tableau: ButcherTableau, grid: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """Stage times ``tau_n + c_i h_n`` of every step, in ``dtype``: one tuple of ``s`` 0-dim tensors per step.

    Computed once per solve (a few vector ops) instead of two scalar ops per stage.
    """
    grid = grid.detach()
    t0, t1 = grid[:-1], grid[1:]
    h = t1 - t0
    cols = [t0 if c == 0.0 else (t1 if c == 1.0 else t0 + h * c) for c in tableau.c]
    return [row.unbind() for row in torch.stack(cols, dim=1).to(dtype)]
