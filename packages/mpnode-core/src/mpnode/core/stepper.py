"""One generic explicit Runge–Kutta step over tableau data."""

from __future__ import annotations

from typing import Callable

import torch

from .tableau import ButcherTableau

VectorField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def rk_increment(
    tableau: ButcherTableau, f: VectorField, t0: torch.Tensor, t1: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """The increment ``Phi = sum_i b_i k_i`` of one step from ``(t0, y)`` to ``t1``.

    The step is ``y1 = y + (t1 - t0) * Phi``.  Stage inputs
    ``Y_i = y + h sum_j a_ij k_j`` and the sum are formed in ``y``'s dtype
    (``f`` returns its evaluation already cast to it); only ``f`` itself runs
    in whatever precision autocast selects.  Stage times are ``t0 + c_i h``,
    using ``t1`` itself where ``c_i = 1``.  Differentiable in ``t0``, ``t1``,
    ``y`` and whatever ``f`` closes over.
    """
    h = t1 - t0
    ks: list[torch.Tensor] = []
    for a_i, c_i in zip(tableau.a, tableau.c):
        acc = None
        for a_ij, k_j in zip(a_i, ks):
            if a_ij != 0.0:
                acc = k_j * a_ij if acc is None else acc.add(k_j, alpha=a_ij)
        y_i = y if acc is None else y + h * acc
        t_i = t0 if c_i == 0.0 else (t1 if c_i == 1.0 else t0 + h * c_i)
        ks.append(f(t_i, y_i))
    phi = None
    for b_i, k_i in zip(tableau.b, ks):
        if b_i != 0.0:
            phi = k_i * b_i if phi is None else phi.add(k_i, alpha=b_i)
    return phi
