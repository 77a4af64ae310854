"""Which tensors receive gradients from a solve, and the tensors ``func`` uses without saying so.

* [`gradient_targets`][mpnode.core.parameters.gradient_targets]: ``adjoint_params``, or the parameters of an
  ``nn.Module`` func;
* [`reachable_modules`][mpnode.core.parameters.reachable_modules] /
  [`restricted_parameters`][mpnode.core.parameters.restricted_parameters]: modules odeint can see from
  ``func`` and, with ``adjoint_params``, their parameters left out of it (constants);
* [`reachable_grad_tensors`][mpnode.core.parameters.reachable_grad_tensors]: grad-requiring tensors ``func`` may read at
  some
  evaluation, found without running it (so a solve whose output would otherwise have
  no graph keeps one, and backward's per-step check can refuse a tensor first used
  late in the solve);
* [`CapturedTensorProbe`][mpnode.core.parameters.CapturedTensorProbe]: run one evaluation of ``func`` and collect the
  tensors it uses that it did not create and was not given: grad-requiring ones
  (closure-captured tensors, a module's context attribute, ...) and the others with
  their version counters (frozen parameters, buffers, captured constants);
* [`KnownTensors`][mpnode.core.parameters.KnownTensors]: the grad-requiring leaves a recomputed step's graph
  reaches that the solve does not differentiate (checked at every step).
"""

from __future__ import annotations

import functools
import itertools
import threading
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from .precision import tensors_in as _tensors


def gradient_targets(func: Callable, adjoint_params: Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
    """The tensors whose gradients the backward pass computes (before discovery).

    ``adjoint_params`` when given, else the parameters of ``func`` when it is an
    ``nn.Module``, else none; duplicates and tensors with ``requires_grad=False``
    (frozen parameters) are dropped.
    """
    if adjoint_params is None:
        candidates = list(func.parameters()) if isinstance(func, torch.nn.Module) else []
    else:
        if isinstance(adjoint_params, torch.Tensor):
            raise TypeError("adjoint_params must be a tuple or list of tensors, got a tensor; pass (tensor,)")
        candidates = list(adjoint_params)
        for p in candidates:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"adjoint_params must contain tensors, got {type(p).__name__}")
    return _unique_requiring_grad(candidates)


