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
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from typing import Any, SupportsFloat, overload

import torch

Number = int | float | str | Fraction | SupportsFloat  # a numpy scalar or a one-element tensor too
Tree = tuple  # a rooted tree: the sorted tuple of its children's trees

_STRUCTURE_TOL = 1e-12
#: Largest allowed defect of an order condition ``b . Phi(tree) - 1/gamma(tree)``.
ORDER_TOL = 1e-9
#: Highest order a tableau may declare (for ``order``, ``embedded_order`` and ``dense_order``): construction checks
#: every order condition up to it, 7,000 rooted trees at 12 (4,766 of order 12 alone), about 2.6x more per order.
MAX_ORDER = 12


def _exact(x: Number, name: str, where: str) -> Fraction:
    """One coefficient as an exact fraction: strings such as ``"1/3"`` and integers exactly, any other real scalar
    (a float, a numpy scalar, a one-element tensor) as the exact value of its float."""
    if isinstance(x, bool):
        raise TypeError(f"ButcherTableau {name!r}: {where} is a bool ({x}); coefficients are "
                        "numbers such as 0.5 or '1/2'")
    try:
        if isinstance(x, (str, numbers.Rational)):
            return Fraction(x)
        value = float(x)
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError):
        raise ValueError(
            f"ButcherTableau {name!r}: {where} = {x!r} is not a number; write coefficients as numbers, fraction "
            "strings like '1/3' or one-element tensors"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"ButcherTableau {name!r}: {where} = {value} is not finite")
    return Fraction(value)


def _as_float(x: Number, name: str, where: str) -> float:
    """One coefficient as a float (see ``_exact``), rounded once."""
    return float(_exact(x, name, where))


