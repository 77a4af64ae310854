"""mpnode.core: mixed-precision ODE solves with a recompute-based discrete adjoint.

Public API: :func:`odeint`, and torchdiffeq's :func:`odeint_adjoint` and
:func:`odeint_event`; methods as data (:class:`ButcherTableau`,
:data:`TABLEAUX`, :func:`get_tableau`); step-size control
(:class:`IntegralController`, :class:`PIController`); adjoint strategies
(:class:`AdjointStrategy`, :class:`RecomputeAdjoint`, :class:`DirectAdjoint`,
:class:`SegmentedAdjoint`, :class:`AutoAdjoint`); :class:`SolverStats`;
:class:`PrecisionPolicy`; and the scaling interface :class:`AdjointScaling` /
:class:`NoAdjointScaling`.
"""

from .compat import AdjointArgumentsIgnoredWarning, odeint_adjoint, odeint_event
from .controllers import IntegralController, PIController, StepSizeController
from .march import MixedPrecisionToleranceWarning
from .methods import TABLEAUX, get_tableau
from .odeint import GridOptionIgnoredWarning, odeint
from .precision import PrecisionPolicy
from .scaling import AdjointScaling, NoAdjointScaling, NonFiniteGradientError, ScalingPass
from .stats import SolverStats
from .strategies import AdjointStrategy, AutoAdjoint, DirectAdjoint, RecomputeAdjoint, SegmentedAdjoint
from .tableau import ButcherTableau

__all__ = [
    "odeint",
    "odeint_adjoint",
    "odeint_event",
    "AdjointArgumentsIgnoredWarning",
    "ButcherTableau",
    "TABLEAUX",
    "get_tableau",
    "StepSizeController",
    "IntegralController",
    "PIController",
    "AdjointStrategy",
    "RecomputeAdjoint",
    "DirectAdjoint",
    "SegmentedAdjoint",
    "AutoAdjoint",
    "SolverStats",
    "PrecisionPolicy",
    "AdjointScaling",
    "NoAdjointScaling",
    "ScalingPass",
    "NonFiniteGradientError",
    "MixedPrecisionToleranceWarning",
    "GridOptionIgnoredWarning",
]
__version__ = "0.1.0"
