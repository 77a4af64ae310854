"""ODE-Net (Chen et al. 2018) on MNIST with mpnode or torchdiffeq, in float32, bfloat16 or float16.

Trains the ~0.21 M-parameter ODE-Net (:class:`mpnode.models.mnist.ODENet`) with
Adam and logs, per epoch, train loss/accuracy, test accuracy, the learning rate of
the epoch's last step, wall time, CUDA peak memory (empty on CPU), the bytes one
training step keeps for backward (``step_held_mib``, weights excluded, counted on
the epoch's first step) and vector-field evaluations per batch (forward and
backward) to ``<out>/log.csv``; plots them to ``<out>/ode_mnist.png``.

Recipe for a final accuracy that does not depend on which optimizer step the run
stops at: the learning rate decays per optimizer step from ``--lr`` to
``--lr * --final-lr-ratio`` (``--lr-schedule cosine``, the default, or ``linear``;
``constant`` turns the decay off).  ``--final-evals K`` also evaluates the weights
after the optimizer steps ``N - j * gap`` (``j = K-1 .. 0``, ``N`` the last step,
``gap = --final-eval-gap``) and writes them to ``<out>/final.csv`` (``step``,
``lr``, ``test_acc``): their spread is the step-to-step noise left in the final
number.

Needs torch, mpnode-core, mpnode-models with its ``mnist`` extra (torchvision:
``pip install "./packages/mpnode-models[mnist]"``) and matplotlib (torchdiffeq for ``--odeint torchdiffeq``).
The data are read through torchvision from ``<data-root>/MNIST/raw``; nothing is downloaded.  ``--smoke`` writes
a tiny synthetic set in that layout and trains on it (torchvision still reads it).

    python examples/ode_mnist.py --data-root ../shared/data --train-subset 6000 --epochs 2
    python examples/ode_mnist.py --smoke
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from mpnode.core.meters import held_memory
from mpnode.models.cli import PRECISIONS, add_solver_flags, script_parser, setup, solver, write_csv
from mpnode.models.mnist import ODENet, mnist_loaders, write_idx_mnist

REPO = Path(__file__).resolve().parents[1]


def elapsed(start: float, device: torch.device) -> float:
    """Seconds since ``start`` (``time.perf_counter``), after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _mib(n: int | None) -> float | str:
    return "" if n is None else round(n / 2**20, 2)


