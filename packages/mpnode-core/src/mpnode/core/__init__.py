"""mpnode.core: mixed-precision fixed-grid ODE solves with a recompute-based discrete adjoint.

Public API: :func:`odeint`, :class:`ButcherTableau`, :data:`TABLEAUX`,
:func:`get_tableau`, :class:`SolverStats`, :class:`PrecisionPolicy`, and the
scaling interface :class:`AdjointScaling` / :class:`NoAdjointScaling`.
"""

from .odeint import odeint
from .precision import PrecisionPolicy
from .scaling import AdjointScaling, NoAdjointScaling, NonFiniteGradientError
from .stats import SolverStats
from .tableau import TABLEAUX, ButcherTableau, get_tableau

__all__ = [
    "odeint",
    "ButcherTableau",
    "TABLEAUX",
    "get_tableau",
    "SolverStats",
    "PrecisionPolicy",
    "AdjointScaling",
    "NoAdjointScaling",
    "NonFiniteGradientError",
]
__version__ = "0.1.0"
