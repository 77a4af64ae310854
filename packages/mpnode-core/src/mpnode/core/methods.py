"""The named Runge–Kutta methods: every coefficient of every built-in method, in one place.

Names follow torchdiffeq.  Fixed-grid methods: ``euler``, ``midpoint``,
``heun2``, ``heun3``, ``rk4`` (**Kutta's 3/8 rule**, as torchdiffeq's ``rk4``),
plus ``rk4_classic`` (the 1/6 rule), ``ralston`` and ``ssprk3``.  Adaptive
methods (embedded pairs with dense output): ``dopri5``, ``bosh3``,
``fehlberg2``, ``adaptive_heun``, ``dopri8`` with torchdiffeq's coefficients
(including its error estimators and mid-step values), and ``tsit5``.

Sources of the coefficients: Dormand & Prince (1980) and Shampine (1986) for
``dopri5`` (the mid-step dense output and the 4th-order estimator torchdiffeq
uses); Bogacki & Shampine (1989) for ``bosh3``; Fehlberg (1969) for ``fehlberg2``;
Prince & Dormand (1981), RK8(7)13M, with the dense output of Hairer, Nørsett &
Wanner's DOP853 evaluated at mid-step, for ``dopri8``; Tsitouras (2011),
"Runge–Kutta pairs of order 5(4) satisfying only the first column simplifying
assumption", for ``tsit5`` (with the sign of the last error weight corrected to
-1/66, as the errata of the implementations note).  Every tableau is validated on
import (order conditions of the method and of its embedded pair).
"""

from __future__ import annotations

from .tableau import ButcherTableau, polynomial_product

_FIXED = (
    ButcherTableau("euler", [[]], [1], order=1),
    ButcherTableau("midpoint", [[], ["1/2"]], [0, 1], order=2),
    ButcherTableau("heun2", [[], [1]], ["1/2", "1/2"], order=2),
    ButcherTableau("ralston", [[], ["2/3"]], ["1/4", "3/4"], order=2),
    ButcherTableau("heun3", [[], ["1/3"], [0, "2/3"]], ["1/4", 0, "3/4"], order=3),
    ButcherTableau("ssprk3", [[], [1], ["1/4", "1/4"]], ["1/6", "1/6", "2/3"], order=3),
    # torchdiffeq's "rk4" is Kutta's 3/8 rule.
    ButcherTableau("rk4", [[], ["1/3"], ["-1/3", 1], [1, -1, 1]], ["1/8", "3/8", "3/8", "1/8"], order=4),
    ButcherTableau("rk4_classic", [[], ["1/2"], [0, "1/2"], [0, 0, 1]], ["1/6", "1/3", "1/3", "1/6"], order=4),
)

_DOPRI5_B = ["35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84", 0]
DOPRI5 = ButcherTableau(
    "dopri5",
    a=[
        [],
        ["1/5"],
        ["3/40", "9/40"],
        ["44/45", "-56/15", "32/9"],
        ["19372/6561", "-25360/2187", "64448/6561", "-212/729"],
        ["9017/3168", "-355/33", "46732/5247", "49/176", "-5103/18656"],
        _DOPRI5_B[:6],
    ],
    b=_DOPRI5_B,
    order=5,
    b_hat=["1951/21600", 0, "22642/50085", "451/720", "-12231/42400", "649/6300", "1/60"],
    embedded_order=4,
    c_mid=[
        "6025192743/60171106304", 0, "51252292925/130801643196", "-2691868925/90256659456",
        "187940372067/3189068634112", "-1776094331/39487288512", "11237099/470086768",
    ],
    reuse_last_stage=True,
    dense_order=4,
)

BOSH3 = ButcherTableau(
    "bosh3",
    a=[[], ["1/2"], [0, "3/4"], ["2/9", "1/3", "4/9"]],
    b=["2/9", "1/3", "4/9", 0],
    order=3,
    b_hat=["7/24", "1/4", "1/3", "1/8"],
    embedded_order=2,
    c_mid=[0, "1/2", 0, 0],
    reuse_last_stage=True,
)

