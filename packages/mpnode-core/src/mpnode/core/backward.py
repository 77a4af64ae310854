"""The discrete adjoint by recomputation: per-step VJP, the accumulator, the block driver.

Each step is ``y_{n+1} = y_n + h_n Phi_n`` with ``Phi_n = sum_i b_i k_i`` and each
output inside it ``o_j = y_n + h_n Psi_j`` (see [`mpnode.core.outputs`][mpnode.core.outputs]).  Walking
the steps from last to first, with ``lam`` the adjoint of the state
(docs/backward.md derives it)::

    v                    = S * (lam_{n+1}, g_j, mu_{n+1} / h_n)      seeds of (Phi_n, Psi_j, carried stage)
    (gy, g_th, g_k, g_t) = VJP of those at (y_n, theta, first stage, times)   # the field under autocast
    lam_n                = lam_{n+1} + sum_j g_j + (h_n / S) gy  (+ dL/dy_n when y_n is an output)
    grad_theta          += (h_n / S) g_th
    mu_n                 = (h_n / S) g_k                          (only when the first stage is carried)
    grad_tau_{n+1}      += D + (h_n / S) dPsi/dtau_{n+1},  grad_tau_n += -D + (h_n / S) dPsi/dtau_n
    grad_t_j            += (h_n / S) dPsi_j/dt_j

with ``D = lam_{n+1}.Phi_n + sum_j g_j.Psi_j`` (all elements summed) and ``g_j =
dL/do_j``.  ``lam``, ``mu`` and every sum stay in high precision.  The pieces:

* [`build_step_graph`][mpnode.core.backward.build_step_graph]: evaluate one step from its stored start state with
  autograd on (a [`StepGraph`][mpnode.core.contracts.StepGraph]);
* [`step_graph_vjp`][mpnode.core.backward.step_graph_vjp]: the VJP of a step graph, as a
  [`StepVJP`][mpnode.core.backward.StepVJP];
* [`BackwardSteps`][mpnode.core.backward.BackwardSteps]: where step graphs come from: it asks the adjoint strategy
  that kept the forward's steps, and offers it the means to rebuild them;
* [`AdjointAccumulator`][mpnode.core.backward.AdjointAccumulator]: ``lam``, ``mu``, parameter and time sums, with
  snapshot/restore;
* [`run_adjoint`][mpnode.core.backward.run_adjoint]: the loop over blocks of steps that talks to the scaling policy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .contracts import FirstStageMode, Problem, StepGraph, Trajectory
from .graphs import evaluate_step
from .guards import REPLACED_TENSOR_FIXES
from .march import rerun
from .parameters import KnownTensors
from .replay import Replay
from .rk import stage_time_table
from .scaling import AdjointScaling, ScalingPass

if TYPE_CHECKING:
    from .adjoint import AdjointStrategy


@dataclass
class BackwardPlan:
    """The constants of one backward pass.

    Attributes:
        problem: the solve's field, tableau, policy, output rule, callbacks and counters.
        trajectory: the forward pass's accepted steps and output placement.
        params: the tensors whose gradients are wanted (a subset of ``known``).
        known: every tensor the solve differentiates or holds constant (for the
            captured-tensor check, prepared once as ``frontier``); ``None`` when
            ``adjoint_params`` was given: every other tensor is then a constant
            (torchdiffeq's rule) and nothing is checked.
        t: the output times, detached (``(T,)``, ``t``'s dtype).
        need_times: whether gradients w.r.t. grid nodes and output times are wanted.
        retain_graph: the caller keeps the graph (``retain_graph=True``): kept step
            graphs must survive this pass for the next one.
    """

    problem: Problem
    trajectory: Trajectory
    params: list[torch.Tensor]
    known: list[torch.Tensor] | None
    t: torch.Tensor
    need_times: bool
    stage_times: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    retain_graph: bool = False

    def __post_init__(self) -> None:
        traj = self.trajectory
        self.frontier = KnownTensors(self.known) if self.known is not None else None
        if traj.output_times is not None:  # decided by the forward pass (a solve until an event)
            self.t = traj.output_times
        if traj.n_steps:  # (none: an event at t0); also used to re-run steps when the times are traced
            self.stage_times = stage_time_table(
                self.problem.tableau, traj.grid, self.problem.policy.state_dtype, traj.perturbations
                if len(traj.perturbations) > 1 else traj.perturbations[0],
            )


@dataclass
class StepVJP:
    """The scaled VJP results of one step (multiply by ``h / S`` to use them).

    Attributes:
        dy: w.r.t. the step's start state ``(D,)``, or ``None`` if the step does not depend on it.
        dparams: w.r.t. each wanted parameter (``None`` where unused).
        dfirst: w.r.t. a carried first stage ``(D,)``.
        dt0, dt1: w.r.t. the step's nodes (0-dim, grid dtype), when times are traced.
        dout: ``(j, grad)`` w.r.t. each output time inside the step, when traced.
        dot: ``lam.Phi + sum_j g_j.Psi_j`` (0-dim, state dtype), when times are traced.
    """

    dy: torch.Tensor | None
    dparams: list[torch.Tensor | None]
    dfirst: torch.Tensor | None = None
    dt0: torch.Tensor | None = None
    dt1: torch.Tensor | None = None
    dout: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)
    dot: torch.Tensor | None = None


def build_step_graph(
    plan: BackwardPlan, n: int, y_stored: torch.Tensor, first_stored: torch.Tensor | None, with_end_slope: bool
) -> StepGraph:
    """Evaluate step ``n`` of the trajectory from its stored start state (and inherited first stage), with autograd
    on."""
    traj = plan.trajectory
    nodes = (traj.grid[n], traj.grid[n + 1])
    times = None if plan.need_times else plan.stage_times[n]
    return evaluate_step(plan.problem, y_stored, first_stored, traj.steps[n], nodes, traj.perturbation(n), times,
                         plan.need_times, with_end_slope)


def step_graph_vjp(
    plan: BackwardPlan,
    n: int,
    graph: StepGraph,
    lam: torch.Tensor,
    mu: torch.Tensor | None,
    out_grads: Sequence[tuple[int, float, torch.Tensor]],
    scale: torch.Tensor | None,
    retain_graph: bool = False,
) -> StepVJP:
    """The VJP of step ``n``'s outputs: ``Phi`` (seed ``lam``), each output inside it, and its last stage.

    ``out_grads`` holds ``(j, x_j, g_j)`` for the outputs interpolated in this
    step; ``mu`` the adjoint of the next step's inherited first stage (this step's
    last stage), or ``None``.  ``scale`` is ``S`` (``None`` means 1).
    """
    prob, traj = plan.problem, plan.trajectory
    stages, phi = graph.stages, graph.phi
    outputs, seeds = [phi], [lam]
    out_times = []
    for j, x, g in out_grads:
        if plan.need_times:
            assert graph.t0 is not None and graph.t1 is not None, "a graph built with traced times has its nodes"
            t_j = plan.t[j].detach().to(traj.grid.dtype).requires_grad_(True)
            out_times.append((j, t_j))
            x = (t_j - graph.t0) / (graph.t1 - graph.t0)
        outputs.append(prob.output_rule.increment(x, stages, phi, graph.end_slope))
        seeds.append(g)
    if mu is not None:
        outputs.append(stages.ks[-1])
        seeds.append(mu / traj.steps[n])
    if scale is not None:
        seeds = [s * scale for s in seeds]

    inputs = [graph.y, *plan.params]
    if graph.first is not None:
        inputs.append(graph.first)
    if plan.need_times:
        inputs += [graph.t0, graph.t1, *(t_j for _, t_j in out_times)]
    live = [(o, s) for o, s in zip(outputs, seeds) if o.requires_grad]  # a field may not depend on anything
    grads = torch.autograd.grad([o for o, _ in live], inputs, grad_outputs=[s for _, s in live], allow_unused=True,
                                retain_graph=retain_graph) if live else (None,) * len(inputs)
    k = 1 + len(plan.params)
    result = StepVJP(grads[0], list(grads[1:k]))
    if graph.first is not None:
        result.dfirst = grads[k]
        k += 1
    if plan.need_times:
        result.dt0, result.dt1 = grads[k], grads[k + 1]
        result.dout = [(j, g) for (j, _), g in zip(out_times, grads[k + 2:])]
        unscaled = [lam] + [g for _, _, g in out_grads]
        dots = [(s * o.detach()).sum() for s, o in zip(unscaled, outputs)]
        result.dot = sum(dots[1:], dots[0]).to(traj.grid.dtype)
    return result


class AdjointAccumulator:
    """The running adjoint and gradient sums of a backward pass, in high precision.

    Attributes:
        lam: adjoint of the state ``(D,)`` (state dtype).
        mu: adjoint of a carried first stage ``(D,)``, or ``None``.
        sums: gradient sums of the wanted parameters (their own dtypes).
        time_terms: ``(m, dL/dtau_m, dL/dtau_{m+1})`` contributions, newest last.
        out_time: ``j -> dL/dt_j`` through the interpolation of output ``j``.
    """

    def __init__(self, lam: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        self.lam = lam
        self.mu: torch.Tensor | None = None
        self.sums = [torch.zeros_like(p) for p in params]
        self.time_terms: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.out_time: dict[int, torch.Tensor] = {}
        self.read = [False] * len(params)  # whether some step's graph reached each parameter

    def add_step(self, m: int, vjp: StepVJP, coef: float | torch.Tensor, direct: torch.Tensor | None) -> None:
        """Apply step ``m``'s VJP: ``lam += direct + coef * dy``, sums, carried stage, time terms."""
        lam = self.lam if direct is None else self.lam + direct
        if vjp.dy is not None:
            lam = _axpy(lam, coef, vjp.dy)
        self.lam = lam
        self.mu = None if vjp.dfirst is None else _axpy(torch.zeros_like(vjp.dfirst), coef, vjp.dfirst)
        self.read = [r or g is not None for r, g in zip(self.read, vjp.dparams)]
        pairs = [(s, g) for s, g in zip(self.sums, vjp.dparams) if g is not None]
        if pairs and isinstance(coef, float):
            add_scaled_([s for s, _ in pairs], [g for _, g in pairs], coef)
        else:
            for s, g in pairs:
                _axpy(s, coef, g, inplace=True)
        if vjp.dot is not None:
            dot = vjp.dot
            g0 = _scaled(coef, vjp.dt0, dot)
            g1 = _scaled(coef, vjp.dt1, dot)
            self.time_terms.append((m, g0 - dot, g1 + dot))
            for j, g in vjp.dout:
                if g is not None:
                    term = _scaled(coef, g, g)
                    self.out_time[j] = self.out_time[j] + term if j in self.out_time else term

    def add_node_output(self, g: torch.Tensor) -> None:
        """``lam += dL/dy_n`` for an output read off the node the adjoint has reached."""
        self.lam = self.lam + g

    def snapshot(self) -> tuple:
        return (self.lam, self.mu, [s.clone() for s in self.sums], len(self.time_terms), dict(self.out_time))

    def restore(self, snap: tuple) -> None:
        self.lam, self.mu, self.sums, n_terms, self.out_time = snap[0], snap[1], snap[2], snap[3], dict(snap[4])
        del self.time_terms[n_terms:]


def _scaled(coef: float | torch.Tensor, g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if g is None:
        return torch.zeros_like(like)
    return g * (coef.to(g.dtype) if isinstance(coef, torch.Tensor) else coef)


def add_scaled_(xs: list[torch.Tensor], gs: list[torch.Tensor], alpha: float) -> None:
    """``xs[i] += alpha * gs[i]`` in place, as one fused call where torch offers it.

    The one place mpnode calls torch's ``_foreach_add_`` (a private API that ``torch.optim`` uses; one kernel
    launch per dtype and device instead of one per tensor); where it is missing, one ``add_`` per tensor.
    """
    foreach = getattr(torch, "_foreach_add_", None)
    if foreach is None:
        for x, g in zip(xs, gs):
            x.add_(g, alpha=alpha)
    else:
        foreach(xs, gs, alpha=alpha)


def _axpy(x: torch.Tensor, a: float | torch.Tensor, g: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``x + a * g`` in ``x``'s dtype; ``a`` a host float (fused) or a 0-dim device tensor."""
    if not isinstance(a, torch.Tensor):
        return x.add_(g, alpha=a) if inplace else torch.add(x, g.to(x.dtype), alpha=a)
    a = a.to(x.dtype)
    return x.add_(a * g) if inplace else x + a * g


@dataclass
class AdjointResult:
    """Gradients of one backward pass: ``lam0`` ``(D,)``, parameter sums, grid ``(N+1,)`` and output-time grads."""

    lam0: torch.Tensor
    param_grads: list[torch.Tensor]
    grid_grad: torch.Tensor | None
    out_time: dict[int, torch.Tensor]


def run_adjoint(
    plan: BackwardPlan,
    source: BackwardSteps,
    grad_outputs: torch.Tensor,
    scaling: AdjointScaling,
) -> AdjointResult:
    """Walk the steps from last to first in blocks, as the scaling policy accepts them.

    ``grad_outputs`` is ``dL/d outputs`` ``(T, D)``.  ``source`` gives each step's
    graph and start state.  Counters go to
    ``plan.problem.counters``; callbacks ``*_adjoint`` are called per step.
    """
    prob, traj = plan.problem, plan.trajectory
    f, counters, cb = prob.field, prob.counters, prob.callbacks
    state_dtype = prob.policy.state_dtype
    placement = traj.placement
    n_steps = traj.n_steps
    g = grad_outputs.to(state_dtype)
    lam = torch.zeros_like(g[0])
    for j in placement.at_node.get(n_steps, ()):
        lam = lam + g[j]
    acc = AdjointAccumulator(lam, plan.params)
    nfe0 = f.nfe
    scaling_pass = scaling.begin(g, n_steps)
    block = scaling_pass.block_size
    n = n_steps
    with torch.enable_grad(), prob.policy.autocast(), source.session():
        while n > 0:
            lo = 0 if block is None else max(0, n - block)
            snap = acc.snapshot() if block is not None else None
            scaling_snap = scaling_pass.snapshot() if block is not None else None
            for m in range(n - 1, lo - 1, -1):
                _adjoint_step(plan, source, m, acc, g, scaling_pass)
            accepted = scaling_pass.end_block(lo, n)
            name = "callback_accept_step_adjoint" if accepted else "callback_reject_step_adjoint"
            if cb.wants(name):
                for m in range(n - 1, lo - 1, -1):
                    cb.call(name, traj.grid[m], source.state(m), traj.steps[m], traj.grid.dtype)
            if accepted:
                counters.backward_steps += n - lo
                n = lo
            else:  # only a pass with blocks rejects one, so the snapshots were taken
                assert snap is not None
                acc.restore(snap)
                scaling_pass.restore(scaling_snap)
                counters.retries += n - lo
    if plan.known is None and n_steps:
        _refuse_unread_non_leaves(plan.params, acc.read)
    grid_grad = _grid_gradient(acc, traj) if plan.need_times else None
    scaling_pass.end([acc.lam, *acc.sums] + ([grid_grad] if grid_grad is not None else []))
    counters.nfe_backward += f.nfe - nfe0
    counters.host_syncs += scaling_pass.host_syncs
    return AdjointResult(acc.lam, acc.sums, grid_grad, acc.out_time)


def _adjoint_step(plan: BackwardPlan, source: BackwardSteps, m: int, acc: AdjointAccumulator, g: torch.Tensor,
                  scaling: ScalingPass) -> None:
    traj, cb = plan.trajectory, plan.problem.callbacks
    if cb:
        cb.call("callback_step_adjoint", traj.grid[m], source.state(m).to(plan.problem.policy.state_dtype),
                traj.steps[m], traj.grid.dtype)
    inside = [(j, x, g[j]) for j, x in traj.placement.in_step.get(m, ())]
    graph = source.graph(m, with_end_slope=bool(inside) and plan.problem.output_rule.needs_end_slope)
    if plan.frontier is not None:
        _refuse_untracked(graph, plan.frontier)
    # the scale sees every seed of the VJP: an output interpolated in the step is seeded like the adjoint (the last
    # step of an adaptive solve starts from lam = 0 and its output's gradient alone)
    seeds = acc.lam if not inside else torch.stack([acc.lam, *(gj for _, _, gj in inside)])
    scale = scaling.scale(seeds)
    # acc.mu is the adjoint of step m+1's first stage when that step inherited it from this one, else None
    vjp = step_graph_vjp(plan, m, graph, acc.lam, acc.mu, inside, scale,
                         retain_graph=source.retain_graphs and (plan.retain_graph or scaling.block_size is not None))
    coef = traj.steps[m] if scale is None else scale.double().reciprocal() * traj.steps[m]  # h / S
    scaling.observe(m, seeds, scale, [x for x in (vjp.dy, *vjp.dparams, vjp.dfirst) if x is not None])
    direct = None
    for _, _, gj in inside:
        direct = gj if direct is None else direct + gj
    acc.add_step(m, vjp, coef, direct)
    for j in traj.placement.at_node.get(m, ()):
        acc.add_node_output(g[j])


def _shapes(tensors: Sequence[torch.Tensor]) -> str:
    """``"(2, 3), (4,)"``: the shapes of ``tensors``, for messages naming them."""
    return ", ".join(str(tuple(p.shape)) for p in tensors)


def _refuse_unread_non_leaves(params: Sequence[torch.Tensor], read: Sequence[bool]) -> None:
    """Raise if a listed ``adjoint_params`` tensor computed from others (a non-leaf) was read by no step: its
    gradient is zero, and the tensors it was computed from, which it exists to pass gradients on to, get none."""
    unread = [p for p, r in zip(params, read) if not r and not p.is_leaf]
    if unread:
        shapes = _shapes(unread)
        raise ValueError(
            f"odeint: {len(unread)} tensor(s) in adjoint_params (shapes {shapes}) are computed from other tensors "
            "(non-leaf, e.g. w * 1 or w.to(...)) and func never reads them, so they would get a zero gradient and "
            "nothing would reach the tensors they come from. List the tensors func reads (adjoint_params=(w,), not "
            "a copy of w), or have func read the listed tensor. No gradient was written."
        )


def _grid_gradient(acc: AdjointAccumulator, traj: Trajectory) -> torch.Tensor:
    grid = traj.grid
    out = torch.zeros_like(grid)
    if acc.time_terms:
        idx = torch.tensor([m for m, _, _ in acc.time_terms], device=grid.device)
        out.index_add_(0, idx, torch.stack([a.to(grid.dtype) for _, a, _ in acc.time_terms]))
        out.index_add_(0, idx + 1, torch.stack([b.to(grid.dtype) for _, _, b in acc.time_terms]))
    return out


class BackwardSteps:
    """Where one backward pass gets each step's graph and start state: from the adjoint strategy that kept the
    forward's steps (``strategy.step_graph`` / ``strategy.start_state``), which reads ``saved`` (what it kept) and
    may use this object's helpers to rebuild a step.

    Attributes:
        strategy: the strategy that kept the steps.
        saved: what it kept, as its reader returned it for this pass.
        plan: the constants of the pass.
        replay: the forward's random states, watched buffers and module modes.
        retain_graphs: the graphs are kept from the forward (VJPs must retain them while a scaled block may still
            be redone).
        cache: the strategy's scratch space for this pass (e.g. a segment's recomputed states).
    """

    def __init__(self, strategy: AdjointStrategy, saved: Any, plan: BackwardPlan, replay: Replay) -> None:
        self.strategy, self.saved, self.plan, self.replay = strategy, saved, plan, replay
        self.retain_graphs = strategy.retains_graphs
        self.cache: dict[int, Any] = {}

    @property
    def trajectory(self) -> Trajectory:
        return self.plan.trajectory

    def graph(self, n: int, with_end_slope: bool) -> StepGraph:
        graph = self.strategy.step_graph(self.saved, self, n, with_end_slope)
        if not isinstance(graph, StepGraph):
            raise TypeError(f"{type(self.strategy).__name__}.step_graph returned {type(graph).__name__} for step {n}; "
                            "it must return a StepGraph, e.g. steps.rebuild(n, y, first, with_end_slope)")
        if with_end_slope and graph.end_slope is None:
            raise TypeError(
                f"{type(self.strategy).__name__}.step_graph(saved, steps, n={n}, with_end_slope=True) returned a graph "
                "without the end slope f(t_n+1, y_n+1) that the cubic outputs need; pass with_end_slope on: "
                "steps.rebuild(n, y, first, with_end_slope)"
            )
        return graph

    def state(self, n: int) -> torch.Tensor:
        """Step ``n``'s start state as stored, or as recomputed from a stored one (for callbacks)."""
        return self.strategy.start_state(self.saved, self, n)

    def session(self) -> contextlib.AbstractContextManager:
        """The context around the whole pass ([`Replay.session`][mpnode.core.replay.Replay.session])."""
        return self.replay.session()

    # -- for strategies that rebuild steps -------------------------------------------------------------

    def rebuild(self, n: int, y: torch.Tensor, first: torch.Tensor | None, with_end_slope: bool) -> StepGraph:
        """Step ``n``'s graph evaluated again from its start state ``y`` and carried first stage ``first`` (as
        stored, any dtype), with the forward's random state for the step and the tensors the forward read checked
        ([`Replay.recomputing`][mpnode.core.replay.Replay.recomputing]).

        ``first`` is the step's carried first stage exactly when the forward carried one
        ([`FirstStageMode.CARRIED`][mpnode.core.contracts.FirstStageMode]: what ``saved.first_stage(n)`` of the
        built-in checkpoints returns), else ``None``; a mismatch raises ``ValueError``.  A first stage the forward
        reused from the previous step (first-same-as-last methods) is evaluated again without a graph and enters as
        an input, as in a kept graph: its gradient reaches the previous step's last stage (``mu``), so every
        strategy takes the same vector-Jacobian products."""
        _check_first_stage(self.strategy, self.trajectory, n, first)
        self.replay.before_step(n)
        problem = self.plan.problem
        with self.replay.recomputing(problem.field, n):
            if first is None and self.trajectory.first_stage[n] is FirstStageMode.REUSED:
                with torch.no_grad():
                    first = problem.field(self.plan.stage_times[n][0], y.to(problem.policy.state_dtype))
            return build_step_graph(self.plan, n, y, first, with_end_slope)

    def rerun(self, start: int, stop: int, y: torch.Tensor,
              first: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The start states (and carried first stages) of steps ``start .. stop-1``, re-run without a graph from
        step ``start``'s stored ones ([`rerun`][mpnode.core.march.rerun])."""
        dtype = self.plan.problem.policy.state_dtype
        with torch.no_grad():
            return rerun(self.plan.problem, self.trajectory, self.plan.stage_times, start, stop, y.to(dtype),
                         None if first is None else first.to(dtype), before_step=self.replay.before_step)


def _check_first_stage(strategy: AdjointStrategy, trajectory: Trajectory, n: int, first: torch.Tensor | None) -> None:
    """Raise unless ``first`` is given exactly for a step whose first stage the forward carried."""
    carried = trajectory.first_stage[n] is FirstStageMode.CARRIED
    if carried != (first is not None):
        raise ValueError(
            f"{type(strategy).__name__}: steps.rebuild(n={n}, ...) got first="
            + ("None, but this step's first stage was carried from the previous step (methods that reuse their "
               "last stage without being first-same-as-last: adaptive_heun, fehlberg2, reuse_last_stage "
               "tableaux); keep it with the state and pass it, e.g. saved.first_stage(n) of the built-in "
               "checkpoints, which keep it" if carried else
               "a tensor, but this step evaluates its own first stage; pass first=None (saved.first_stage(n) "
               "of the built-in checkpoints is None there)")
            + " (docs/strategies.md, 'Your own strategy')"
        )


def _refuse_untracked(graph: StepGraph, known: KnownTensors) -> None:
    """Raise if the recomputed step depends on grad-requiring tensors the solve does not differentiate.

    Checked at every step (a tensor may be used on part of the trajectory only),
    before any gradient is returned.
    """
    roots = [*graph.stages.ks, *([graph.end_slope] if graph.end_slope is not None else [])]
    lost = known.untracked(roots, graph.leaves())
    if lost and known.computed_from(lost):
        raise RuntimeError(
            f"odeint: func now reads a tensor computed from the same {len(lost)} grad-requiring tensor(s) (shapes "
            f"{_shapes(lost)}) as a tensor it read in this solve's forward pass, "
            "but not that tensor: a captured variable, attribute or global was rebound between the solve and its "
            "backward (e.g. a lambda made in a loop reads the loop's latest variable, not the one of its solve), "
            "and adjoint_params would not help; " + REPLACED_TENSOR_FIXES
        )
    if lost:
        shapes = _shapes(lost)
        raise ValueError(
            f"odeint: func uses {len(lost)} tensor(s) that require grad but are not differentiated (shapes {shapes}), "
            "so their gradients would be lost. Pass every tensor that needs a gradient as "
            "odeint(..., adjoint_params=(...)) (include the module's parameters), or detach those that do not "
            "(tensor.detach(), or parameter.requires_grad_(False)). Without adjoint_params odeint differentiates the "
            "tensors func uses at its first evaluation, so a tensor first used later in the solve must be listed. "
            "(If it replaced a tensor the forward pass read, e.g. an attribute or global set to the next batch's "
            "encoding before this backward, call backward() before replacing it, or use adjoint=DirectAdjoint().) "
            "No gradient was written."
        )
