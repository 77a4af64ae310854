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


class _SaveOne(torch.autograd.Function):
    """Saves exactly the given tensor ``keep`` for backward."""

    @staticmethod
    def forward(ctx, x, keep):
        ctx.save_for_backward(keep)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2, None


def _graph(x, sizes):
    """An output whose graph saves one fresh float32 tensor of each size (a new storage each, from the allocator)."""
    out = x
    for n in sizes:
        out = _SaveOne.apply(out, torch.ones(n))
    return out


def test_a_graph_freed_before_the_measurement_is_not_counted():
    x = torch.ones(2, requires_grad=True)
    with meters.held_memory() as meter:
        kept = _graph(x, [1000])
        dropped = _graph(x, [3000, 500])
        del dropped
        assert meter.bytes == 4000 and meter.peak_bytes == 4000 + 14000
    assert meter.bytes == 4000 and meter.bytes_by_dtype() == {torch.float32: 4000}
    kept.sum().backward()  # frees the graph: the figure stays the one at the end of the block
    assert meter.bytes == 4000 and [s.nbytes for s in meter.storages] == [4000]


def test_the_same_computation_gives_the_same_figure_every_time():
    """Steps whose graphs are dropped (rejected steps) between kept ones: the allocator reuses their addresses at
    will, so a meter keyed by address gave a different figure on each run; only the kept graphs count."""
    x = torch.ones(2, requires_grad=True)

    def solve():
        kept = []
        for n in range(1, 40):
            rejected = _graph(x, [64 * n, 16 * n])
            del rejected
            kept.append(_graph(x, [32 * n]))
        return kept

    figures = []
    for _ in range(3):
        with meters.held_memory() as meter:
            kept = solve()
        figures.append(meter.bytes)
        del kept
    assert figures == [4 * 32 * sum(range(1, 40))] * 3


def test_a_storage_at_a_freed_storage_address_counts_as_itself():
    """Two storages over one buffer, one after the other: the same address, told apart by identity."""
    buf = bytearray(4000)
    x = torch.ones(2, requires_grad=True)
    with meters.held_memory() as meter:
        first = _SaveOne.apply(x, torch.frombuffer(buf, dtype=torch.float32))  # 4000 bytes
        del first  # the graph and the only tensor on that storage go
        second = _SaveOne.apply(x, torch.frombuffer(buf, dtype=torch.int8, count=1000))  # 1000 bytes, same address
    assert meter.bytes == 1000 and meter.bytes_by_dtype() == {torch.int8: 1000}
    del second


def test_exclusion_is_by_storage_not_by_address():
    buf = bytearray(400)
    x = torch.ones(2, requires_grad=True)
    weight = torch.frombuffer(buf, dtype=torch.float32)
    meter = meters.held_memory(exclude=[weight])
    del weight  # its storage goes; a new one takes its address
    with meter:
        out = _SaveOne.apply(x, torch.frombuffer(buf, dtype=torch.float32))
    assert meter.bytes == 400, out.shape


def test_a_meter_and_its_graph_go_without_the_garbage_collector():
    """No reference cycle: what the meter keeps is freed by reference counting alone (a long training loop with
    AutoAdjoint makes one meter per solve)."""
    x, keep = torch.ones(2, requires_grad=True), torch.ones(100)  # ``keep`` outlives the graph that saved it
    gc.disable()
    try:
        meter = meters.held_memory()
        with meter:
            out = _SaveOne.apply(_graph(x, [200]), keep)
        ledger = weakref.ref(meter._forward)
        del meter, out
        assert ledger() is None
    finally:
        gc.enable()


def test_a_meter_entered_again_counts_what_it_packed_before():
    """AutoAdjoint enters its meter once per step."""
    x = torch.ones(2, requires_grad=True)
    meter = meters.held_memory()
    kept = []
    for n in (100, 200):
        with meter:
            kept.append(_graph(x, [n]))
        assert meter.bytes == 4 * sum(k for k in (100, 200) if k <= n)
    kept.pop()
    with meter:
        assert meter.bytes == 400  # live while active


def _saved_storages(root, exclude):
    """Independent count: bytes of the distinct storages saved by the autograd nodes reachable from ``root``."""
    excluded = {id(t.untyped_storage()) for t in exclude}
    seen, stack, found = set(), [root], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in (a for a in dir(node) if a.startswith("_saved_")):
            value = getattr(node, name)
            for x in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(x, torch.Tensor) and id(x.untyped_storage()) not in excluded:
                    found[id(x.untyped_storage())] = x.untyped_storage().nbytes()
        stack += [fn for fn, _ in node.next_functions]
    return sum(found.values())


@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_the_meter_counts_what_the_graph_saves(method):
    """Against a walk of torchdiffeq's graph.  Its field wrapper evaluates ``y.abs()`` at every call and drops the
    result: that saved tensor is freed at once and must not count.  (rk4 is left out: it multiplies by Python numbers,
    which autograd saves as 0-dim tensors without passing them to the hooks.)"""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    torch.manual_seed(0)
    field = testing.MLPField(dim=4, width=8)
    y0 = torch.randn(3, 4, requires_grad=True)
    weights = list(field.parameters())
    with meters.held_memory(exclude=weights) as meter:
        out = torchdiffeq.odeint(field, y0, torch.linspace(0, 1, 9), method=method)
    assert meter.bytes == _saved_storages(out.grad_fn, weights) > 0


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
