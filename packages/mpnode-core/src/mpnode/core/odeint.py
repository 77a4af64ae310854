"""``odeint``: the torchdiffeq-compatible entry point."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch

from .adjoint import MixedPrecisionRK, SolveConfig
from .grid import grid_from_step_size, plan_outputs, read_outputs
from .parameters import gradient_targets
from .precision import PrecisionPolicy
from .scaling import AdjointScaling, NoAdjointScaling
from .state import FlatState, FlatVectorField, State
from .tableau import ButcherTableau, get_tableau
from .validation import check_grid, check_options, check_t, check_y0


def odeint(
    func: Callable,
    y0: State,
    t: torch.Tensor,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    method: str | ButcherTableau = "rk4",
    options: Mapping[str, Any] | None = None,
    adjoint_params: Iterable[torch.Tensor] | None = None,
    scaler: AdjointScaling | bool | None = None,
) -> State:
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0`` on a fixed grid, in mixed precision.

    Call it like ``torchdiffeq.odeint`` and, to use low precision, inside
    ``torch.autocast(y0.device.type, dtype=...)``: the vector field is then
    evaluated in the autocast dtype while the state, the stage sums, the
    adjoint and every gradient sum stay in ``y0``'s dtype.  Backward recomputes
    each step from one checkpoint per step (discretize-then-optimize).

    Args:
        func: ``func(t, y) -> dy/dt``; ``t`` a 0-dim tensor in ``y0``'s dtype, ``y``
            and the result structured like ``y0``.  An ``nn.Module``'s parameters
            with ``requires_grad`` receive gradients.
        y0: float32/float64 tensor of any shape, or a tuple of such tensors.
        t: 1-D float32/float64 tensor of output times, strictly increasing or
            decreasing, on ``y0``'s device.
        rtol, atol: accepted for torchdiffeq compatibility; fixed-grid methods ignore them.
        method: a name in ``mpnode.core.TABLEAUX`` (``"rk4"`` is the 3/8 rule like
            torchdiffeq; ``"rk4_classic"`` the 1/6 rule) or a ``ButcherTableau``.
        options: ``step_size`` (grid ``t[0], t[0] +- h, ..., t[-1]``),
            ``grid_constructor`` (``f(func, y0, t) -> grid``), ``checkpoint_dtype``
            (dtype of the stored states; default the autocast dtype, else ``y0``'s),
            ``stats`` (a :class:`SolverStats` updated in place).  Without a grid
            option the grid is ``t``.  Outputs between grid nodes are linearly
            interpolated.
        adjoint_params: the tensors to differentiate when ``func`` is a closure (or
            to restrict a module's parameters).  If ``func`` uses a tensor that
            requires grad and is not listed, backward raises an error instead of
            silently leaving it without gradient.
        scaler: adjoint scaling for float16: an ``AdjointScaling`` (e.g.
            ``mpnode.scaler.DynamicAdjointScaler()``); ``None`` picks the dynamic
            scaler under float16 autocast when mpnode-scaler is installed; ``False``
            disables scaling.

    Returns:
        ``(len(t), *y0.shape)`` tensor in ``y0``'s dtype, or a tuple of such
        tensors for a tuple ``y0``.
    """
    del rtol, atol  # fixed-grid methods take no tolerances
    check_y0(y0)
    layout = FlatState(y0)
    t_host = check_t(t, layout.device)
    tableau = get_tableau(method)
    opts = check_options(options)
    policy = PrecisionPolicy.capture(
        y0 if isinstance(y0, torch.Tensor) else y0[0], opts.get("checkpoint_dtype")
    )
    scaling = resolve_scaling(scaler, policy)

    if opts.get("step_size") is not None:
        grid = grid_from_step_size(t, t_host, opts["step_size"])
        grid_host = grid.detach().cpu()
    elif opts.get("grid_constructor") is not None:
        grid = opts["grid_constructor"](func, y0, t)
        grid_host = check_grid(grid, t, t_host)
    else:
        grid, grid_host = t, t_host
    plan = plan_outputs(grid_host, t_host)
    steps = (grid_host[1:] - grid_host[:-1]).tolist()  # h_n, bitwise as the device computes them

    field = FlatVectorField(func, layout)
    y0_flat = layout.flatten(y0)
    targets = gradient_targets(func, adjoint_params)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (grid, y0_flat, *targets))
    cfg = SolveConfig(field, tableau, policy, plan.nodes, steps, targets, scaling, opts.get("stats"), needs_grad)
    node_states = MixedPrecisionRK.apply(cfg, grid, y0_flat, *targets)
    if not bool(torch.isfinite(node_states[-1].detach()).all()):
        raise FloatingPointError(
            "odeint: the solution became inf/NaN. "
            + (
                "Under float16 autocast the vector field may overflow: try torch.bfloat16, a smaller step, or scaling the inputs."
                if policy.autocast_dtype == torch.float16
                else "Check the vector field for blow-up and try a smaller step size."
            )
        )
    out = read_outputs(plan, node_states, grid, t)
    return layout.unflatten(out, (t.shape[0],))


def resolve_scaling(scaler: AdjointScaling | bool | None, policy: PrecisionPolicy) -> AdjointScaling:
    """The scaling policy of a solve (see ``odeint``'s ``scaler`` argument)."""
    if isinstance(scaler, AdjointScaling):
        return scaler
    if scaler is None and policy.is_float16:
        try:
            from mpnode.scaler import default_scaler
        except ImportError:
            return NoAdjointScaling(raise_on_nonfinite=True)
        return default_scaler()
    if scaler is None or scaler is False:
        return NoAdjointScaling(raise_on_nonfinite=policy.is_float16)
    raise TypeError(
        f"scaler must be an mpnode.core.AdjointScaling (e.g. mpnode.scaler.DynamicAdjointScaler()), None or False; got {scaler!r}"
    )
