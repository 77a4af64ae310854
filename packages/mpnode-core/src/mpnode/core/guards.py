"""Checks that turn silent wrong gradients into errors (see docs/guarantees.md).

* [`VersionRecord`][mpnode.core.guards.VersionRecord]: the backward pass recomputes with the *current* values of
  the parameters, the captured tensors and the tensors without gradient that ``func``
  reads (frozen parameters, buffers, constants), so one modified in place between
  forward and backward would silently change the gradient; their ``_version``
  counters are recorded after the forward and compared when backward starts
  (autograd's own check for saved tensors, applied to what the recomputation reads).
* [`first_order_only`][mpnode.core.guards.first_order_only]: the recompute backward is not itself differentiable;
  a second derivative (``create_graph=True``, ``hvp``, ``hessian``) raises instead
  of returning zeros.
* [`refuse_function_transforms`][mpnode.core.guards.refuse_function_transforms]: ``torch.func`` transforms (``vmap``,
  ``grad``,
  ``jacrev``, ...) cannot trace a solve that chooses its steps on the host.
* [`refuse_batched_gradients`][mpnode.core.guards.refuse_batched_gradients]: a batch of output gradients pushed through
  one
  backward pass (``jacobian(..., vectorize=True)``, ``is_grads_batched=True``).
* [`check_solution`][mpnode.core.guards.check_solution]: the forward's one end-of-solve host check (finite
  solution), made by each strategy before it commits the solve's counters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch

from .precision import PrecisionPolicy


class VersionRecord:
    """``(tensor, _version)`` of the tensors a backward pass reads besides its checkpoints."""

    def __init__(self, tensors: Iterable[torch.Tensor | None]) -> None:
        seen: set[int] = set()
        self.entries: list[tuple[torch.Tensor, int]] = []
        for x in tensors:
            if x is not None and id(x) not in seen:
                seen.add(id(x))
                self.entries.append((x, x._version))

    def check(self) -> None:
        """Raise if any recorded tensor was modified in place since it was recorded."""
        for x, version in self.entries:
            if x._version != version:
                raise RuntimeError(
                    f"odeint: a tensor the backward pass recomputes with (shape {tuple(x.shape)}, {x.dtype}; a "
                    f"parameter, a buffer, a tensor func captured, or t) was "
                    f"modified in place after the forward pass (version {x._version}, expected {version}), e.g. by "
                    "optimizer.step() or an in-place op such as mul_() under torch.no_grad(); the gradient would "
                    "belong to the new values. Call backward() before changing it, or change a copy "
                    "(x = x.clone()). No gradient was written."
                )


def first_order_only(backward: Callable) -> Callable:
    """Decorate an autograd Function's ``backward`` (outside ``once_differentiable``) to refuse double backward.

    Autograd runs ``backward`` with grad mode on exactly when the caller asked for a
    differentiable gradient (``create_graph=True``, as ``hvp``, ``hessian`` and
    ``jacobian(create_graph=True)`` do).
    """

    @functools.wraps(backward)
    def guarded(ctx, *grad_outputs):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "odeint: a second derivative was requested (autograd.grad/backward with create_graph=True, "
                "torch.autograd.functional.hvp/hessian, or a gradient penalty), but odeint's backward recomputes each "
                "step and is first-order only; it would return zeros. For second-order quantities differentiate a "
                "solve that keeps its graph (torchdiffeq.odeint with the same method and grid gives the same "
                "first-order numbers), or approximate Hessian-vector products by finite differences of two "
                "first-order gradients: (g(p + eps*v) - g(p - eps*v)) / (2*eps)."
            )
        return backward(ctx, *grad_outputs)

    return guarded


def refuse_function_transforms() -> None:
    """Raise under ``torch.func`` transforms (vmap, grad, jacrev, jvp, ...)."""
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            "odeint cannot run inside torch.func transforms (vmap, grad, jacrev, jacfwd, jvp, hessian): it chooses "
            "and stores its steps on the host and differentiates with its own backward. Batch by putting the batch "
            "into y0 (any shape is one state; a per-sample field sees the whole batch), and take derivatives with "
            "torch.autograd.grad / loss.backward() (per-sample gradients: one backward per sample, or "
            "torch.autograd.functional.jacobian with vectorize=False)."
        )


def refuse_batched_gradients(grad: torch.Tensor) -> None:
    """Raise when ``grad`` is a vmap-batched tensor: autograd asked for a batch of vector-Jacobian products at once.

    The adjoint walks the steps with host decisions (scaling blocks, the scaler's
    checks) and sums gradients in place, which one batched pass cannot do.  The
    batched-tensor test is a private torch API, asked here only.
    """
    functorch = getattr(torch._C, "_functorch", None)
    tests = [getattr(functorch, name, None) for name in ("is_legacy_batchedtensor", "is_batchedtensor")]
    if any(test is not None and test(grad) for test in tests):
        raise RuntimeError(
            "odeint: autograd asked its backward for a batch of gradients at once "
            "(torch.autograd.functional.jacobian(..., vectorize=True) or autograd.grad(..., is_grads_batched=True)); "
            "odeint's backward computes one vector-Jacobian product per pass. Use vectorize=False (jacobian) or "
            "is_grads_batched=False with one autograd.grad(..., retain_graph=True) call per row of the Jacobian."
        )


def check_solution(out: torch.Tensor, policy: PrecisionPolicy) -> None:
    """The end-of-forward check: one host read of ``isfinite(out[-1])``; raises ``FloatingPointError``.

    Strategies call it before committing a forward pass's counters, so a solve that
    blows up adds nothing to ``SolverStats``.
    """
    if bool(torch.isfinite(out[-1].detach()).all()):
        return
    hint = (
        "Under float16 autocast the vector field may overflow: try torch.bfloat16, a smaller "
        "step, or scaling the inputs."
        if policy.autocast_dtype == torch.float16
        else "Check the vector field for blow-up and try a smaller step size."
    )
    raise FloatingPointError("odeint: the solution became inf/NaN. " + hint)
