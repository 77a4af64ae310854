"""Explicit Runge–Kutta methods as data: the Butcher tableau and its checks.

A method is fully described by its coefficients: the matrix ``a``, the weights
``b``, the nodes ``c`` and its order; an adaptive method adds error weights
``b_err = b - b_hat`` of an embedded pair and, for output between steps, the
weights of a dense output.  The one generic engine in [`mpnode.core.rk`][mpnode.core.rk]
runs any of them; the named methods live in [`mpnode.core.methods`][mpnode.core.methods].

Construction validates everything it can: structure (explicit, consistent
``c``), finiteness, and the classical order conditions of the method, of its
embedded pair and of its dense output (Butcher's rooted-tree conditions; for the
dense output as polynomial identities in ``x``, so at the midpoint too), so a user
tableau can be passed as ``method=`` safely.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:  # the tableau is plain data; dense_weights also accepts a tensor x
    import torch

Number = int | float | str | Fraction
Tree = tuple  # a rooted tree: the sorted tuple of its children's trees

_STRUCTURE_TOL = 1e-12
#: Largest allowed defect of an order condition ``b . Phi(tree) - 1/gamma(tree)``.
ORDER_TOL = 1e-9


def _as_float(x: Number, name: str, where: str) -> float:
    """One coefficient as a float; strings are exact fractions such as ``"1/3"``."""
    if isinstance(x, bool):
        raise TypeError(f"ButcherTableau {name!r}: {where} is a bool ({x}); coefficients are "
                        "numbers such as 0.5 or '1/2'")
    try:
        value = float(Fraction(x)) if isinstance(x, str) else float(x)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ValueError(
            f"ButcherTableau {name!r}: {where} = {x!r} is not a number; write coefficients as numbers or "
            "fraction strings like '1/3'"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"ButcherTableau {name!r}: {where} = {value} is not finite")
    return value


def _as_order(value: object, name: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ButcherTableau {name!r}: {what} must be a positive integer, got {value!r}")
    return value


# -- rooted trees and the order conditions -------------------------------------------------------


@cache
def _tree_size(tree: Tree) -> int:
    return 1 + sum(_tree_size(child) for child in tree)


@cache
def rooted_trees(n: int) -> tuple[Tree, ...]:
    """All rooted trees with ``n`` nodes (1, 1, 2, 4, 9, 20, 48, 115, ... of them)."""
    if n == 1:
        return ((),)
    found = {tuple(sorted(children, key=_tree_key)) for children in _forests(n - 1, None)}
    return tuple(sorted(found, key=_tree_key))


def _tree_key(tree: Tree) -> tuple:
    return (_tree_size(tree), repr(tree))


def _forests(total: int, largest: tuple | None):
    """Multisets of trees with ``total`` nodes, generated in non-increasing order to avoid repeats."""
    if total == 0:
        yield ()
        return
    for size in range(1, total + 1):
        for tree in rooted_trees(size):
            key = _tree_key(tree)
            if largest is not None and key > largest:
                continue
            for rest in _forests(total - size, key):
                yield (tree, *rest)


@cache
def _density(tree: Tree) -> int:
    """Butcher's gamma: the tree's size times its children's densities."""
    return _tree_size(tree) * math.prod(_density(child) for child in tree)


def _elementary_weights(a: Sequence[Sequence[float]]):
    """``tree -> [Phi_i(tree)]``: the stages' elementary weights (``Phi_i(leaf) = 1``,
    ``Phi_i([t_1..t_m]) = prod_k sum_j a_ij Phi_j(t_k)``), memoised per tree."""
    s = len(a)
    cache: dict[Tree, list[float]] = {}

    def stage_weights(tree: Tree) -> list[float]:
        if tree not in cache:
            phi = [1.0] * s
            for child in tree:
                inner = stage_weights(child)
                phi = [p * sum(a[i][j] * inner[j] for j in range(s)) for i, p in enumerate(phi)]
            cache[tree] = phi
        return cache[tree]

    return stage_weights


