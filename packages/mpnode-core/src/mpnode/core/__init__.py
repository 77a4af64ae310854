"""mpnode.core: mixed-precision ODE solves with a recompute-based discrete adjoint.

Public API: [`odeint`][mpnode.core.odeint.odeint], and torchdiffeq's
[`odeint_adjoint`][mpnode.core.compat.odeint_adjoint] and [`odeint_event`][mpnode.core.compat.odeint_event]; methods as
data ([`ButcherTableau`][mpnode.core.tableau.ButcherTableau], [`TABLEAUX`][mpnode.core.methods.TABLEAUX],
[`get_tableau`][mpnode.core.methods.get_tableau]); step-size control
([`IntegralController`][mpnode.core.controllers.IntegralController],
[`PIController`][mpnode.core.controllers.PIController]); adjoint strategies
([`AdjointStrategy`][mpnode.core.adjoint.AdjointStrategy],
[`RecomputeAdjoint`][mpnode.core.strategies.RecomputeAdjoint], [`DirectAdjoint`][mpnode.core.strategies.DirectAdjoint],
[`SegmentedAdjoint`][mpnode.core.strategies.SegmentedAdjoint], [`AutoAdjoint`][mpnode.core.strategies.AutoAdjoint]);
[`SolverStats`][mpnode.core.stats.SolverStats]; [`PrecisionPolicy`][mpnode.core.precision.PrecisionPolicy]; and the
scaling interface [`AdjointScaling`][mpnode.core.scaling.AdjointScaling] /
[`NoAdjointScaling`][mpnode.core.scaling.NoAdjointScaling].
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