# torchdiffeq reuses the last stage of these two although it is not f(t1, y1): the
# first stage of a step is then inherited (mpnode carries it, so the numbers agree).
FEHLBERG2 = ButcherTableau(
    "fehlberg2",
    a=[[], ["1/2"], ["1/256", "255/256"]],
    b=["1/512", "255/256", "1/512"],
    order=2,
    b_hat=["1/256", "255/256", 0],
    embedded_order=1,
    c_mid=[0, "1/2", 0],
    reuse_last_stage=True,
)

ADAPTIVE_HEUN = ButcherTableau(
    "adaptive_heun",
    a=[[], [1]],
    b=["1/2", "1/2"],
    order=2,
    b_hat=[0, 1],
    embedded_order=1,
    c_mid=["1/2", 0],
    reuse_last_stage=True,
)

_DOPRI8_B = [
    "14005451/335480064", 0, 0, 0, 0, "-59238493/1068277825", "181606767/758867731", "561292985/797845732",
    "-1041891430/1371343529", "760417239/1151165299", "118820643/751138087", "-528747749/2220607170", "1/4",
]
DOPRI8 = ButcherTableau(
    "dopri8",
    a=[
        [],
        ["1/18"],
        ["1/48", "1/16"],
        ["1/32", 0, "3/32"],
        ["5/16", 0, "-75/64", "75/64"],
        ["3/80", 0, 0, "3/16", "3/20"],
        ["29443841/614563906", 0, 0, "77736538/692538347", "-28693883/1125000000", "23124283/1800000000"],
        ["16016141/946692911", 0, 0, "61564180/158732637", "22789713/633445777", "545815736/2771057229",
         "-180193667/1043307555"],
        ["39632708/573591083", 0, 0, "-433636366/683701615", "-421739975/2616292301", "100302831/723423059",
         "790204164/839813087", "800635310/3783071287"],
        ["246121993/1340847787", 0, 0, "-37695042795/15268766246", "-309121744/1061227803", "-12992083/490766935",
         "6005943493/2108947869", "393006217/1396673457", "123872331/1001029789"],
        ["-1028468189/846180014", 0, 0, "8478235783/508512852", "1311729495/1432422823", "-10304129995/1701304382",
         "-48777925059/3047939560", "15336726248/1032824649", "-45442868181/3398467696", "3065993473/597172653"],
        ["185892177/718116043", 0, 0, "-3185094517/667107341", "-477755414/1098053517", "-703635378/230739211",
         "5731566787/1027545527", "5232866602/850066563", "-4093664535/808688257", "3962137247/1805957418",
         "65686358/487910083"],
        ["403863854/491063109", 0, 0, "-5068492393/434740067", "-411421997/543043805", "652783627/914296604",
         "11173962825/925320556", "-13158990841/6184727034", "3936647629/1978049680", "-160528059/685178525",
         "248638103/1413531060", 0],
        _DOPRI8_B,
    ],
    b=[*_DOPRI8_B, 0],
    order=8,
    b_hat=[
        "13451932/455176623", 0, 0, 0, 0, "-808719846/976000145", "1757004468/5645159321", "656045339/265891186",
        "-3867574721/1518517206", "465885868/322736535", "53011238/667516719", "2/45", 0, 0,
    ],
    embedded_order=7,
    # DOP853's continuous extension evaluated at x = 1/2 (the mid-step value of torchdiffeq's quartic fit).
    c_mid=[
        0.04103130360739393, 0.0, 0.0, 0.0, 0.0, 0.05100562801991382, 0.2388930677412202, 0.3096870143996103,
        -0.2172325471755352, 0.07833405679331928, -0.0018614369715579948, 0.007072844202678841,
        0.00690847373200576, -0.013838404349047373,
    ],
    reuse_last_stage=True,
    dense_order=4,
)