def order_defect(a: Sequence[Sequence[float]], weights: Sequence[float], order: int) -> float:
    """Largest ``|sum_i w_i Phi_i(tree) - 1/gamma(tree)|`` over rooted trees with at most ``order`` nodes.

    ``Phi_i`` are the elementary weights of the stages.  Zero (up to roundoff)
    exactly when the weights give a method of that classical order.
    """
    stage_weights = _elementary_weights(a)
    worst = 0.0
    for n in range(1, order + 1):
        for tree in rooted_trees(n):
            value = sum(w * p for w, p in zip(weights, stage_weights(tree)))
            worst = max(worst, abs(value - 1.0 / _density(tree)))
    return worst


def dense_order_defect(a: Sequence[Sequence[float]], dense: Sequence[Sequence[float]], order: int) -> float:
    """Largest defect of the dense output's order conditions ``sum_i w_i(x) Phi_i(tree) = x^|tree| / gamma(tree)``
    for every ``x`` and every rooted tree with at most ``order`` nodes.

    ``dense`` holds the ``s`` rows of the coefficients of ``x, x^2, ...``; both sides
    are polynomials in ``x``, compared coefficient by coefficient, so a zero defect
    means the interpolant has that order everywhere in the step (at the midpoint
    ``x = 1/2`` in particular).
    """
    stage_weights = _elementary_weights(a)
    degree = max(len(row) for row in dense)
    worst = 0.0
    for n in range(1, order + 1):
        for tree in rooted_trees(n):
            phi = stage_weights(tree)
            for m in range(max(degree, n)):  # the coefficient of x^(m+1)
                value = sum(row[m] * p for row, p in zip(dense, phi) if m < len(row))
                worst = max(worst, abs(value - (1.0 / _density(tree) if m + 1 == n else 0.0)))
    return worst


# -- dense output --------------------------------------------------------------------------------


def dense_from_midpoint(b: Sequence[float], c_mid: Sequence[float]) -> tuple[tuple[float, ...], ...]:
    """Stage weights of the quartic dense output fitted to ``y0, y1, y_mid, f0, f1`` (torchdiffeq's rule).

    The interpolant through ``y(x=0) = y0``, ``y(1) = y1``, ``y(1/2) = y_mid``,
    ``y'(0) = h f0`` and ``y'(1) = h f1``, with ``y1 = y0 + h sum b_i k_i``,
    ``y_mid = y0 + h sum c_mid_i k_i``, ``f0 = k_first`` and ``f1 = k_last``, is
    ``y(x) = y0 + h sum_i w_i(x) k_i``.  Returns ``w`` as ``s`` rows of the
    coefficients of ``x, x^2, x^3, x^4``.
    """
    s = len(b)
    rows = []
    for i in range(s):
        first, last = float(i == 0), float(i == s - 1)
        rows.append(
            (
                first,
                last - 4 * first - 5 * b[i] + 16 * c_mid[i],
                5 * first - 3 * last + 14 * b[i] - 32 * c_mid[i],
                2 * last - 2 * first - 8 * b[i] + 16 * c_mid[i],
            )
        )
    return tuple(rows)


