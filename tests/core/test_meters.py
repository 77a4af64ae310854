"""mpnode.core.meters: the held-memory meter AutoAdjoint uses, and the private torch APIs it asks."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from mpnode.core import meters, testing


def test_the_private_torch_apis_the_meters_ask_still_answer():
    """Each private API is asked in one function; this fails loudly when a torch upgrade removes one."""
    assert meters.outer_saved_tensors_hooks() is None
    with torch.autograd.graph.save_on_cpu():
        hooks = meters.outer_saved_tensors_hooks()
    assert hooks is not None and all(callable(h) for h in hooks)

    assert not meters.in_backward_pass()
    seen = []
    x = torch.ones(2, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: seen.append(meters.in_backward_pass()))
    y.sum().backward()
    assert seen == [True]


def test_testing_and_bench_re_export_the_core_meter():
    assert testing.HeldMemory is meters.HeldMemory and testing.held_memory is meters.held_memory
    profilers = pytest.importorskip("mpnode.bench.profilers")
    assert profilers.HeldMemory is meters.HeldMemory


@pytest.mark.parametrize("chain", [False, True])
def test_a_metered_graph_is_freed_with_its_last_reference(chain):
    """The pack hook keeps no tensor: a saved output (tanh) returned as itself made node and tensor a cycle gc cannot
    free."""
    w = torch.randn(64, 64, requires_grad=True)
    with meters.held_memory(exclude=[w], chain=chain) as meter:
        out = torch.tanh(torch.ones(8, 64) @ w)
    assert meter.bytes >= out.numel() * out.element_size()
    ref = weakref.ref(out)
    del out
    gc.collect()
    assert ref() is None


def test_chained_meter_hands_tensors_on_to_the_outer_hooks():
    packed = []

    def pack(x):
        packed.append(x.shape)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        with meters.held_memory(chain=True) as meter:
            x = torch.ones(3, requires_grad=True)
            y = (x * x).sum()
    y.backward()
    assert packed and meter.bytes > 0
    assert torch.equal(x.grad, 2 * torch.ones(3))


def test_the_private_torch_api_of_the_gradient_sums_still_answers():
    """backward.add_scaled_ sums the parameters' gradients with torch._foreach_add_ (private API, one launch for all
    of them); without it the sums still come out, one add_ per tensor, but slower on a GPU."""
    from mpnode.core import backward

    assert callable(getattr(torch, "_foreach_add_", None))
    xs, gs = [torch.zeros(2), torch.ones(3)], [torch.ones(2), torch.full((3,), 2.0)]
    backward.add_scaled_(xs, gs, 0.5)
    assert torch.equal(xs[0], torch.full((2,), 0.5)) and torch.equal(xs[1], torch.full((3,), 2.0))
