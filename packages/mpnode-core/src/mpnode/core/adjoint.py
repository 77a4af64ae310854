"""The autograd Function: forward steps without a graph, backward by recomputation.

Forward (under ``torch.no_grad``) stores one checkpoint per step, the state
``y_n`` rounded to ``checkpoint_dtype``.  Backward walks the steps from last
to first, rebuilds each step from its checkpoint with autograd enabled, and
applies the discrete adjoint recurrence (DESIGN.md section 2)::

    v          = S * lam_{n+1}
    gy, g_th   = VJP of Phi(tau_n, tau_{n+1}, y_n) with seed v
    lam_n      = lam_{n+1} + (h / S) * gy  (+ dL/dy_n when y_n is an output)
    grad_th   += (h / S) * g_th
    grad_tau_{n+1} += lam_{n+1}.Phi + (h / S) * dPhi/dtau_{n+1}
    grad_tau_n     += -lam_{n+1}.Phi + (h / S) * dPhi/dtau_n

with ``y_{n+1} = y_n + h Phi`` and ``h = tau_{n+1} - tau_n``.  ``lam`` and all
sums are kept in high precision; only the vector field runs under autocast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

from .parameters import untracked_inputs
from .precision import PrecisionPolicy
from .scaling import AdjointScaling
from .state import FlatVectorField
from .stats import SolverStats
from .stepper import rk_increment, stage_time_table
from .tableau import ButcherTableau


@dataclass
class SolveConfig:
    """Everything forward and backward share besides the differentiable inputs."""

    field: FlatVectorField
    tableau: ButcherTableau
    policy: PrecisionPolicy
    nodes: tuple[int, ...]
    steps: list[float]  # step sizes h_n = tau_{n+1} - tau_n on the host, computed in forward
    params: Sequence[torch.Tensor]
    scaling: AdjointScaling
    stats: SolverStats | None
    keep_checkpoints: bool = True  # False for inference (no input needs a gradient)


class MixedPrecisionRK(torch.autograd.Function):
    """``apply(cfg, grid, y0, *params) -> (len(cfg.nodes), D)`` states at ``cfg.nodes``.

    Inputs: ``grid`` the ``N+1`` step nodes (float32/64), ``y0`` the flat
    ``(D,)`` initial state (float32/64), ``params`` the tensors ``func`` uses
    that need gradients.  Saved for backward: ``grid`` and the ``(N, D)``
    checkpoints in ``cfg.policy.checkpoint_dtype``; nothing per stage.
    """

    @staticmethod
    def forward(ctx, cfg: SolveConfig, grid: torch.Tensor, y0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        n_steps = grid.shape[0] - 1
        rows = {n: r for r, n in enumerate(cfg.nodes)}
        ckpt_rows = n_steps if cfg.keep_checkpoints else 0
        ckpt = torch.empty((ckpt_rows, y0.shape[0]), dtype=cfg.policy.checkpoint_dtype, device=y0.device)
        out = torch.empty((len(cfg.nodes), y0.shape[0]), dtype=y0.dtype, device=y0.device)
        f, tab = cfg.field, cfg.tableau
        nfe0 = f.nfe
        steps = cfg.steps
        times = stage_time_table(tab, grid, cfg.policy.state_dtype)
        y = y0
        with cfg.policy.autocast():
            for n in range(n_steps):
                if ckpt_rows:
                    ckpt[n].copy_(y)
                if n in rows:
                    out[rows[n]].copy_(y)
                phi = rk_increment(tab, f, grid[n], grid[n + 1], y, h=steps[n], stage_times=times[n])
                y = torch.add(y, phi, alpha=steps[n])
        out[rows[n_steps]].copy_(y)
        if cfg.stats is not None:
            cfg.stats.steps += n_steps
            cfg.stats.nfe_forward += f.nfe - nfe0
        ctx.cfg = cfg
        ctx.save_for_backward(grid, ckpt)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nodes: torch.Tensor):
        cfg: SolveConfig = ctx.cfg
        grid, ckpt = ctx.saved_tensors
        need_grid, need_y0 = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        params = [cfg.params[i] for i in wanted]
        grads = _adjoint_recurrence(cfg, grid, ckpt, grad_nodes, params, need_grid)
        lam, param_sums, grid_grad = grads
        out_params: list[torch.Tensor | None] = [None] * len(cfg.params)
        for i, g in zip(wanted, param_sums):
            out_params[i] = g
        return (None, grid_grad, lam if need_y0 else None, *out_params)


def _adjoint_recurrence(
    cfg: SolveConfig,
    grid: torch.Tensor,
    ckpt: torch.Tensor,
    grad_nodes: torch.Tensor,
    params: list[torch.Tensor],
    need_grid: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """Run the backward recurrence; returns ``(lam_0, param grads, grid grad)``.

    The step sizes come from ``cfg.steps`` (host floats), so the unscaled
    recurrence needs no device-to-host transfer.
    """
    f, tab, policy, scaling, stats = cfg.field, cfg.tableau, cfg.policy, cfg.scaling, cfg.stats
    steps = cfg.steps
    n_steps = ckpt.shape[0]
    direct = {n: grad_nodes[r] for r, n in enumerate(cfg.nodes)}
    state_dtype = policy.state_dtype
    lam = direct[n_steps].to(state_dtype, copy=True)
    sums = [torch.zeros_like(p) for p in params]
    time_terms: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (m, d/dtau_m, d/dtau_{m+1})
    nfe0, syncs0 = f.nfe, scaling.host_syncs
    block = scaling.block_size
    times = None if need_grid else stage_time_table(tab, grid, state_dtype)
    scaling.begin(lam, n_steps)
    n = n_steps
    with torch.enable_grad(), policy.autocast():
        while n > 0:
            lo = 0 if block is None else max(0, n - block)
            if block is not None:
                snap = (lam, [s.clone() for s in sums], len(time_terms), scaling.snapshot())
            for m in range(n - 1, lo - 1, -1):
                y = ckpt[m].detach().to(state_dtype).requires_grad_(True)
                t0 = grid[m].detach().requires_grad_(need_grid)
                t1 = grid[m + 1].detach().requires_grad_(need_grid)
                if need_grid:
                    phi = rk_increment(tab, f, t0, t1, y)
                else:
                    phi = rk_increment(tab, f, t0, t1, y, h=steps[m], stage_times=times[m])
                if m == n_steps - 1:
                    _refuse_untracked(phi, [y, t0, t1, *cfg.params])
                scale = scaling.scale(lam)
                inputs = [y, *params, *((t0, t1) if need_grid else ())]
                seed = lam if scale is None else lam * scale
                vjp = torch.autograd.grad(phi, inputs, grad_outputs=seed, allow_unused=True)
                coef = steps[m] if scale is None else (t1 - t0).detach() / scale  # h / S
                if need_grid:
                    dot = (lam * phi.detach()).sum().to(grid.dtype)
                    g0, g1 = (g if g is not None else torch.zeros_like(t0) for g in vjp[-2:])
                    time_terms.append((m, coef * g0 - dot, coef * g1 + dot))
                scaling.observe(m, lam, scale, [g for g in vjp if g is not None])
                if vjp[0] is not None:
                    lam = _axpy(lam, coef, vjp[0])
                pairs = [(s, g) for s, g in zip(sums, vjp[1 : 1 + len(params)]) if g is not None]
                if pairs and isinstance(coef, float):
                    torch._foreach_add_([s for s, _ in pairs], [g for _, g in pairs], alpha=coef)
                else:
                    for s, g in pairs:
                        _axpy(s, coef, g, inplace=True)
                if m in direct:
                    lam = lam + direct[m]
            if scaling.end_block(lo, n):
                if stats is not None:
                    stats.backward_steps += n - lo
                n = lo
            else:
                lam, sums, n_terms, scaling_snap = snap
                del time_terms[n_terms:]
                scaling.restore(scaling_snap)
                if stats is not None:
                    stats.retries += n - lo
    grid_grad = None
    if need_grid:
        grid_grad = torch.zeros_like(grid)
        if time_terms:
            # terms were appended for m = n_steps-1, ..., 0 (rejected blocks are truncated)
            idx = torch.arange(n_steps - 1, -1, -1, device=grid.device)
            grid_grad.index_add_(0, idx, torch.stack([a for _, a, _ in time_terms]))
            grid_grad.index_add_(0, idx + 1, torch.stack([b for _, _, b in time_terms]))
    scaling.end([lam, *sums] + ([grid_grad] if grid_grad is not None else []))
    if stats is not None:
        stats.nfe_backward += f.nfe - nfe0
        stats.host_syncs += scaling.host_syncs - syncs0
    return lam, sums, grid_grad


def _axpy(x: torch.Tensor, a: float | torch.Tensor, g: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``x + a * g`` in ``x``'s dtype; ``a`` a host float (fused) or a 0-dim device tensor."""
    if isinstance(a, float):
        return x.add_(g, alpha=a) if inplace else torch.add(x, g, alpha=a)
    a = a.to(x.dtype)
    return x.add_(a * g) if inplace else x + a * g


def _refuse_untracked(phi: torch.Tensor, known: list[torch.Tensor]) -> None:
    """Raise if the recomputed step depends on grad-requiring tensors odeint was not given."""
    lost = untracked_inputs(phi, known)
    if lost:
        shapes = ", ".join(str(tuple(p.shape)) for p in lost)
        raise ValueError(
            f"odeint: func uses {len(lost)} tensor(s) that require grad but are not differentiated (shapes {shapes}), "
            "so their gradients would be lost. Pass every tensor that needs a gradient as "
            "odeint(..., adjoint_params=(...)) (include the module's parameters), or detach those that do not."
        )
