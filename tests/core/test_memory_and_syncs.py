"""What backward holds (one checkpoint per step) and that it never synchronises with the host."""

from __future__ import annotations

import pytest
import torch

from mpnode.core import odeint

N_STEPS = 32
BATCH, DIM = 64, 4


def _solve(field, precision, amp, device, saved_bytes, **options):
    field = field.to(device)
    y0 = torch.randn(BATCH, DIM, device=device, requires_grad=True)
    t = torch.linspace(0, 1, N_STEPS + 1, device=device)
    meter = saved_bytes()
    with amp(precision):
        with meter:
            out = odeint(field, y0, t, method="rk4", options=options or None)
        loss = (out[-1] ** 2).sum()
    return meter, loss


@pytest.mark.parametrize(
    "precision, options, ckpt_dtype",
    [
        ("float32", {}, torch.float32),
        ("float32", {"checkpoint_dtype": torch.bfloat16}, torch.bfloat16),
        ("bfloat16", {}, torch.bfloat16),
    ],
)
def test_held_memory_is_the_checkpoints(precision, options, ckpt_dtype, mlp_field, amp, device, saved_bytes):
    meter, _ = _solve(mlp_field, precision, amp, device, saved_bytes, **options)
    ckpt_bytes = N_STEPS * BATCH * DIM * ckpt_dtype.itemsize
    grid_bytes = (N_STEPS + 1) * 4
    assert ckpt_dtype in meter.bytes_by_dtype()
    assert ckpt_bytes <= meter.bytes <= ckpt_bytes + grid_bytes + 256, (meter.bytes, ckpt_bytes)


def test_torchdiffeq_holds_far_more(mlp_field, amp, device, saved_bytes):
    """Sanity check of the meter: direct backprop stores every stage's activations."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    ours, _ = _solve(mlp_field, "float32", amp, device, saved_bytes)
    y0 = torch.randn(BATCH, DIM, device=device, requires_grad=True)
    meter = saved_bytes()
    with meter:
        out = torchdiffeq.odeint(mlp_field.to(device), y0, torch.linspace(0, 1, N_STEPS + 1, device=device),
                                 method="rk4")
    assert meter.bytes > 10 * ours.bytes, out.shape  # (while ``out`` keeps the graph)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_unscaled_backward_makes_no_host_sync(precision, mlp_field, amp, device, saved_bytes, sync_counter):
    _, loss = _solve(mlp_field, precision, amp, device, saved_bytes)
    counter = sync_counter()
    if device.type == "cuda":  # also catch device-to-host copies, which the dispatch counter cannot see
        torch.cuda.set_sync_debug_mode("error")
    try:
        with counter:
            loss.backward()
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert counter.count == 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mlp_field.parameters())


def test_inference_stores_no_checkpoints(mlp_field, device, monkeypatch):
    """Under no_grad no per-step state is allocated; with gradients one checkpoint per step."""
    sizes = []
    original = torch.empty

    def spy(shape, **kw):
        sizes.append(tuple(shape))
        return original(shape, **kw)

    monkeypatch.setattr(torch, "empty", spy)
    y0 = torch.randn(BATCH, DIM, device=device)
    t = torch.linspace(0, 1, N_STEPS + 1, device=device)
    with torch.no_grad():
        odeint(mlp_field.to(device), y0, t, method="rk4")
    assert (N_STEPS, BATCH * DIM) not in sizes
    odeint(mlp_field.to(device), y0, t, method="rk4")  # the module's parameters require grad
    assert (N_STEPS, BATCH * DIM) in sizes