_TSIT5_B = [
    0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774,
]
TSIT5 = ButcherTableau(
    "tsit5",
    a=[
        [],
        [0.161],
        [-0.008480655492356989, 0.335480655492357],
        [2.8971530571054935, -6.359448489975075, 4.3622954328695815],
        [5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525],
        [5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.02826905039406838],
        _TSIT5_B,
    ],
    b=[*_TSIT5_B, 0.0],
    c=[0, 0.161, 0.327, 0.9, 0.9800255409045097, 1, 1],
    order=5,
    b_err=[
        0.00178001105222577714, 0.0008164344596567469, -0.007880878010261995, 0.1447110071732629,
        -0.5823571654525552, 0.45808210592918697, -1 / 66,
    ],
    embedded_order=4,
    # Tsitouras' fourth-order continuous extension b_i(x), as products of the published factors.
    dense=[
        polynomial_product(
            [0, -1.0530884977290216], [-1.3299890189751412, 1], [0.7139816917074209, -1.4364028541716351, 1]
        )[1:],
        polynomial_product([0, 0, 0.1017], [1.2949852507374631, -2.1966568338249754, 1])[1:],
        polynomial_product([0, 0, 2.490627285651252793], [1.57803468208092486, -2.38535645472061657, 1])[1:],
        polynomial_product([0, 0, -16.54810288924490272], [-1.21712927295533244, 1], [-0.61620406037800089, 1])[1:],
        polynomial_product([0, 0, 47.37952196281928122], [-1.203071208372362603, 1], [-0.658047292653547382, 1])[1:],
        polynomial_product([0, 0, -34.87065786149660974], [-1.2, 1], [-0.666666666666666667, 1])[1:],
        polynomial_product([0, 0, 2.5], [-1, 1], [-0.6, 1])[1:],
    ],
    reuse_last_stage=True,
    dense_order=4,
)

TABLEAUX: dict[str, ButcherTableau] = {
    t.name: t for t in (*_FIXED, DOPRI5, BOSH3, FEHLBERG2, ADAPTIVE_HEUN, DOPRI8, TSIT5)
}
"""The built-in methods by name, what ``odeint(..., method=<name>)`` accepts.

Fixed grid: ``euler``, ``midpoint``, ``heun2``, ``ralston``, ``heun3``, ``ssprk3``, ``rk4`` (Kutta's 3/8 rule, as
torchdiffeq's ``rk4``), ``rk4_classic``.  Adaptive (an embedded pair and dense output): ``dopri5`` (the default),
``bosh3``, ``fehlberg2``, ``adaptive_heun``, ``dopri8``, ``tsit5``.  Orders and stages: docs/solvers.md.
"""


_MULTISTEP = (
    "it is a multistep method: each step uses the field values of several earlier steps, which mpnode's adjoint "
    "(one checkpoint per step, each step recomputed on its own) does not keep; use 'rk4' on the same grid, or 'dopri5'"
)

REFUSED_METHODS: dict[str, str] = {
    "explicit_adams": _MULTISTEP,
    "implicit_adams": _MULTISTEP,
    "fixed_adams": _MULTISTEP,
    "scipy_solver": (
        "it runs scipy.integrate.solve_ivp on NumPy arrays on the host, outside autograd and autocast, so it has "
        "neither gradients nor low precision; use 'dopri5' (or 'dopri8'), or call scipy directly for inference"
    ),
}
"""torchdiffeq's method names that mpnode does not provide, with the reason and the alternative."""


def get_tableau(method: str | ButcherTableau) -> ButcherTableau:
    """Return the tableau for a method name, or ``method`` itself if it is a tableau."""
    if isinstance(method, ButcherTableau):
        return method
    if isinstance(method, str) and method in TABLEAUX:
        return TABLEAUX[method]
    if isinstance(method, str) and method in REFUSED_METHODS:
        raise ValueError(f"method {method!r} (torchdiffeq) is not available in mpnode: {REFUSED_METHODS[method]}")
    raise ValueError(
        f"unknown method {method!r}: use one of {sorted(TABLEAUX)} or pass a mpnode.core.ButcherTableau"
    )
