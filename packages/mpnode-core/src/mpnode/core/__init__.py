"""mpnode.core: mixed-precision ODE solves with a recompute-based discrete adjoint.

Public API: :func:`odeint`; methods as data (:class:`ButcherTableau`,
:data:`TABLEAUX`, :func:`get_tableau`); step-size control
(:class:`IntegralController`, :class:`PIController`); adjoint strategies
(:class:`AdjointStrategy`, :class:`RecomputeAdjoint`); :class:`SolverStats`;
:class:`PrecisionPolicy`; and the scaling interface :class:`AdjointScaling` /
:class:`NoAdjointScaling`.
"""

from .controllers import IntegralController, PIController, StepSizeController
from .march import MixedPrecisionToleranceWarning
from .methods import TABLEAUX, get_tableau
from .odeint import odeint
from .precision import PrecisionPolicy
from .scaling import AdjointScaling, NoAdjointScaling, NonFiniteGradientError, ScalingPass
from .stats import SolverStats
from .strategies import AdjointStrategy, RecomputeAdjoint
from .tableau import ButcherTableau

__all__ = [
    "odeint",
    "ButcherTableau",
    "TABLEAUX",
    "get_tableau",
    "StepSizeController",
    "IntegralController",
    "PIController",
    "AdjointStrategy",
    "RecomputeAdjoint",
    "SolverStats",
    "PrecisionPolicy",
    "AdjointScaling",
    "NoAdjointScaling",
    "ScalingPass",
    "NonFiniteGradientError",
    "MixedPrecisionToleranceWarning",
]
__version__ = "0.1.0"