def _unique_requiring_grad(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for p in tensors:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def reachable_modules(func: Callable) -> list[torch.nn.Module]:
    """The modules odeint can see from ``func`` without running it.

    ``func`` itself when it is an ``nn.Module``; the module of a bound method
    (``model.dynamics``); modules held in a closure's cells or in a
    ``functools.partial``'s function and arguments.  Modules reached only through
    globals or deeper references are not seen.
    """
    found: dict[int, torch.nn.Module] = {}
    pending: list[Any] = [func]
    visited: set[int] = set()
    while pending:
        obj = pending.pop()
        if id(obj) in visited:
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            found.setdefault(id(obj), obj)
            continue
        if isinstance(obj, functools.partial):
            pending += [obj.func, *obj.args, *obj.keywords.values()]
            continue
        owner = getattr(obj, "__self__", None)
        if owner is not None and callable(obj):
            pending.append(owner)
        cells = getattr(obj, "__closure__", None) or ()
        for cell in cells:
            try:
                pending.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
    return list(found.values())


def reachable_grad_tensors(func: Callable, exclude: Sequence[torch.Tensor] = (),
                           limit: int = 10_000) -> list[torch.Tensor]:
    """Grad-requiring tensors ``func`` may read, found without running it, minus ``exclude``.

    Looked for (a wider net than [`reachable_modules`][mpnode.core.parameters.reachable_modules], since it only decides
    whether the output keeps a graph): ``func`` itself, a bound method's function and
    object, a ``functools.partial``'s function and arguments, a function's closure
    cells, defaults and the globals its code names, the attributes of other objects
    found (a callable object's ``self.w``), the items of lists, tuples and dicts, and
    of every module its parameters and the tensors among its (and its submodules')
    attributes.  At most ``limit`` objects are visited.
    """
    excluded = {id(x) for x in exclude}
    found: dict[int, torch.Tensor] = {}
    pending: list[Any] = [func]
    visited: set[int] = set()
    while pending and len(visited) < limit:
        obj = pending.pop()
        if id(obj) in visited or isinstance(obj, (type, types.ModuleType, str, bytes, int, float, bool)):
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.requires_grad and id(obj) not in excluded:
                found.setdefault(id(obj), obj)
        elif isinstance(obj, torch.nn.Module):
            pending += [*obj.parameters(), *(v for m in obj.modules() for v in vars(m).values()
                                             if isinstance(v, torch.Tensor))]
        elif isinstance(obj, (list, tuple)):
            pending += itertools.islice(obj, limit)
        elif isinstance(obj, dict):
            pending += itertools.islice(obj.values(), limit)
        elif isinstance(obj, functools.partial):
            pending += [obj.func, *obj.args, *obj.keywords.values()]
        else:
            pending += _references(obj)
    return list(found.values())


def _references(obj: Any) -> list[Any]:
    """What a callable can read: a function's closure cells, defaults and the globals its code names; a bound
    method's function and object; a callable object's attributes."""
    if isinstance(obj, types.MethodType):
        return [obj.__func__, obj.__self__]
    if isinstance(obj, types.FunctionType):
        out: list[Any] = []
        for cell in obj.__closure__ or ():
            try:
                out.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
        out += [*(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values()]
        return out + [obj.__globals__[name] for name in obj.__code__.co_names if name in obj.__globals__]
    try:
        return list(vars(obj).values())
    except Exception:  # no __dict__ (slots, builtins), or an object that refuses: nothing to see through it
        return []


def restricted_parameters(func: Callable, targets: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Parameters of the modules reachable from ``func`` that are not among ``targets``.

    With ``adjoint_params`` given they are constants of the solve (no gradient,
    no error): ``adjoint_params`` restricts which of a module's parameters train.
    """
    target_ids = {id(p) for p in targets}
    params = (p for m in reachable_modules(func) for p in m.parameters())
    return [p for p in _unique_requiring_grad(params) if id(p) not in target_ids]


class CapturedTensorProbe:
    """Collects the grad-requiring tensors one evaluation of ``func`` uses but neither creates nor receives.

    Used as ``FlatVectorField.next_call_hook``: ``probe(func, t, y)`` runs
    ``func(t, y)`` under a ``TorchFunctionMode`` that sees every torch function's
    arguments (``F.linear``'s weight, a closure's ``c`` in ``c * y``, a module's
    context attribute...).  Cost: Python overhead on that one evaluation only.

    Attributes:
        found: the grad-requiring tensors found, in order of first use (leaf or not).
        read: the other captured tensors (frozen parameters, buffers, constants),
            each with its ``_version`` when the evaluation first used it.
        modified: those of ``read`` that the evaluation modified in place
            (by their version counters, e.g. a counter tensor ``func`` increments).
        modules: the modules called during the evaluation (also those ``func``
            reaches through globals), found with a forward pre-hook.
        generators: the ``torch.Generator`` objects passed as ``generator=`` to the evaluation's random ops, each
            with its state before its first draw (``get_state()``).
    """

    def __init__(self) -> None:
        self.found: list[torch.Tensor] = []
        self.read: list[tuple[torch.Tensor, int]] = []
        self.modified: list[torch.Tensor] = []
        self.modules: list[torch.nn.Module] = []
        self.generators: list[tuple[torch.Generator, torch.Tensor]] = []
        self.data_reads: set[int] = set()

    def __call__(self, func: Callable, t: torch.Tensor, y: Any) -> Any:
        mode = _CapturedTensorMode(list(_tensors((t, y))))
        called: dict[int, torch.nn.Module] = {}
        thread = threading.get_ident()

        def seen(module, args):
            if threading.get_ident() == thread:  # the hook is global: ignore other threads' modules
                called.setdefault(id(module), module)

        handle = register_module_forward_pre_hook(seen)
        try:
            with mode:
                out = func(t, y)
        finally:
            handle.remove()
        self.found = list(mode.found.values())
        self.read = list(mode.constants.values())
        self.modified = [x for x, version in self.read if x._version != version]
        self.modules = list(called.values())
        self.generators = list(mode.generators.values())
        self.data_reads = mode.data_reads
        return out

    def reads(self) -> list[torch.Tensor]:
        """The tensors the evaluation used without creating or receiving it, ``found`` then ``read``'s, except those
        only asked for metadata (shape, dtype, device, ...: a lazily sized cache checked and rebuilt)."""
        return [x for x in (*self.found, *(x for x, _ in self.read)) if id(x) in self.data_reads]

    def new_targets(self, known: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The found tensors not already among ``known``."""
        known_ids = {id(p) for p in known}
        return [x for x in self.found if id(x) not in known_ids]

    def unchanged_reads(self) -> list[torch.Tensor]:
        """The tensors of ``read`` still at the version the evaluation first saw: what a recomputation reads
        as the forward did (tensors the forward itself updates, e.g. ``num_batches_tracked``, are left out)."""
        return [x for x, version in self.read if x._version == version]


class _CapturedTensorMode(TorchFunctionMode):
    """Records the tensor arguments not produced inside the evaluation: grad-requiring ones in
    ``found``, the others with their version at first sight in ``constants``; and the ``generator=`` arguments with
    their state before the call that first uses each."""

    def __init__(self, inputs: Sequence[Any]) -> None:
        super().__init__()
        self.keep = [x for x in inputs if isinstance(x, torch.Tensor)]  # alive, so ids stay unique
        self.produced = {id(x) for x in self.keep}
        self.found: dict[int, torch.Tensor] = {}
        self.constants: dict[int, tuple[torch.Tensor, int]] = {}
        self.generators: dict[int, tuple[torch.Generator, torch.Tensor]] = {}
        self.data_reads: set[int] = set()  # ids of the captured tensors used by more than a metadata query

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        generator = kwargs.get("generator")
        if isinstance(generator, torch.Generator) and id(generator) not in self.generators:
            self.generators[id(generator)] = (generator, generator.get_state())
        data = func not in _METADATA
        for x in _tensors((args, kwargs)):
            if id(x) not in self.produced:
                if x.requires_grad:
                    self.found.setdefault(id(x), x)
                elif id(x) not in self.constants:
                    self.constants[id(x)] = (x, x._version)
                if data:
                    self.data_reads.add(id(x))
        out = func(*args, **kwargs)
        for x in _tensors(out):
            if id(x) not in self.found and id(x) not in self.constants:
                self.produced.add(id(x))
                self.keep.append(x)
        return out


#: Tensor properties and methods that read metadata, not values (as torch functions see them).
_METADATA = frozenset(
    [getattr(torch.Tensor, name).__get__ for name in ("shape", "dtype", "device", "ndim", "layout", "is_cuda",
                                                      "requires_grad", "is_leaf")]
    + [getattr(torch.Tensor, name) for name in ("size", "dim", "numel", "nelement", "__len__", "is_floating_point",
                                                "is_complex", "stride", "element_size", "is_contiguous",
                                                "get_device")]
)


def _leaf_node_type() -> type:
    """The type of the autograd node that accumulates into a leaf (``AccumulateGrad``)."""
    grad_fn = torch.zeros(1, requires_grad=True).mul(1).grad_fn
    assert grad_fn is not None
    return type(grad_fn.next_functions[0][0])


_LEAF_NODE = _leaf_node_type()


class KnownTensors:
    """The tensors a solve differentiates or treats as constants, prepared once for many graph walks.

    [`untracked`][mpnode.core.parameters.KnownTensors.untracked] walks the graph edges from each root's ``grad_fn`` back
    to the leaves, stopping at the known tensors (a leaf's accumulator, or a non-leaf's own output edge).  A non-empty
    result means ``func`` uses a tensor whose gradient would be lost.  Cost: one Python visit per graph node, about 14
    us for the four evaluations of an RK4 step of a 3-layer MLP (``benchmarks/trust_overhead.py`` measures it in a whole
    backward pass).
    """

    def __init__(self, known: Sequence[torch.Tensor]) -> None:
        self.ids = {id(p) for p in known}
        self.stop = {(p.grad_fn, p.output_nr) for p in known if p.grad_fn is not None}
        self.computed = [p for p in known if p.grad_fn is not None]  # differentiated non-leaves (an encoding)

    def computed_from(self, leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Those of ``leaves`` that a differentiated non-leaf was computed from: a tensor computed from them that the
        solve does not differentiate most likely replaced that one (a rebound variable or attribute)."""
        ancestors = {id(x) for x in KnownTensors(()).untracked(self.computed)} if self.computed else set()
        return [x for x in leaves if id(x) in ancestors]

    def untracked(self, roots: Sequence[torch.Tensor], extra: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
        """The untracked leaves reachable from ``roots``; ``extra`` are more known leaves (the step's inputs)."""
        ids = self.ids | {id(x) for x in extra} if extra else self.ids
        stop = self.stop
        found: dict[int, torch.Tensor] = {}
        seen: set = set()
        stack: list[tuple[Any, int]] = [(r.grad_fn, r.output_nr) for r in roots if r.grad_fn is not None]
        while stack:
            edge = stack.pop()
            node = edge[0]
            if node is None or node in seen or (stop and edge in stop):
                continue
            seen.add(node)
            if type(node) is _LEAF_NODE:
                leaf = node.variable  # an AccumulateGrad node holds its leaf
                if id(leaf) not in ids:
                    found[id(leaf)] = leaf
                continue
            stack.extend(node.next_functions)
        return list(found.values())
