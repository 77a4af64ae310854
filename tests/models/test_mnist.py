"""ODE-Net blocks (shapes, parameter count, gradients in every precision) and the MNIST data helper."""

from __future__ import annotations

import struct
import sys

import pytest
import torch

from mpnode.core import SolverStats, odeint
from mpnode.models.mnist import ConcatConv2d, ODEBlock, ODEFunc, ODENet, load_mnist, mnist_loaders, write_idx_mnist
from mpnode.models.mnist_data import MEAN, STD, synthetic_digits


def torchvision_or_skip():
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # not installed, or built for another torch
        pytest.skip(f"torchvision not importable ({err!r}); install mpnode-models[mnist]")


def test_odenet_shapes_and_parameter_count(device):
    torch.manual_seed(0)
    model = ODENet().to(device)
    n_params = sum(p.numel() for p in model.parameters())
    # stem 132,096 + ODE function 75,392 + head 778 (Chen et al. 2018 quote 0.22 M)
    assert n_params == 208_266
    assert 0.19e6 < n_params < 0.23e6
    assert model.block.func.conv1.conv.weight.shape == (64, 65, 3, 3)  # time is the 65th input channel
    x = torch.randn(3, 1, 28, 28, device=device)
    h = model.stem(x)
    assert h.shape == (3, 64, 6, 6)
    z = model.block(h)
    assert z.shape == (3, 64, 6, 6) and z.dtype == torch.float32
    assert not torch.allclose(z, h)  # the block moves the state
    logits = model.head(z)
    assert logits.shape == (3, 10)
    torch.testing.assert_close(model(x), logits)


def test_concat_conv_uses_time(device):
    torch.manual_seed(0)
    conv = ConcatConv2d(4, 5).to(device)
    x = torch.randn(2, 4, 6, 6, device=device)
    a, b = conv(torch.tensor(0.0, device=device), x), conv(torch.tensor(1.0, device=device), x)
    assert a.shape == (2, 5, 6, 6)
    # d out / d t is the convolution of a ones image with the time channel's kernel
    ones = torch.ones(2, 1, 6, 6, device=device)
    expected = torch.nn.functional.conv2d(ones, conv.conv.weight[:, :1], padding=1)
    torch.testing.assert_close(b - a, expected, rtol=1e-5, atol=1e-5)


def test_odeblock_matches_torchdiffeq(device):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    torch.manual_seed(0)
    func = ODEFunc(width=8).to(device)
    x = torch.randn(2, 8, 5, 5, device=device)
    outs, grads = [], []
    for solve in (odeint, torchdiffeq.odeint):
        block = ODEBlock(func, n_steps=3, method="rk4", odeint=solve)
        func.zero_grad()
        out = block(x)
        (out**2).sum().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in func.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)


def test_odeblock_rejects_zero_steps():
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        ODEBlock(ODEFunc(8), n_steps=0)


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_odeblock_gradients_under_autocast(precision, device, amp):
    """ODE block alone, linear loss: low-precision gradients (input and weights) stay near float32's."""
    torch.manual_seed(0)
    stats = SolverStats()
    func = ODEFunc(width=8).to(device)
    block = ODEBlock(func, n_steps=2, options={"stats": stats})
    x = torch.randn(2, 8, 6, 6, device=device)
    w = torch.randn(2, 8, 6, 6, device=device)

    def grads(ctx):
        func.zero_grad()
        xx = x.clone().requires_grad_(True)
        with ctx:
            z = block(xx)
        (z * w).sum().backward()
        return z, torch.cat([xx.grad.flatten()] + [p.grad.flatten() for p in func.parameters()])

    z_ref, g_ref = grads(amp("float32"))
    stats.reset()
    func.nfe = 0
    z, g = grads(amp(precision))
    assert z.dtype == torch.float32  # the ODE state stays in high precision
    assert stats.steps == 2 and stats.nfe_forward == 8 and stats.nfe_backward >= 8  # rk4: 4 evaluations per step
    assert func.nfe == stats.nfe_forward + stats.nfe_backward
    rel = float((g - g_ref).norm() / g_ref.norm())
    # measured on CPU: bfloat16 1.2e-2, float16 7.8e-3
    tol = {"float32": 1e-6, "bfloat16": 0.05, "float16": 0.03}[precision]
    assert rel < tol, f"{precision}: relative gradient error {rel:.2e} >= {tol}"
    assert float((z - z_ref).detach().norm() / z_ref.detach().norm()) < 10 * tol


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_odenet_trains_under_autocast(precision, device, amp):
    """Full tiny ODE-Net: a few Adam steps under autocast lower the loss on a fixed batch."""
    torch.manual_seed(0)
    model = ODENet(width=8, n_steps=1).to(device)
    x = torch.randn(8, 1, 28, 28, device=device)
    y = torch.arange(8, device=device) % 10
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        with amp(precision):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(float(loss.detach()))
    assert logits.shape == (8, 10)
    assert losses[-1] < losses[0] - 0.05, losses


