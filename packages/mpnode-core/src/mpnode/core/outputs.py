"""Output times: where each falls on the accepted grid, and how it is read off its step.

Every output strictly inside a step (and, for the cubic and dense rules, at its
end too) is ``o(t_j) = y_n + h_n Psi(x_j)`` with ``x_j = (t_j - tau_n) / h_n``
and ``Psi`` a combination of the step's stages; forward and backward evaluate the
same expression, so gradients w.r.t. ``y0``, the parameters, the grid and the
output times are those of what the forward returned.

Rules (torchdiffeq's meanings):

* `LinearInterpolation` (fixed grids, ``interp="linear"``): outputs on a
  node are that node's state; others ``y_n + x (y_{n+1} - y_n)``, i.e. ``Psi = x Phi``;
* [`CubicHermite`][mpnode.core.outputs.CubicHermite] (fixed grids, ``interp="cubic"``): every output in
  ``(tau_n, tau_{n+1}]`` is the cubic Hermite polynomial through ``y_n``,
  ``y_{n+1}``, ``f_n = k_1`` and ``f(tau_{n+1}, y_{n+1})`` (one extra evaluation
  per step that holds outputs);
* [`DenseOutput`][mpnode.core.outputs.DenseOutput] (adaptive methods): ``Psi = sum_i w_i(x) k_i`` with the
  tableau's dense-output weights.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch

from .rk import Stages, weighted_sum
from .tableau import ButcherTableau


class OutputRule(abc.ABC):
    """How an output time inside a step is computed from that step."""

    #: outputs that coincide with the end of a step are interpolated too (not read off the node).
    interpolates_nodes: bool = True
    #: the rule needs ``f(tau_{n+1}, y_{n+1})`` (one extra evaluation per step with outputs).
    needs_end_slope: bool = False

    @abc.abstractmethod
    def increment(
        self, x: float | torch.Tensor, stages: Stages, phi: torch.Tensor, end_slope: torch.Tensor | None
    ) -> torch.Tensor:
        """``Psi(x)`` such that the output is ``y_n + h Psi(x)``; ``x`` a host float or a 0-dim tensor."""


class LinearInterpolation(OutputRule):
    interpolates_nodes = False

    def increment(self, x, stages, phi, end_slope):
        return phi * (x.to(phi.dtype) if isinstance(x, torch.Tensor) else x)


class CubicHermite(OutputRule):
    """``Psi = h01(x) Phi + h10(x) k_1 + h11(x) f(tau_{n+1}, y_{n+1})`` (since ``h00 + h01 = 1``)."""

    needs_end_slope = True

    def increment(self, x, stages, phi, end_slope):
        if isinstance(x, torch.Tensor):
            x = x.to(phi.dtype)
        h01 = x * x * (3 - 2 * x)
        h10 = x * (1 - x) * (1 - x)
        h11 = x * x * (x - 1)
        assert end_slope is not None, "the march evaluates the end slope this rule needs"
        return phi * h01 + stages.ks[0] * h10 + end_slope * h11


class DenseOutput(OutputRule):
    """The tableau's continuous extension ``w_i(x)``."""

    def __init__(self, tableau: ButcherTableau) -> None:
        if tableau.dense is None:
            raise ValueError(f"method {tableau.name!r} has no dense output")
        self.tableau = tableau

    def increment(self, x, stages, phi, end_slope):
        if not isinstance(x, torch.Tensor):
            return weighted_sum(self.tableau.dense_weights(x), stages.ks)
        weights = self.tableau.dense_weights(x.to(phi.dtype))
        return sum((k * w for k, w in zip(stages.ks[1:], weights[1:])), stages.ks[0] * weights[0])


OUTPUT_RULES = {"linear": LinearInterpolation, "cubic": CubicHermite}


@dataclass
class OutputPlacement:
    """Where each output time of ``t`` is read off.

    Attributes:
        at_node: node index ``m`` -> outputs ``j`` equal to the state ``y_m``.
        in_step: step index ``n`` -> ``(j, x_j)`` of the outputs interpolated in that step.
    """

    at_node: dict[int, list[int]] = field(default_factory=dict)
    in_step: dict[int, list[tuple[int, float]]] = field(default_factory=dict)

    def add_node(self, m: int, j: int) -> None:
        self.at_node.setdefault(m, []).append(j)

    def add_interp(self, n: int, j: int, x: float) -> None:
        self.in_step.setdefault(n, []).append((j, x))


def place_on_grid(grid_host: torch.Tensor, t_host: torch.Tensor, rule: OutputRule) -> OutputPlacement:
    """Place every ``t[j]`` on a fixed grid (host copies of both, in ``t``'s dtype).

    ``t[0]`` is the initial state.  An output is placed in the first step whose
    end reaches it; with `LinearInterpolation` an output equal to a node is
    that node.  ``x_j`` is computed in the grid's dtype as torchdiffeq does.
    """
    g, ts = grid_host.tolist(), t_host.tolist()
    sign = 1.0 if g[-1] >= g[0] else -1.0
    placement = OutputPlacement()
    placement.add_node(0, 0)
    j = 1
    for n in range(len(g) - 1):
        while j < len(ts) and sign * g[n + 1] >= sign * ts[j]:
            if not rule.interpolates_nodes and ts[j] == g[n + 1]:
                placement.add_node(n + 1, j)
            elif not rule.interpolates_nodes and ts[j] == g[n]:
                placement.add_node(n, j)
            else:
                x = (t_host[j] - grid_host[n]) / (grid_host[n + 1] - grid_host[n])
                placement.add_interp(n, j, float(x))
            j += 1
    return placement
