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
* [`FirstReads`][mpnode.core.guards.FirstReads]: a recomputation reads whatever ``func``'s modules and closures
  hold *when backward runs*; a tensor *replaced* in between (``f.context = x2`` before the backward of a loss that
  also holds a solve made with ``x1``) has no version counter to trip, so the tensors the forward's first
  evaluation read are held and the recomputation is checked against them.
* [`check_solution`][mpnode.core.guards.check_solution]: the forward's one end-of-solve host check (finite
  solution), made by each strategy before it commits the solve's counters.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from .parameters import CapturedTensorProbe
from .precision import PrecisionPolicy, tensors_in
from .state import FlatVectorField


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


#: The fixes named when a recomputation would read another tensor than the forward did.
REPLACED_TENSOR_FIXES = (
    "the backward pass recomputes the steps with what func reads now, so the gradient would belong to another "
    "problem. Call backward() before replacing the tensor (e.g. one backward per solve), give each solve its own "
    "tensor (odeint(functools.partial(f, context=x), ...) or a closure over a variable that is not reassigned, "
    "instead of an attribute set before each solve), or use adjoint=DirectAdjoint(), which keeps the forward's "
    "graphs and needs no recomputation. No gradient was written."
)


class FirstReads:
    """The tensors the forward's first evaluation of ``func`` read without creating or receiving them (parameters,
    buffers, captured constants, a module's context attribute), held until the backward pass.

    * [`check_bindings`][mpnode.core.guards.FirstReads.check_bindings] (before the first recomputed step): every
      attribute, parameter or buffer of the modules the solve saw that held one of them after the forward still
      holds it (a loop over the modules' attributes; names the attribute);
    * [`watch`][mpnode.core.guards.FirstReads.watch] (around the recomputation of step 0, whose first stage is
      the forward's first evaluation again, at the same time and state): that evaluation runs through a
      [`CapturedTensorProbe`][mpnode.core.parameters.CapturedTensorProbe] and must read every one of them
      (catches a rebound closure cell or global; the probe's Python overhead on one evaluation per backward).

    A replacement with equal values and no gradient (a tensor made afresh per call, e.g. by ``torch.from_numpy``)
    is accepted.  Python numbers (``f.beta = 2.0``) are not tensors and are not seen.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], modules: Iterable[torch.nn.Module],
                 first: tuple[Any, Any, Any] | None = None) -> None:
        self.tensors = list(tensors)
        self.bindings = list(_bindings(modules, {id(x) for x in self.tensors}))
        self.first = first  # the forward's first evaluation: (t, y, output)
        self.pending = True  # check_bindings still to run in this backward pass
        self.replaced: list[str] = []  # the rebound attributes that held a tensor without gradient

    def start_pass(self) -> None:
        """A backward pass begins: check the bindings again before its first recomputed step."""
        self.pending = True

    def check_bindings(self) -> None:
        """Raise if a module attribute that held one of the grad-requiring tensors now holds another (once per
        pass); one that held a tensor without gradient is noted for [`watch`][mpnode.core.guards.FirstReads.watch],
        which refuses it only if the output of the first evaluation changed."""
        if not self.pending:
            return
        self.replaced = []
        for module, entries, name, old in self.bindings:
            now = entries.get(name)
            if now is not old and not _same_constant(now, old):
                what = (f"{type(module).__name__}.{name} (a tensor of shape {tuple(old.shape)} that func read in this "
                        f"solve's forward pass) was replaced by "
                        f"{'another tensor' if isinstance(now, torch.Tensor) else repr(now)} before its backward pass")
                if old.requires_grad:
                    raise RuntimeError(f"odeint: {what}; " + REPLACED_TENSOR_FIXES)
                self.replaced.append(what)
        self.pending = False

    @contextlib.contextmanager
    def watch(self, field: FlatVectorField, reset: Callable[[], None]) -> Iterator[None]:
        """Around the recomputation of step 0: its first evaluation of ``func`` must read every held tensor, or
        (tensors without gradient) give the forward's output again; ``reset()`` sets step 0's replayed state."""
        field.next_call_hook = functools.partial(self._compare, reset=reset)
        try:
            yield
        finally:
            field.next_call_hook = None

    def _compare(self, func: Callable, t: torch.Tensor, y: Any, reset: Callable[[], None]) -> Any:
        probe = CapturedTensorProbe()
        out = probe(func, t, y)
        reads = probe.reads()
        seen, held = {id(x) for x in reads}, {id(x) for x in self.tensors}
        fresh = [x for x in reads if id(x) not in held]
        missing = [x for x in self.tensors if id(x) not in seen and not any(_same_constant(z, x) for z in fresh)]
        if not missing and not self.replaced:
            return out
        if not any(x.requires_grad for x in missing) and self._same_output(func, t, y, out, reset):
            return out if self.first is None or _same_input(self.first, t, y) else _again(func, t, y, reset)
        if self.replaced:
            raise RuntimeError("odeint: " + "; ".join(self.replaced) + ", and func's output changed; "
                               + REPLACED_TENSOR_FIXES)
        shapes = ", ".join(str(tuple(x.shape)) for x in missing)
        instead = ", ".join(str(tuple(x.shape)) for x in fresh) or "none"
        raise RuntimeError(
            f"odeint: func read other tensors when backward recomputed its first evaluation than in the forward "
            f"pass: {len(missing)} tensor(s) it read then (shapes {shapes}) were not read now (new ones read "
            f"instead: {instead}), e.g. a module attribute, captured variable or global set to another tensor "
            "between this solve and its backward, or one a callback sets (callback_step and the other callbacks do "
            "not run while backward recomputes steps, so func sees what the last callback left); "
            + REPLACED_TENSOR_FIXES
        )

    def _same_output(self, func: Callable, t: torch.Tensor, y: Any, out: Any, reset: Callable[[], None]) -> bool:
        """Whether the recomputation's first evaluation gives the forward's output at the forward's input (evaluated
        once more there when the recomputation starts from a rounded checkpoint)."""
        if self.first is None:
            return False
        t0, y0, out0 = self.first
        if not _same_input(self.first, t, y):
            reset()
            with torch.no_grad():
                out = func(t0, y0)
        return _same_tensors(out, out0)


def _same_input(first: tuple[Any, Any, Any], t: torch.Tensor, y: Any) -> bool:
    return _same_tensors((first[0], first[1]), (t, y))


def _same_tensors(a: Any, b: Any) -> bool:
    xs, ys = list(tensors_in(a)), list(tensors_in(b))
    return len(xs) == len(ys) and all(x.shape == z.shape and x.dtype == z.dtype and bool(torch.equal(x.detach(), z))
                                      for x, z in zip(xs, ys))


def _again(func: Callable, t: torch.Tensor, y: Any, reset: Callable[[], None]) -> Any:
    """The recomputation's first evaluation once more, from step 0's replayed state (a check evaluation ran)."""
    reset()
    return func(t, y)


def _bindings(modules: Iterable[torch.nn.Module],
              ids: set[int]) -> Iterator[tuple[torch.nn.Module, dict[str, Any], str, torch.Tensor]]:
    """``(module, entries, name, tensor)`` for each attribute, parameter or buffer of ``modules`` and their
    submodules that holds a tensor whose id is in ``ids``; ``entries`` is the dict it lives in (the module's
    ``__dict__``, ``_parameters`` or ``_buffers``: what ``module.name = ...`` rebinds).  Each module once."""
    seen: set[int] = set()
    for top in modules:
        for m in top.modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            attributes = vars(m)
            for entries in (attributes, attributes.get("_parameters", {}), attributes.get("_buffers", {})):
                yield from ((m, entries, k, v) for k, v in entries.items() if id(v) in ids)


def _same_constant(now: object, old: torch.Tensor) -> bool:
    """``now`` is a tensor without gradient equal to ``old`` (also without gradient): replacing one by the other
    changes nothing the backward pass computes."""
    return (isinstance(now, torch.Tensor) and not now.requires_grad and not old.requires_grad
            and now.shape == old.shape and now.dtype == old.dtype and now.device == old.device
            and bool(torch.equal(now, old)))


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
