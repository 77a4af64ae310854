"""MNIST data for the ODE-Net: loading through ``torchvision.datasets.MNIST`` and a tiny IDX writer.

``load_mnist`` and ``mnist_loaders`` need torchvision (from the repository root:
``pip install "./packages/mpnode-models[mnist]"``), imported only when they are called.  Nothing is
downloaded: the files must already be in torchvision's raw layout
``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``.
``write_idx_mnist`` writes a small synthetic set in that layout (no
torchvision needed), for smoke runs and tests.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

MEAN, STD = 0.1307, 0.3081  # MNIST training-set pixel statistics (of x / 255)
RAW_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _torchvision_datasets():
    try:
        from torchvision import datasets
    except Exception as err:  # ImportError, or a torchvision built for another torch
        raise ImportError(
            "mpnode.models.mnist data helpers need torchvision: install it with "
            "`pip install \"./packages/mpnode-models[mnist]\"` from the torchmpnode checkout (a torchvision "
            "matching your torch). "
            f"Importing torchvision failed with: {err!r}"
        ) from err
    return datasets


def load_mnist(root: str | Path, train: bool = True, subset: int | None = None, seed: int = 0) -> TensorDataset:
    """MNIST as an in-memory ``TensorDataset`` of normalised images and labels.

    Args:
        root: folder holding ``MNIST/raw/...`` (torchvision's layout); nothing is downloaded.
        train: the 60k training split (``True``) or the 10k test split.
        subset: keep this many examples, drawn without replacement with ``seed``
            (all when ``None`` or larger than the split).
        seed: seed of the subset draw.

    Returns:
        ``TensorDataset(x, y)`` with ``x`` float32 ``(N, 1, 28, 28)`` equal to
        ``(pixel / 255 - 0.1307) / 0.3081`` and ``y`` int64 ``(N,)`` in 0..9.
    """
    datasets = _torchvision_datasets()
    root = Path(root)
    try:
        ds = datasets.MNIST(str(root), train=train, download=False)
    except RuntimeError as err:
        names = ", ".join(n for pair in RAW_FILES.values() for n in pair)
        raise FileNotFoundError(
            f"MNIST not found under {root}: expected {root / 'MNIST' / 'raw'} holding {names} "
            "(uncompressed IDX files). Point --data-root at the folder containing MNIST/."
        ) from err
    images, labels = ds.data, ds.targets
    if subset is not None and subset < len(labels):
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:subset]
        images, labels = images[keep], labels[keep]
    x = (images.float().div_(255.0).sub_(MEAN).div_(STD)).unsqueeze(1)
    return TensorDataset(x, labels.long())


def mnist_loaders(
    root: str | Path,
    batch_size: int = 128,
    test_batch_size: int = 1000,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader (seeded) and ordered test loader over
    [`load_mnist`][mpnode.models.mnist_data.load_mnist] sets."""
    train = load_mnist(root, True, train_subset, seed)
    test = load_mnist(root, False, test_subset, seed + 1)
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=g, drop_last=False),
        DataLoader(test, batch_size=test_batch_size, shuffle=False),
    )


def write_idx(path: Path, array: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (big-endian header: magic ``0x0000 08 ndim``, then the dims)."""
    if array.dtype != torch.uint8:
        raise TypeError(f"write_idx: expected a uint8 tensor, got {array.dtype}")
    header = struct.pack(">I", 0x0800 + array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    path.write_bytes(header + array.contiguous().numpy().tobytes())


def synthetic_digits(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` learnable stand-in digits: uint8 ``(n, 28, 28)`` images and uint8 ``(n,)`` labels.

    Class ``c`` is a bright 8x8 square at cell ``c`` of a 4x3 grid, on faint noise.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
    images = torch.randint(0, 40, (n, 28, 28), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        r, col = divmod(c, 3)
        images[i, 1 + 7 * r : 9 + 7 * r, 2 + 9 * col : 10 + 9 * col] = 255
    return images, labels


def write_idx_mnist(root: str | Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """Write [`synthetic_digits`][mpnode.models.mnist_data.synthetic_digits] as ``<root>/MNIST/raw/*-ubyte``
    (torchvision's layout); returns ``root``."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, labels = synthetic_digits(n, s)
        img_name, lbl_name = RAW_FILES[split]
        write_idx(raw / img_name, images)
        write_idx(raw / lbl_name, labels)
    return Path(root)