def polynomial_product(*factors: Sequence[float]) -> tuple[float, ...]:
    """Coefficients (ascending powers, constant first) of the product of polynomials given the same way."""
    result = [1.0]
    for factor in factors:
        out = [0.0] * (len(result) + len(factor) - 1)
        for i, p in enumerate(result):
            for j, q in enumerate(factor):
                out[i + j] += p * q
        result = out
    return tuple(result)


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method, optionally with an embedded pair and dense output.

    Attributes:
        name: a label used in messages and statistics.
        a: the ``s x s`` coefficient matrix as a tuple of rows, strictly
            lower-triangular (explicit method).
        b: the ``s`` weights of the stages in the step ``y1 = y0 + h sum b_i k_i``.
        c: the ``s`` stage nodes, ``c_i = sum_j a_ij``.
        order: the classical order of ``b`` (checked against the order conditions).
        b_err: error weights ``b - b_hat`` of the embedded method, or ``None`` for a
            fixed-grid method; the local error estimate is ``h sum b_err_i k_i``.
        embedded_order: the classical order of ``b_hat`` (checked likewise).
        dense: dense-output weights, ``s`` rows of the coefficients of ``x, x^2, ...`` so that ``y(t0 + x h) = y0 + h
            sum_i w_i(x) k_i``; ``None`` when the method has none.  Given directly, or built from ``c_mid`` (the weights
            of ``y(t0 + h/2)``, see [`dense_from_midpoint`][mpnode.core.tableau.dense_from_midpoint]).
        dense_order: the order of the dense output (checked against its order
            conditions at every ``x``; at least 1, i.e. ``sum_i w_i(x) = x``, which
            for ``c_mid`` means ``sum c_mid = 1/2``), or ``None`` without one.
        reuse_last_stage: adaptive stepping takes the last stage of an accepted
            step as the first stage of the next one (torchdiffeq's rule for its
            adaptive methods).  When the last stage is evaluated at the step's end
            point (``a_last = b``, ``c_last = 1``: first-same-as-last) this saves
            one evaluation per step; otherwise it changes the method, and the
            first stage is carried from step to step.

    Construction validates the structure, finiteness and the declared orders and
    raises ``ValueError`` naming the offending entry.
    """

    name: str
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    order: int
    b_err: tuple[float, ...] | None
    embedded_order: int | None
    dense: tuple[tuple[float, ...], ...] | None
    reuse_last_stage: bool
    dense_order: int | None

    def __init__(
        self,
        name: str,
        a: Sequence[Sequence[Number]],
        b: Sequence[Number],
        c: Sequence[Number] | None = None,
        order: int = 1,
        *,
        b_hat: Sequence[Number] | None = None,
        b_err: Sequence[Number] | None = None,
        embedded_order: int | None = None,
        c_mid: Sequence[Number] | None = None,
        dense: Sequence[Sequence[Number]] | None = None,
        reuse_last_stage: bool = False,
        dense_order: int | None = None,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"ButcherTableau name must be a string, got {type(name).__name__}")
        s = len(b)
        if s == 0:
            raise ValueError(f"ButcherTableau {name!r}: b must have at least one weight")
        rows = _lower_triangular(name, a, s)
        bt = _weights(name, "b", b, s)
        if abs(sum(bt) - 1.0) > _STRUCTURE_TOL:
            raise ValueError(f"ButcherTableau {name!r}: the weights b sum to {sum(bt)!r}, not 1 (the "
                             "method would be inconsistent)")
        ct = _nodes(name, a, rows, c, s)
        order = _as_order(order, name, "order")
        err = _error_weights(name, b, b_hat, b_err, s)
        if (err is None) != (embedded_order is None):
            raise ValueError(
                f"ButcherTableau {name!r}: pass embedded_order together with b_hat or b_err (an "
                "embedded pair needs both)"
            )
        if embedded_order is not None:
            embedded_order = _as_order(embedded_order, name, "embedded_order")
        dense_rows = _dense_weights(name, bt, c_mid, dense, s)
        if dense_rows is None and dense_order is not None:
            raise ValueError(f"ButcherTableau {name!r}: dense_order is given but there is no "
                             "dense output (c_mid or dense)")
        if dense_rows is not None:
            dense_order = 1 if dense_order is None else _as_order(dense_order, name, "dense_order")
        if not isinstance(reuse_last_stage, bool):
            raise TypeError(
                f"ButcherTableau {name!r}: reuse_last_stage must be True or False, got {reuse_last_stage!r}")
        for field, value in (
            ("name", name), ("a", rows), ("b", bt), ("c", ct), ("order", order), ("b_err", err),
            ("embedded_order", embedded_order), ("dense", dense_rows), ("reuse_last_stage", reuse_last_stage),
            ("dense_order", dense_order),
        ):
            object.__setattr__(self, field, value)
        self._check_orders()
        self._check_dense(None if c_mid is None else _weights(name, "c_mid", c_mid, s))

    def _check_dense(self, c_mid: tuple[float, ...] | None) -> None:
        """The dense output (every coefficient the interpolated outputs use) must satisfy its order conditions."""
        if self.dense is None:
            return
        if c_mid is not None and abs(sum(c_mid) - 0.5) > _STRUCTURE_TOL:
            raise ValueError(
                f"ButcherTableau {self.name!r}: c_mid sums to {sum(c_mid)!r}, not 1/2: y0 + h sum c_mid_i k_i must be "
                f"the solution at the midpoint t0 + h/2 (order 1 there), and every interpolated output would be off; "
                f"check c_mid (it holds the weights of the stages for the midpoint, not for the step end)"
            )
        assert self.dense_order is not None, "construction sets the order of a dense output"
        defect = dense_order_defect(self.a, self.dense, self.dense_order)
        if defect > ORDER_TOL:
            source = "c_mid" if c_mid is not None else "dense"
            raise ValueError(
                f"ButcherTableau {self.name!r}: the dense output (from {source}) does not satisfy the order-"
                f"{self.dense_order} conditions (largest defect {defect:.3g}), so interpolated outputs would be off; "
                f"check {source}, or declare the dense_order the interpolant has"
            )

    def _check_orders(self) -> None:
        defect = order_defect(self.a, self.b, self.order)
        if defect > ORDER_TOL:
            raise ValueError(
                f"ButcherTableau {self.name!r}: b does not satisfy the order-{self.order} conditions "
                f"(largest defect {defect:.3g}); check the coefficients or declare the order the method has"
            )
        if self.b_err is not None:
            b_hat = [bi - ei for bi, ei in zip(self.b, self.b_err)]
            assert self.embedded_order is not None, "construction sets the order of an embedded pair"
            defect = order_defect(self.a, b_hat, self.embedded_order)
            if defect > ORDER_TOL:
                raise ValueError(
                    f"ButcherTableau {self.name!r}: the embedded weights b - b_err do not satisfy the order-"
                    f"{self.embedded_order} conditions (largest defect {defect:.3g}); check "
                    "b_err/b_hat or embedded_order"
                )

    @property
    def stages(self) -> int:
        """Number of stages ``s`` (vector-field evaluations per step, before any reuse)."""
        return len(self.b)

    @property
    def is_adaptive(self) -> bool:
        """Whether the method carries an error estimate (an embedded pair)."""
        return self.b_err is not None

    @property
    def is_fsal(self) -> bool:
        """First-same-as-last: the last stage is ``f(t1, y1)``, so it can start the next step exactly."""
        return self.c[-1] == 1.0 and self.b[-1] == 0.0 and self.a[-1][:-1] == self.b[:-1]

    @property
    def carries_first_stage(self) -> bool:
        """The first stage of a step is inherited from the previous step and is not ``f(t0, y0)``."""
        return self.reuse_last_stage and not self.is_fsal

    def fixed_grid(self) -> ButcherTableau:
        """This method without its error estimate: a fixed-grid method, on which ``step_size`` and
        ``grid_constructor`` act (an adaptive method ignores them, as torchdiffeq does).

        ``odeint(f, y0, t, method=get_tableau("dopri5").fixed_grid(), options={"step_size": h})`` takes
        dopri5's fifth-order steps on a fixed grid.  Returns ``self`` for a fixed-grid method.
        """
        if not self.is_adaptive:
            return self
        return dataclasses.replace(self, name=f"{self.name}-fixed", b_err=None, embedded_order=None)

    @overload
    def dense_weights(self, x: float) -> tuple[float, ...]: ...

    @overload
    def dense_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def dense_weights(self, x: float | torch.Tensor) -> tuple[float, ...] | tuple[torch.Tensor, ...]:
        """``w_i(x)`` of the dense output at ``x in [0, 1]``: ``y(t0 + x h) = y0 + h sum_i w_i(x) k_i``.

        ``x`` a host float (floats returned) or a 0-dim tensor (0-dim tensors, differentiable in ``x``).
        """
        if self.dense is None:
            raise ValueError(f"method {self.name!r} has no dense output")
        return tuple(_power_series(row, x) for row in self.dense)


def _power_series(coefs: Sequence[float], x: Any) -> Any:
    """``sum_m coefs[m] x^(m+1)`` for a host float or a 0-dim tensor ``x`` (the same type comes back)."""
    total: Any = 0
    for m, coef in enumerate(coefs):
        total = total + coef * x ** (m + 1)
    return total


def _lower_triangular(name: str, a: Sequence[Sequence[Number]], s: int) -> tuple[tuple[float, ...], ...]:
    if len(a) != s:
        raise ValueError(f"ButcherTableau {name!r}: a has {len(a)} rows but b has {s} stages")
    rows = []
    for i, row in enumerate(a):
        values = tuple(_as_float(x, name, f"a[{i}][{j}]") for j, x in enumerate(row))
        if len(values) > s:
            raise ValueError(f"ButcherTableau {name!r}: row {i} of a has {len(values)} entries, more than {s} stages")
        values = values + (0.0,) * (s - len(values))
        for j in range(i, s):
            if values[j] != 0.0:
                raise ValueError(
                    f"ButcherTableau {name!r}: a[{i}][{j}] = {values[j]} is on or above the diagonal; "
                    "only explicit (strictly lower-triangular) methods are supported"
                )
        rows.append(values)
    return tuple(rows)


def _weights(name: str, label: str, values: Sequence[Number], s: int) -> tuple[float, ...]:
    if len(values) != s:
        raise ValueError(f"ButcherTableau {name!r}: {label} has {len(values)} entries but the method has {s} stages")
    return tuple(_as_float(x, name, f"{label}[{i}]") for i, x in enumerate(values))


def _nodes(name: str, a: Sequence[Sequence[Number]], rows, c: Sequence[Number] | None, s: int) -> tuple[float, ...]:
    sums = tuple(float(sum((Fraction(x) for x in raw), Fraction(0))) for raw in a)  # exact row sums, rounded once
    if c is None:
        return sums
    if len(c) != s:
        raise ValueError(f"ButcherTableau {name!r}: c has {len(c)} nodes but b has {s} stages")
    ct = tuple(_as_float(x, name, f"c[{i}]") for i, x in enumerate(c))
    for i, (ci, si) in enumerate(zip(ct, sums)):
        if abs(ci - si) > _STRUCTURE_TOL:
            raise ValueError(f"ButcherTableau {name!r}: c[{i}] = {ci} differs from the row sum of a[{i}] = {si}")
    return ct


def _exact(x: Number, name: str, where: str) -> Fraction:
    _as_float(x, name, where)  # validates
    return Fraction(x)


def _error_weights(name: str, b: Sequence[Number], b_hat, b_err, s: int) -> tuple[float, ...] | None:
    """``b - b_hat`` computed exactly from the given coefficients and rounded once."""
    if b_hat is not None and b_err is not None:
        raise ValueError(f"ButcherTableau {name!r}: pass b_hat or b_err, not both (b_err = b - b_hat)")
    if b_hat is not None:
        _weights(name, "b_hat", b_hat, s)
        return tuple(
            float(_exact(bi, name, f"b[{i}]") - _exact(hi, name, f"b_hat[{i}]"))
            for i, (bi, hi) in enumerate(zip(b, b_hat))
        )
    if b_err is None:
        return None
    err = _weights(name, "b_err", b_err, s)
    if abs(sum(err)) > _STRUCTURE_TOL:
        raise ValueError(f"ButcherTableau {name!r}: the error weights b_err sum to {sum(err)!r}, "
                         "not 0 (b_hat must sum to 1)")
    return err


def _dense_weights(name: str, b: tuple[float, ...], c_mid, dense, s: int):
    if c_mid is not None and dense is not None:
        raise ValueError(f"ButcherTableau {name!r}: pass c_mid or dense, not both")
    if c_mid is not None:
        return dense_from_midpoint(b, _weights(name, "c_mid", c_mid, s))
    if dense is None:
        return None
    if len(dense) != s:
        raise ValueError(f"ButcherTableau {name!r}: dense has {len(dense)} rows but the method has {s} stages")
    rows = tuple(tuple(_as_float(x, name, f"dense[{i}][{m}]") for m, x in enumerate(row))
                 for i, row in enumerate(dense))
    at_one = [sum(row) for row in rows]
    if any(abs(w - bi) > 1e-9 for w, bi in zip(at_one, b)):
        raise ValueError(f"ButcherTableau {name!r}: the dense output at x = 1 must equal the step (w_i(1) = b_i)")
    return rows