def _write_idx(path, magic: int, dims: tuple[int, ...], payload: bytes) -> None:
    path.write_bytes(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload)


def _write_tiny_mnist(root, n_train: int = 6, n_test: int = 3):
    """Our own IDX bytes in torchvision's raw layout; image i of a split is the constant 10 * i + label."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    labels = {"train": [(3 * i) % 10 for i in range(n_train)], "t10k": [(7 * i + 1) % 10 for i in range(n_test)]}
    for split, lab in labels.items():
        pixels = b"".join(bytes([10 * i + c]) * 784 for i, c in enumerate(lab))
        _write_idx(raw / f"{split}-images-idx3-ubyte", 0x803, (len(lab), 28, 28), pixels)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", 0x801, (len(lab),), bytes(lab))
    return labels


def test_load_mnist_reads_idx_files(tmp_path):
    torchvision_or_skip()
    labels = _write_tiny_mnist(tmp_path)
    for train, split in ((True, "train"), (False, "t10k")):
        ds = load_mnist(tmp_path, train=train)
        x, y = ds.tensors
        assert x.shape == (len(labels[split]), 1, 28, 28) and x.dtype == torch.float32
        assert y.tolist() == labels[split] and y.dtype == torch.int64
        pix = torch.tensor([10 * i + c for i, c in enumerate(labels[split])], dtype=torch.float32)
        torch.testing.assert_close(x[:, 0, 13, 7], (pix / 255 - MEAN) / STD)
    sub = load_mnist(tmp_path, train=True, subset=4, seed=3)
    x, y = sub.tensors
    assert len(y) == 4
    index = ((x[:, 0, 0, 0] * STD + MEAN) * 255).round().long() // 10  # recover each example's position
    assert len(set(index.tolist())) == 4  # drawn without replacement
    assert y.tolist() == [labels["train"][i] for i in index.tolist()]
    train_loader, test_loader = mnist_loaders(tmp_path, batch_size=4, test_batch_size=2)
    xb, yb = next(iter(train_loader))
    assert xb.shape == (4, 1, 28, 28) and yb.shape == (4,)
    assert [len(b[1]) for b in test_loader] == [2, 1]


def test_write_idx_mnist_round_trip(tmp_path):
    torchvision_or_skip()
    write_idx_mnist(tmp_path, n_train=20, n_test=10, seed=5)
    x, y = load_mnist(tmp_path, train=True).tensors
    images, labels = synthetic_digits(20, 5)
    assert y.tolist() == labels.long().tolist()
    torch.testing.assert_close(x[:, 0], (images.float() / 255 - MEAN) / STD)


def test_missing_mnist_names_the_layout(tmp_path):
    torchvision_or_skip()
    with pytest.raises(FileNotFoundError, match=r"MNIST[/\\]raw"):
        load_mnist(tmp_path)


def test_missing_torchvision_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` raise ImportError
    with pytest.raises(ImportError, match=r'pip install \"\./packages/mpnode-models\[mnist\]\"'):
        load_mnist(tmp_path)
