"""Explicit Runge–Kutta methods as data: Butcher tableaux and the named set.

A method is fully described by its tableau (``a``, ``b``, ``c``) and its
order; the single generic step in :mod:`mpnode.core.stepper` runs any of
them.  The names and coefficients of the fixed-grid solvers follow
torchdiffeq, so ``method="rk4"`` is the 3/8 rule there and here.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence, Union

Number = Union[int, float, str, Fraction]

_TOL = 1e-12


def _as_float(x: Number) -> float:
    return float(Fraction(x)) if isinstance(x, str) else float(x)


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method.

    Attributes:
        name: a label used in messages and statistics.
        a: the ``s x s`` coefficient matrix as a tuple of rows, strictly
            lower-triangular (explicit method); row ``i`` holds ``a_i0 .. a_i,s-1``.
        b: the ``s`` weights of the stages in the step update; they sum to 1.
        c: the ``s`` stage nodes, ``c_i = sum_j a_ij``.
        order: the classical order of accuracy (checked by the tests, not here).

    Construction validates the structure and raises ``ValueError`` naming the
    offending entry, so a user tableau can be passed as ``method=`` safely.
    """

    name: str
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    order: int

    def __init__(
        self,
        name: str,
        a: Sequence[Sequence[Number]],
        b: Sequence[Number],
        c: Sequence[Number] | None = None,
        order: int = 1,
    ) -> None:
        s = len(b)
        if s == 0:
            raise ValueError(f"ButcherTableau {name!r}: b must have at least one weight")
        if len(a) != s:
            raise ValueError(f"ButcherTableau {name!r}: a has {len(a)} rows but b has {s} stages")
        rows = []
        for i, row in enumerate(a):
            row = tuple(_as_float(x) for x in row)
            if len(row) > s:
                raise ValueError(f"ButcherTableau {name!r}: row {i} of a has {len(row)} entries, more than {s} stages")
            row = row + (0.0,) * (s - len(row))
            for j in range(i, s):
                if row[j] != 0.0:
                    raise ValueError(
                        f"ButcherTableau {name!r}: a[{i}][{j}] = {row[j]} is on or above the diagonal; "
                        "only explicit (strictly lower-triangular) methods are supported"
                    )
            rows.append(row)
        bt = tuple(_as_float(x) for x in b)
        if abs(sum(bt) - 1.0) > _TOL:
            raise ValueError(f"ButcherTableau {name!r}: the weights b sum to {sum(bt)!r}, not 1 (the method would be inconsistent)")
        sums = tuple(sum(r) for r in rows)
        if c is None:
            ct = sums
        else:
            ct = tuple(_as_float(x) for x in c)
            if len(ct) != s:
                raise ValueError(f"ButcherTableau {name!r}: c has {len(ct)} nodes but b has {s} stages")
            for i, (ci, si) in enumerate(zip(ct, sums)):
                if abs(ci - si) > _TOL:
                    raise ValueError(f"ButcherTableau {name!r}: c[{i}] = {ci} differs from the row sum of a[{i}] = {si}")
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"ButcherTableau {name!r}: order must be a positive integer, got {order!r}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "a", tuple(rows))
        object.__setattr__(self, "b", bt)
        object.__setattr__(self, "c", ct)
        object.__setattr__(self, "order", order)

    @property
    def stages(self) -> int:
        """Number of vector-field evaluations per step."""
        return len(self.b)


def _t(name: str, a, b, order: int) -> ButcherTableau:
    # Coefficients are written as exact fractions ("1/3") and rounded once.
    return ButcherTableau(name, a, b, order=order)


TABLEAUX: dict[str, ButcherTableau] = {
    t.name: t
    for t in (
        _t("euler", [[]], [1], 1),
        _t("midpoint", [[], ["1/2"]], [0, 1], 2),
        _t("heun2", [[], [1]], ["1/2", "1/2"], 2),
        _t("ralston", [[], ["2/3"]], ["1/4", "3/4"], 2),
        _t("heun3", [[], ["1/3"], [0, "2/3"]], ["1/4", 0, "3/4"], 3),
        _t("ssprk3", [[], [1], ["1/4", "1/4"]], ["1/6", "1/6", "2/3"], 3),
        # torchdiffeq's "rk4" is Kutta's 3/8 rule.
        _t("rk4", [[], ["1/3"], ["-1/3", 1], [1, -1, 1]], ["1/8", "3/8", "3/8", "1/8"], 4),
        _t("rk4_classic", [[], ["1/2"], [0, "1/2"], [0, 0, 1]], ["1/6", "1/3", "1/3", "1/6"], 4),
    )
}


def get_tableau(method: str | ButcherTableau) -> ButcherTableau:
    """Return the tableau for a method name, or ``method`` itself if it is a tableau."""
    if isinstance(method, ButcherTableau):
        return method
    if isinstance(method, str) and method in TABLEAUX:
        return TABLEAUX[method]
    raise ValueError(
        f"unknown method {method!r}: use one of {sorted(TABLEAUX)} or pass a mpnode.core.ButcherTableau"
    )
