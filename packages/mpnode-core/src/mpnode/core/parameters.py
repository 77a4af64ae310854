"""Which tensors receive gradients from a solve."""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def gradient_targets(func: Callable, adjoint_params: Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
    """The tensors whose gradients the backward pass computes.

    ``adjoint_params`` when given, else the parameters of ``func`` when it is an
    ``nn.Module``, else none; duplicates and tensors with ``requires_grad=False``
    (frozen parameters) are dropped.
    """
    if adjoint_params is None:
        candidates = list(func.parameters()) if isinstance(func, torch.nn.Module) else []
    else:
        candidates = list(adjoint_params)
        for p in candidates:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"adjoint_params must contain tensors, got {type(p).__name__}")
    seen: set[int] = set()
    out = []
    for p in candidates:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def untracked_inputs(out: torch.Tensor, targets: list[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors requiring grad that ``out``'s graph reaches without passing a target.

    Walks ``out.grad_fn`` back to its leaves, stopping at the targets (leaf or
    not).  A non-empty result means ``func`` closes over a tensor whose
    gradient would be lost.
    """
    target_ids = {id(p) for p in targets}
    target_nodes = {p.grad_fn for p in targets if p.grad_fn is not None}
    found: dict[int, torch.Tensor] = {}
    stack = [out.grad_fn]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in target_nodes:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            if id(variable) not in target_ids:
                found[id(variable)] = variable
            continue
        stack.extend(fn for fn, _ in node.next_functions)
    return list(found.values())
