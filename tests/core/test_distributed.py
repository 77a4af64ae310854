"""Data-parallel training through ``mpnode.core.odeint`` with torch.distributed.

Two CPU processes (gloo backend, 127.0.0.1) each run one forward/backward on their own batch,
wrapped in DistributedDataParallel, and in FSDP2 (``fully_shard``) with the module that calls
``odeint`` as its own unit.  The gradients each rank ends with must equal the mean of the
per-rank gradients computed here, in one process, with the same weights.  The workers are this
file run as a script (``--worker``), so the test needs nothing beyond torch and mpnode.core.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mpnode.core import odeint

WORLD_SIZE = 2
WRAPPERS = ("ddp", "fsdp2")
LOW = {"bfloat16": torch.bfloat16}
#: relative tolerance of the wrapped gradient against the single-process mean (measured: 0.0 in
#: every case; the margin covers reductions in another order, e.g. another thread count, whose
#: float32 rounding bfloat16 can amplify by an ulp of bfloat16 in the forward)
TOLERANCE = {"float32": 1e-6, "bfloat16": 1e-3}
#: seconds: the process group's collective timeout and the parent's wait for the workers
PG_TIMEOUT_S, JOIN_TIMEOUT_S = 30, 90


class Field(nn.Module):
    """``f(t, y) = W2 tanh(W1 [y, t])`` on states ``(B, dim)``."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim + 1, width)
        self.l2 = nn.Linear(width, dim)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(torch.cat([y, t.expand(y.shape[0], 1)], -1))))


class ODEBlock(nn.Module):
    """``y(1)`` from ``y(0)``: RK4 with step 1/4 (the unit FSDP2 shards)."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.field = Field(dim, width)

    def forward(self, y0: torch.Tensor) -> torch.Tensor:
        t = torch.tensor([0.0, 1.0], device=y0.device)
        return odeint(self.field, y0, t, method="rk4", options={"step_size": 0.25})[-1]


class ODEClassifier(nn.Module):
    """Inputs ``(B, 4)`` -> logits ``(B, 3)``: ``head(ODEBlock(x))``."""

    def __init__(self, dim: int = 4, width: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.block = ODEBlock(dim, width)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def make_model() -> ODEClassifier:
    torch.manual_seed(0)
    return ODEClassifier()


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's own data: 8 inputs ``(8, 4)`` and labels in ``0..2``."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 4, generator=g) * (1 + rank), torch.randint(0, 3, (8,), generator=g)


def autocast(precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=LOW[precision]) if precision in LOW else contextlib.nullcontext()


def loss_of(model: nn.Module, rank: int, precision: str) -> torch.Tensor:
    x, labels = rank_batch(rank)
    with autocast(precision):
        return nn.functional.cross_entropy(model(x).float(), labels)


def single_process_grads(rank: int, precision: str) -> dict[str, torch.Tensor]:
    model = make_model()
    loss_of(model, rank, precision).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# -- worker side (``python test_distributed.py --worker ...``) ----------------------------------


def wrap(model: nn.Module, wrapper: str) -> nn.Module:
    """DDP around ``model``, or FSDP2 with ``model.block`` (the module calling odeint) as one unit."""
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    fully_shard(model.block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's whole gradient by its unwrapped name (FSDP2 keeps a shard: gather it)."""
    model = getattr(model, "module", model)
    grads = {}
    for name, p in model.named_parameters():
        grads[name] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
    return grads


def worker(rank: int, port: int, precisions: list[str], out: Path) -> None:
    """One rank: per wrapper and precision, one forward/backward of a fresh wrapped model on this
    rank's batch; saves the gradients to ``out/<wrapper>_<precision>_rank<rank>.pt``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        for wrapper in WRAPPERS:
            for precision in precisions:
                model = wrap(make_model(), wrapper)
                loss_of(model, rank, precision).backward()
                torch.save(full_grads(model), out / f"{wrapper}_{precision}_rank{rank}.pt")
        dist.barrier()  # both ranks are done with every collective before the group goes away
    finally:
        dist.destroy_process_group()


# -- parent side -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(precisions: list[str], out: Path) -> list[subprocess.CompletedProcess]:
    """Run the two workers to completion (killed after ``JOIN_TIMEOUT_S``); returns their results.

    One launch serves every wrapper and precision: starting a worker (importing torch and DDP's
    torch._dynamo) costs seconds, the solves milliseconds."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, __file__, "--worker", "--rank", str(rank), "--port", str(port),
                          "--precisions", *precisions, "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for rank in range(WORLD_SIZE)
    ]
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=JOIN_TIMEOUT_S)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def wrapped_grads(request, tmp_path_factory):
    """``wrapped_grads(wrapper, precision)``: each rank's gradients after backward, ``[rank0, rank1]``.

    The workers run once per module, for the precisions this session selected."""
    selected = request.config.getoption("--precision")
    precisions = list(TOLERANCE) if selected == "all" else [selected]
    out = tmp_path_factory.mktemp("distributed")
    ran: list = []

    def get(wrapper: str, precision: str) -> list[dict[str, torch.Tensor]]:
        if not ran:
            ran.append(launch(precisions, out))
        for rank, res in enumerate(ran[0]):
            assert res.returncode == 0, f"rank {rank} failed:\n{res.stderr[-3000:]}"
        return [torch.load(out / f"{wrapper}_{precision}_rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]

    return get


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("precision", list(TOLERANCE))
def test_each_rank_gets_the_mean_of_the_per_rank_gradients(precision, wrapper, wrapped_grads):
    got = wrapped_grads(wrapper, precision)
    per_rank = [single_process_grads(r, precision) for r in range(WORLD_SIZE)]
    assert set(got[0]) == set(per_rank[0])
    for name, g0 in per_rank[0].items():
        mean = (g0 + per_rank[1][name]) / WORLD_SIZE
        # the check can fail: one rank's own gradient is far from the mean
        assert relative_error(g0, mean) > 10 * TOLERANCE[precision], f"{name}: the ranks' data should differ"
        assert torch.equal(got[0][name], got[1][name]), f"{name}: ranks disagree after the reduction"
        err = relative_error(got[0][name], mean)
        assert err <= TOLERANCE[precision], f"{wrapper} {name}: gradient vs single-process mean: {err:.2e}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a worker process of test_distributed.py")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--precisions", choices=list(TOLERANCE), nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    worker(args.rank, args.port, args.precisions, args.out)
    # The results are on disk.  Skip the interpreter's teardown: a background thread of the distributed
    # runtime still joinable there made a worker abort ("terminate called without an active exception")
    # once in a clean CI run, after its work had finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