def lr_factor(schedule: str, final_ratio: float, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the initial learning rate for optimizer step ``k`` (0-based) of ``total_steps``.

    ``cosine``: ``r + (1 - r) (1 + cos(pi k / (N - 1))) / 2``; ``linear``:
    ``1 - (1 - r) k / (N - 1)``; both go from 1 at the first step to ``r =
    final_ratio`` at the last one (``N = total_steps``).  ``constant``: always 1.
    """
    if schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: use constant, cosine or linear")
    if not 0 <= final_ratio <= 1:
        raise ValueError(f"--final-lr-ratio must be in [0, 1], got {final_ratio}")
    if schedule == "constant" or total_steps < 2:
        return lambda k: 1.0
    last = total_steps - 1
    if schedule == "cosine":
        return lambda k: final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(k, last) / last))
    return lambda k: 1 - (1 - final_ratio) * min(k, last) / last


def final_eval_steps(total_steps: int, n_evals: int, gap: int) -> list[int]:
    """Optimizer steps (1-based counts) after which the weights are evaluated: ``N - j gap``, ``j = n-1 .. 0``."""
    if total_steps < 1:
        raise ValueError("the run has no optimizer step: --epochs must be >= 1 and the training set non-empty")
    if n_evals < 1 or gap < 1:
        raise ValueError(f"--final-evals ({n_evals}) and --final-eval-gap ({gap}) must be >= 1")
    if (n_evals - 1) * gap >= total_steps:
        raise ValueError(f"--final-evals {n_evals} with --final-eval-gap {gap} reaches back {(n_evals - 1) * gap} "
                         f"steps but the run has only {total_steps} optimizer steps: lower one of them")
    return [total_steps - j * gap for j in range(n_evals - 1, -1, -1)]


class Snapshots:
    """Copies of the model's weights (``state_dict``, cloned) after chosen optimizer steps.

    Call :meth:`after_step` once per optimizer step with the learning rate that
    step used; ``saved`` maps the 1-based step count to ``(lr, state_dict)``.
    """

    def __init__(self, model: torch.nn.Module, steps: list[int]) -> None:
        self.model = model
        self.steps = set(steps)
        self.count = 0
        self.saved: dict[int, tuple[float, dict[str, torch.Tensor]]] = {}

    def after_step(self, lr: float) -> None:
        self.count += 1
        if self.count in self.steps:
            self.saved[self.count] = (lr, {k: v.detach().clone() for k, v in self.model.state_dict().items()})


def train_epoch(model, loader, opt, grad_scaler, autocast, device, schedule, snapshots, print_freq: int) -> dict:
    """One pass over ``loader``; returns mean loss, accuracy, NFE per batch, the last step's learning rate
    and the bytes the first step kept for backward (``step_held_mib``, weights excluded).

    ``schedule`` (an ``LRScheduler``) steps after every optimizer step, then
    ``snapshots.after_step`` sees the learning rate that step used.
    """
    model.train()
    func = model.block.func
    weights = list(model.parameters())
    loss_sum = correct = seen = nfe_f = nfe_b = 0
    held_bytes = None
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        n0 = func.nfe
        with held_memory(exclude=weights) as held:  # peak_bytes: what the forward held for backward
            with autocast:
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            n1 = func.nfe
            grad_scaler.scale(loss).backward()
        if i == 0:
            held_bytes = held.peak_bytes
        nfe_f += n1 - n0
        nfe_b += func.nfe - n1  # mpnode recomputes each step in backward; torchdiffeq backpropagates its graph
        grad_scaler.step(opt)
        grad_scaler.update()
        lr = opt.param_groups[0]["lr"]
        schedule.step()
        snapshots.after_step(lr)
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        if (i + 1) % print_freq == 0:
            print(f"  batch {i + 1}/{len(loader)}: loss {loss_sum / seen:.4f}, accuracy {correct / seen:.4f}",
                  flush=True)
    n_batches = max(len(loader), 1)
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen,
            "nfe_forward": nfe_f / n_batches, "nfe_backward": nfe_b / n_batches, "lr": lr,
            "step_held_mib": _mib(held_bytes)}


@torch.no_grad()
def evaluate(model, loader, autocast, device) -> float:
    """Test accuracy (inference under the same autocast; mpnode then stores no checkpoints)."""
    model.eval()
    correct = seen = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast:
            logits = model(x)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return correct / max(seen, 1)


def evaluate_snapshots(model, snapshots: Snapshots, test_loader, autocast, device) -> list[dict]:
    """Test accuracy of every saved snapshot, in step order; restores the model's current weights afterwards."""
    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = []
    for step in sorted(snapshots.saved):
        lr, state = snapshots.saved[step]
        model.load_state_dict(state)
        rows.append(dict(step=step, lr=lr, test_acc=evaluate(model, test_loader, autocast, device)))
    model.load_state_dict(current)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    ep = [r["epoch"] for r in rows]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
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
        ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_final(rows: list[dict], path: Path) -> None:
    """Write the end-of-run evaluations to ``path`` and print their mean and range."""
    write_csv(path, rows)
    accs = [r["test_acc"] for r in rows]
    print(f"final test accuracy {accs[-1]:.4f}; over the last {len(accs)} evaluations (steps "
          f"{rows[0]['step']}..{rows[-1]['step']}): mean {sum(accs) / len(accs):.4f}, "
          f"min {min(accs):.4f}, max {max(accs):.4f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = script_parser("ode_mnist", __doc__.splitlines()[0])
    add_solver_flags(p, what="the model")
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data",
                   help="folder containing MNIST/raw/*-ubyte (default ../shared/data)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--test-batch-size", type=int, default=500)
    p.add_argument("--lr", type=float, default=2e-3, help="initial Adam learning rate")
    p.add_argument("--lr-schedule", choices=["cosine", "linear", "constant"], default="cosine",
                   help="per-step decay of the learning rate from --lr to --lr * --final-lr-ratio at the "
                        "last step (default cosine; constant: no decay)")
    p.add_argument("--final-lr-ratio", type=float, default=1e-2,
                   help="learning rate of the last step as a fraction of --lr (default 0.01)")
    p.add_argument("--final-evals", type=int, default=1,
                   help="evaluate the test set after this many of the last optimizer steps (default 1: "
                        "only the final weights); all go to <out>/final.csv")
    p.add_argument("--final-eval-gap", type=int, default=1,
                   help="optimizer steps between two of the --final-evals evaluations (default 1)")
    p.add_argument("--train-subset", type=int, default=None, help="train on this many examples (default all 60000)")
    p.add_argument("--test-subset", type=int, default=None, help="test on this many examples (default all 10000)")
    p.add_argument("--steps", type=int, default=4, help="fixed Runge-Kutta steps of the ODE block on [0, 1]")
    p.add_argument("--method", default="rk4")
    p.add_argument("--width", type=int, default=64, help="channels of the ODE state")
    p.add_argument("--print-freq", type=int, default=50, help="print the running loss every this many batches")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.batch_size, args.width, args.steps = 1, 8, 8, 1
        args.data_root = write_idx_mnist(args.out / "smoke_data", n_train=16, n_test=8, seed=args.seed)
        args.train_subset = args.test_subset = None
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = setup(args)
    # the stem, the ODE function and the head run in the autocast dtype; with mpnode the ODE state stays float32
    autocast = torch.autocast(device.type, dtype=PRECISIONS[args.precision], enabled=args.precision != "float32")
    grad_scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "float16")
    train_loader, test_loader = mnist_loaders(args.data_root, args.batch_size, args.test_batch_size,
                                              args.train_subset, args.test_subset, seed=args.seed)
    model = ODENet(width=args.width, n_steps=args.steps, method=args.method, odeint=solver(args.odeint)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    total_steps = args.epochs * len(train_loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args.lr_schedule, args.final_lr_ratio, total_steps))
    eval_steps = final_eval_steps(total_steps, args.final_evals, args.final_eval_gap)
    snapshots = Snapshots(model, eval_steps[:-1])  # the last step's weights are the final model itself
    title = (f"ODE-Net ({n_params} params), {args.odeint}, {args.precision}, {args.method} x{args.steps}, "
             f"train {len(train_loader.dataset)}, test {len(test_loader.dataset)}, {device.type}")
    print(title)
    rows = []
    for epoch in range(1, args.epochs + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        stats = train_epoch(model, train_loader, opt, grad_scaler, autocast, device, schedule, snapshots,
                            args.print_freq)
        train_s = elapsed(start, device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        start = time.perf_counter()
        test_acc = evaluate(model, test_loader, autocast, device)
        test_s = elapsed(start, device)
        rows.append(dict(epoch=epoch, precision=args.precision, odeint=args.odeint,
                         train_n=len(train_loader.dataset), test_n=len(test_loader.dataset), **stats,
                         test_acc=test_acc, train_time_s=round(train_s, 2), test_time_s=round(test_s, 2),
                         peak_mib=_mib(peak)))
        write_csv(args.out / "log.csv", rows)
        print(f"epoch {epoch}: train loss {stats['train_loss']:.4f} acc {stats['train_acc']:.4f} | "
              f"test acc {test_acc:.4f} | {train_s:.1f} s train, {test_s:.1f} s test | "
              f"NFE/batch fwd {stats['nfe_forward']:.0f} bwd {stats['nfe_backward']:.0f}", flush=True)
    last = dict(step=total_steps, lr=rows[-1]["lr"], test_acc=rows[-1]["test_acc"])
    write_final([*evaluate_snapshots(model, snapshots, test_loader, autocast, device), last], args.out / "final.csv")
    plot(rows, args.out / "ode_mnist.png", title)
    print(f"wrote {args.out / 'log.csv'} and {args.out / 'ode_mnist.png'}")
    return rows


if __name__ == "__main__":
    main()