def _as_order(value: object, name: str, what: str, stages: int) -> int:
    """A declared order, refused before any order condition is evaluated when no ``stages``-stage explicit method
    can have it (order ``<= s``: each stage adds one degree in ``h``) or it is above ``MAX_ORDER``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ButcherTableau {name!r}: {what} must be a positive integer, got {value!r}")
    if value > stages:
        raise ValueError(
            f"ButcherTableau {name!r}: {what} = {value} is out of reach of {stages} stage(s): an explicit "
            f"Runge-Kutta method with s stages has order at most s; declare the order the method has"
        )
    if value > MAX_ORDER:
        raise ValueError(
            f"ButcherTableau {name!r}: {what} = {value} is above {MAX_ORDER}, the highest order whose conditions "
            f"are checked on construction (their number grows exponentially with the order); declare "
            f"{what}={MAX_ORDER} or less"
        )
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


def _elementary_weights(a: Sequence[Sequence[float]]) -> Callable[[Tree], torch.Tensor]:
    """``tree -> Phi(tree)``, the stages' elementary weights as an ``(s,)`` float64 tensor (``Phi_i(leaf) = 1``,
    ``Phi_i([t_1..t_m]) = prod_k (A Phi(t_k))_i``), memoised per tree, with ``A Phi`` memoised per child: a tree
    costs one product per child and each distinct child one ``s x s`` product, so many stages stay cheap."""
    matrix = torch.tensor(a, dtype=torch.float64).reshape(len(a), len(a))
    phis: dict[Tree, torch.Tensor] = {}
    applied: dict[Tree, torch.Tensor] = {}

    def stage_weights(tree: Tree) -> torch.Tensor:
        if tree not in phis:
            phi = torch.ones(len(a), dtype=torch.float64)
            for child in tree:
                if child not in applied:
                    applied[child] = matrix @ stage_weights(child)
                phi = phi * applied[child]
            phis[tree] = phi
        return phis[tree]

    return stage_weights


def order_defects(a: Sequence[Sequence[float]], weights: Sequence[float], order: int) -> Iterator[tuple[int, float]]:
    """``(n, largest |sum_i w_i Phi_i(tree) - 1/gamma(tree)| over the trees with n nodes)`` for ``n = 1 .. order``,
    lowest first and computed lazily, so a caller stopping at the first failed order skips the higher, costlier ones.

    ``Phi_i`` are the elementary weights of the stages.  All zero (up to roundoff)
    exactly when the weights give a method of that classical order.
    """
    stage_weights = _elementary_weights(a)
    w = torch.tensor(weights, dtype=torch.float64)
    for n in range(1, order + 1):
        trees = rooted_trees(n)
        phi = torch.stack([stage_weights(tree) for tree in trees])  # (trees, s)
        target = torch.tensor([1.0 / _density(tree) for tree in trees], dtype=torch.float64)
        yield n, float((phi @ w - target).abs().max())


def order_defect(a: Sequence[Sequence[float]], weights: Sequence[float], order: int) -> float:
    """Largest order-condition defect over rooted trees with at most ``order`` nodes
    ([`order_defects`][mpnode.core.tableau.order_defects])."""
    return max(defect for _, defect in order_defects(a, weights, order))


def dense_order_defects(a: Sequence[Sequence[float]], dense: Sequence[Sequence[float]],
                        order: int) -> Iterator[tuple[int, float]]:
    """``(n, largest defect over the trees with n nodes)`` of the dense output's order conditions ``sum_i w_i(x)
    Phi_i(tree) = x^|tree| / gamma(tree)`` for every ``x``, for ``n = 1 .. order``, lowest first and lazily.

    ``dense`` holds the ``s`` rows of the coefficients of ``x, x^2, ...``; both sides
    are polynomials in ``x``, compared coefficient by coefficient, so a zero defect
    means the interpolant has that order everywhere in the step (at the midpoint
    ``x = 1/2`` in particular).
    """
    stage_weights = _elementary_weights(a)
    degree = max(len(row) for row in dense)
    for n in range(1, order + 1):
        width = max(degree, n)  # the coefficients of x, x^2, ..., x^width
        w = torch.tensor([list(row) + [0.0] * (width - len(row)) for row in dense], dtype=torch.float64)
        trees = rooted_trees(n)
        phi = torch.stack([stage_weights(tree) for tree in trees])  # (trees, s)
        target = torch.zeros(len(trees), width, dtype=torch.float64)
        target[:, n - 1] = torch.tensor([1.0 / _density(tree) for tree in trees], dtype=torch.float64)
        yield n, float((phi @ w - target).abs().max())


def dense_order_defect(a: Sequence[Sequence[float]], dense: Sequence[Sequence[float]], order: int) -> float:
    """Largest defect of the dense output's order conditions for trees with at most ``order`` nodes
    ([`dense_order_defects`][mpnode.core.tableau.dense_order_defects])."""
    return max(defect for _, defect in dense_order_defects(a, dense, order))


def _first_failure(defects: Iterator[tuple[int, float]]) -> tuple[int, float] | None:
    """The lowest order whose conditions fail, with its defect (``None`` when all hold); stops there."""
    return next(((n, defect) for n, defect in defects if defect > ORDER_TOL), None)


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
        order = _as_order(order, name, "order", s)
        dense_rows = _dense_weights(name, bt, c_mid, dense, s)
        if dense_rows is None and dense_order is not None:
            raise ValueError(f"ButcherTableau {name!r}: dense_order is given but there is no "
                             "dense output (c_mid or dense)")
        if dense_rows is not None:
            dense_order = 1 if dense_order is None else _as_order(dense_order, name, "dense_order", s)
        err, embedded_order = _embedded_pair(name, b, b_hat, b_err, embedded_order, s, dense_rows is not None)
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
        failed = _first_failure(dense_order_defects(self.a, self.dense, self.dense_order))
        if failed is not None:
            source = "c_mid" if c_mid is not None else "dense"
            raise ValueError(
                f"ButcherTableau {self.name!r}: the dense output (from {source}) does not satisfy the order-"
                f"{self.dense_order} conditions (those of order {failed[0]} fail, largest defect {failed[1]:.3g}), so "
                f"interpolated outputs would be off; check {source}, or declare the dense_order the interpolant has"
            )

    def _check_orders(self) -> None:
        """The order conditions of ``b`` and of the embedded weights, lowest order first, stopping at a failure."""
        failed = _first_failure(order_defects(self.a, self.b, self.order))
        if failed is not None:
            raise ValueError(
                f"ButcherTableau {self.name!r}: b does not satisfy the order-{self.order} conditions (those of order "
                f"{failed[0]} fail, largest defect {failed[1]:.3g}); check the coefficients or declare the order "
                "the method has"
            )
        if self.b_err is not None:
            b_hat = [bi - ei for bi, ei in zip(self.b, self.b_err)]
            assert self.embedded_order is not None, "construction sets the order of an embedded pair"
            failed = _first_failure(order_defects(self.a, b_hat, self.embedded_order))
            if failed is not None:
                raise ValueError(
                    f"ButcherTableau {self.name!r}: the embedded weights b - b_err do not satisfy the order-"
                    f"{self.embedded_order} conditions (those of order {failed[0]} fail, largest defect "
                    f"{failed[1]:.3g}); check b_err/b_hat or embedded_order"
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
    sums = tuple(float(sum((_exact(x, name, f"a[{i}][{j}]") for j, x in enumerate(raw)), Fraction(0)))
                 for i, raw in enumerate(a))  # exact row sums, rounded once
    if c is None:
        return sums
    if len(c) != s:
        raise ValueError(f"ButcherTableau {name!r}: c has {len(c)} nodes but b has {s} stages")
    ct = tuple(_as_float(x, name, f"c[{i}]") for i, x in enumerate(c))
    for i, (ci, si) in enumerate(zip(ct, sums)):
        if abs(ci - si) > _STRUCTURE_TOL:
            raise ValueError(f"ButcherTableau {name!r}: c[{i}] = {ci} differs from the row sum of a[{i}] = {si}")
    return ct


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


def _embedded_pair(name: str, b: Sequence[Number], b_hat, b_err, embedded_order: object, s: int,
                   has_dense: bool) -> tuple[tuple[float, ...] | None, int | None]:
    """The error weights ``b - b_hat`` and the embedded order, or ``(None, None)`` for a fixed-grid method.

    An embedded pair needs both, an error estimate that is not identically zero, and a dense output (adaptive steps
    read the outputs between their ends off it).
    """
    err = _error_weights(name, b, b_hat, b_err, s)
    if (err is None) != (embedded_order is None):
        raise ValueError(
            f"ButcherTableau {name!r}: pass embedded_order together with b_hat or b_err (an "
            "embedded pair needs both)"
        )
    if err is None:
        return None, None
    if max(abs(e) for e in err) <= _STRUCTURE_TOL:
        raise ValueError(
            f"ButcherTableau {name!r}: the error weights b - b_hat are all zero (b_hat equals b), so the error "
            "estimate would be zero on every step and adaptive stepping would accept every step whatever "
            "rtol/atol; give the weights of an embedded method of another order as b_hat (e.g. order p - 1), "
            "or drop b_hat/b_err and embedded_order for a fixed-grid method"
        )
    if not has_dense:
        raise ValueError(
            f"ButcherTableau {name!r}: an adaptive method (b_hat/b_err with embedded_order) needs a dense output, "
            "which reads the outputs between the steps it chooses: pass c_mid= (the stage weights of y(t0 + h/2)) "
            "or dense= (polynomial weights per stage); or drop b_hat/b_err and embedded_order for a fixed-grid "
            "method"
        )
    return err, _as_order(embedded_order, name, "embedded_order", s)


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
