"""ODE-Net (Chen et al. 2018) on MNIST with mpnode or torchdiffeq, in float32, bfloat16 or float16.

Trains the ~0.21 M-parameter ODE-Net (:class:`mpnode.models.mnist.ODENet`) with
Adam and logs, per epoch, train loss/accuracy, test accuracy, wall time,
CUDA peak memory (empty on CPU), the bytes one training step keeps for
backward (``step_held_mib``, weights excluded) and vector-field evaluations per batch (forward and
backward) to ``<out>/log.csv``; plots them to ``<out>/ode_mnist.png``.

    python examples/ode_mnist.py --data-root ../shared/data --train-subset 6000 --epochs 2
    python examples/ode_mnist.py --smoke          # tiny generated IDX set, no real data needed

The data are read through torchvision (``pip install mpnode-models[mnist]``)
from ``<data-root>/MNIST/raw``; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mpnode.bench.experiment import (
    CSVLog, add_solver_flags, autocast, make_grad_scaler, pyplot, save_figure, script_parser, setup, solver,
)
from mpnode.models.mnist import ODENet, mnist_loaders, write_idx_mnist

REPO = Path(__file__).resolve().parents[1]


def profiler():
    """``mpnode.bench.profilers.profile``: time, CUDA peak memory, bytes held for backward, host syncs."""
    from mpnode.bench.profilers import profile

    return profile


def _mib(n: int | None) -> float | str:
    return "" if n is None else round(n / 2**20, 2)


def train_epoch(model, loader, opt, grad_scaler, args, device, bar, profile) -> dict:
    """One pass over ``loader``; returns mean loss, accuracy, NFE per batch and the first step's profile.

    The first batch's forward+backward is profiled on its own (``held_mib``: bytes
    kept for backward, excluding the weights; ``host_syncs``); the epoch's time
    is measured by the caller.
    """
    model.train()
    func = model.block.func
    loss_sum = correct = seen = nfe_f = nfe_b = 0
    step_rec = None
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        n0 = func.nfe
        ctx = profile(device, exclude=list(model.parameters())) if i == 0 else contextlib.nullcontext()
        with ctx as rec:
            with autocast(args.precision, device):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            n1 = func.nfe
            grad_scaler.scale(loss).backward()
        step_rec = rec if i == 0 else step_rec
        nfe_f += n1 - n0
        nfe_b += func.nfe - n1
        grad_scaler.step(opt)
        grad_scaler.update()
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    n_batches = max(len(loader), 1)
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen,
            "nfe_forward": nfe_f / n_batches, "nfe_backward": nfe_b / n_batches,
            "step_held_mib": _mib(step_rec.held_bytes), "step_host_syncs": step_rec.host_syncs}


@torch.no_grad()
def evaluate(model, loader, args, device) -> float:
    """Test accuracy (inference under the same autocast; mpnode then stores no checkpoints)."""
    model.eval()
    correct = seen = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast(args.precision, device):
            logits = model(x)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return correct / max(seen, 1)


def plot(rows: list[dict], path: Path, title: str) -> None:
    ep = [r["epoch"] for r in rows]
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, [r["train_acc"] for r in rows], "-o", label="train")
    axes[0].plot(ep, [r["test_acc"] for r in rows], "-s", label="test")
    axes[0].set_ylabel("accuracy")
    axes[0].legend()
    axes[1].plot(ep, [r["train_loss"] for r in rows], "-o")
    axes[1].set_ylabel("train cross-entropy")
    axes[2].plot(ep, [r["train_time_s"] for r in rows], "-o", label="train")
    axes[2].plot(ep, [r["test_time_s"] for r in rows], "-s", label="test")
    axes[2].set_ylabel("seconds per epoch")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=120)


def main(argv=None) -> list[dict]:
    parser = script_parser("ode_mnist", __doc__.splitlines()[0])
    add_solver_flags(parser)
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder containing MNIST/raw/*-ubyte (default ../shared/data)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--test-batch-size", type=int, default=500)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-subset", type=int, default=None, help="train on this many examples (default all 60000)")
    parser.add_argument("--test-subset", type=int, default=None, help="test on this many examples (default all 10000)")
    parser.add_argument("--steps", type=int, default=4, help="fixed Runge-Kutta steps of the ODE block on [0, 1]")
    parser.add_argument("--method", default="rk4")
    parser.add_argument("--width", type=int, default=64, help="channels of the ODE state")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.batch_size, args.width, args.steps = 1, 8, 8, 1
        args.data_root = write_idx_mnist(args.out / "smoke_data", n_train=16, n_test=8, seed=args.seed)
        args.train_subset = args.test_subset = None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = setup(args)
    train_loader, test_loader = mnist_loaders(args.data_root, args.batch_size, args.test_batch_size,
                                              args.train_subset, args.test_subset, seed=args.seed)
    model = ODENet(width=args.width, n_steps=args.steps, method=args.method, odeint=solver(args.odeint)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    grad_scaler = make_grad_scaler(args.precision, device)
    profile = profiler()
    title = (f"ODE-Net ({n_params} params), {args.odeint}, {args.precision}, {args.method} x{args.steps}, "
             f"train {len(train_loader.dataset)}, test {len(test_loader.dataset)}, {device.type}")
    print(title)
    log = CSVLog(args.out / "log.csv")
    rows = []
    bar = tqdm(total=args.epochs * len(train_loader), desc="train", unit="batch")
    for epoch in range(1, args.epochs + 1):
        with profile(device, sync_count=False) as rec:
            stats = train_epoch(model, train_loader, opt, grad_scaler, args, device, bar, profile)
        with profile(device, sync_count=False) as rec_test:
            test_acc = evaluate(model, test_loader, args, device)
        row = dict(epoch=epoch, precision=args.precision, odeint=args.odeint, train_n=len(train_loader.dataset),
                   test_n=len(test_loader.dataset), **stats, test_acc=test_acc, train_time_s=round(rec.time_s, 2),
                   test_time_s=round(rec_test.time_s, 2), peak_mib=_mib(rec.peak_bytes))
        log.write(**row)
        rows.append(row)
        tqdm.write(f"epoch {epoch}: train loss {stats['train_loss']:.4f} acc {stats['train_acc']:.4f} | "
                   f"test acc {test_acc:.4f} | {rec.time_s:.1f} s train, {rec_test.time_s:.1f} s test | "
                   f"NFE/batch fwd {stats['nfe_forward']:.0f} bwd {stats['nfe_backward']:.0f}")
    bar.close()
    log.close()
    plot(rows, args.out / "ode_mnist.png", title)
    print(f"wrote {args.out / 'log.csv'} and {args.out / 'ode_mnist.png'}")
    return rows


if __name__ == "__main__":
    main()
