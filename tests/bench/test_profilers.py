"""Each profiler measured against a case whose answer is known in advance."""

from __future__ import annotations

import time

import pytest
import torch

from mpnode.bench import count_host_syncs, held_memory, peak_memory, profile, time_fn


class _SaveOne(torch.autograd.Function):
    """Saves exactly one given tensor for backward."""

    @staticmethod
    def forward(ctx, x, keep):
        ctx.save_for_backward(keep)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        (_keep,) = ctx.saved_tensors
        return g * 2, None


@pytest.mark.parametrize("dtype, numel", [(torch.float32, 1000), (torch.bfloat16, 4096), (torch.float64, 7)])
def test_held_memory_counts_a_saved_tensor_of_known_size(dtype, numel, device):
    x = torch.randn(3, device=device, requires_grad=True)
    keep = torch.zeros(numel, dtype=dtype, device=device)
    with held_memory() as meter:
        y = _SaveOne.apply(x, keep)
    assert meter.bytes == numel * dtype.itemsize
    assert meter.bytes_by_dtype() == {dtype: numel * dtype.itemsize}
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_held_memory_deduplicates_views_and_excludes(device):
    x = torch.randn(3, device=device, requires_grad=True)
    keep = torch.zeros(100, 10, device=device)
    other = torch.zeros(50, device=device)
    with held_memory(exclude=[other]) as meter:
        outs = [_SaveOne.apply(x, keep),
                _SaveOne.apply(x, keep[3]),  # a view: same storage
                _SaveOne.apply(x, keep.t()),
                _SaveOne.apply(x, other)]  # excluded
    assert meter.bytes == 100 * 10 * 4 and len(outs) == 4  # (counted while the outputs keep their graphs)


def test_held_memory_separates_packs_made_during_backward(device):
    w = torch.randn(64, 64, device=device, requires_grad=True)

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1.0

        @staticmethod
        def backward(ctx, g):
            with torch.enable_grad():
                z = (w @ w).sum()  # packs two 64x64 float32 operands (one storage)
                (gw,) = torch.autograd.grad(z, w)
            return g + gw.sum()

    x = torch.randn(5, device=device, requires_grad=True)
    with held_memory() as meter:
        Recompute.apply(x).sum().backward()
    assert meter.bytes == 0
    if device.type == "cpu":  # CPU backward runs on this thread, where the hooks are installed
        assert meter.recompute_bytes == 64 * 64 * 4
    else:  # device threads see the hooks only if torch propagates them; never as held memory
        assert meter.recompute_bytes in (0, 64 * 64 * 4)


def test_profile_of_forward_and_backward_reports_what_the_forward_held(device):
    x = torch.randn(3, device=device, requires_grad=True)
    keep = torch.zeros(1000, device=device)
    with profile(device, sync_count=False) as rec:
        _SaveOne.apply(x, keep).sum().backward()
    assert rec.held_bytes == 4000  # the most held at once: before backward freed the graph
    assert rec.held is not None and rec.held.bytes == 0  # nothing is held when the region ends


@pytest.mark.parametrize("k", [0, 1, 5])
def test_sync_counter_counts_item_calls_exactly(k, device):
    x = torch.arange(4.0, device=device)
    with count_host_syncs() as syncs:
        y = x * 3 + 1  # no sync
        for _ in range(k):
            y.sum().item()
    assert syncs.count == k


def test_sync_counter_sees_bool_and_float(device):
    x = torch.ones(3, device=device)
    with count_host_syncs() as syncs:
        if bool((x > 0).all()):
            float(x[0])
    assert syncs.count == 2


def test_timer_measures_a_sleep():
    t = time_fn(lambda: time.sleep(0.02), "cpu", warmup=1, repeats=5)
    assert len(t.samples) == 5
    assert 0.019 <= t.min_s <= t.median_s <= t.max_s
    assert t.median_s < 0.2  # generous: a loaded 2-core machine
    assert t.spread_s >= 0


def test_timer_runs_warmup_and_setup(device):
    calls = {"fn": 0, "setup": 0}
    time_fn(lambda: calls.__setitem__("fn", calls["fn"] + 1), device, warmup=2, repeats=3,
            setup=lambda: calls.__setitem__("setup", calls["setup"] + 1))
    assert calls == {"fn": 5, "setup": 5}
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_fn(lambda: None, device, repeats=0)


def test_profile_record_combines_all_measures(device):
    x = torch.randn(3, device=device, requires_grad=True)
    keep = torch.zeros(256, device=device)
    with profile(device) as rec:
        time.sleep(0.03)
        y = _SaveOne.apply(x, keep)
        y.sum().backward()
        y.detach().max().item()
        y.detach().min().item()
    assert rec.time_s >= 0.029
    assert rec.held_bytes == 256 * 4
    assert rec.host_syncs == 2
    if device.type == "cuda":
        assert rec.peak_bytes is not None and rec.peak_bytes >= rec.start_bytes
    else:
        assert rec.peak_bytes is None


def test_profile_without_sync_count(device):
    with profile(device, sync_count=False) as rec:
        torch.ones(2, device=device).sum().item()
    assert rec.host_syncs is None and rec.time_s > 0


def test_peak_memory_on_cuda_sees_a_known_allocation(device):
    if device.type != "cuda":
        with peak_memory(device) as pk:
            torch.zeros(10)
        assert pk.peak_bytes is None and pk.start_bytes is None
        return
    with peak_memory(device) as pk:
        buf = torch.empty(1 << 24, dtype=torch.uint8, device=device)  # 16 MiB
        del buf
    assert pk.peak_bytes - pk.start_bytes >= 1 << 24


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_held_memory_sees_autocast_casts(precision, device, amp):
    """A linear layer saves its input and weight: float32 views, or the autocast dtype's copies."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False).to(device)
    x = torch.randn(16, 64, device=device, requires_grad=True)
    with amp(precision):
        with profile(device, exclude=lin.parameters()) as rec:
            y = lin(x)
        y.float().sum().backward()
    if precision == "float32":
        assert rec.held_bytes == 16 * 64 * 4  # the input; the weight is excluded
    else:
        assert rec.held_bytes == 16 * 64 * 2 + 32 * 64 * 2  # low-precision copies of input and weight
        assert set(rec.held.bytes_by_dtype()) == {getattr(torch, precision)}
    assert rec.host_syncs == 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
