"""2-D toy densities for flows: 8 Gaussians, checkerboard, two spirals, circles.

Every sampler has the signature ``sample(n, generator=None) -> (n, 2) float32``
on the CPU (move the result to the device you train on) and produces data of
roughly unit scale, centred at the origin.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Sampler = Callable[..., torch.Tensor]


def eight_gaussians(n: int, generator: torch.Generator | None = None, radius: float = 2.0,
                    std: float = 0.2) -> torch.Tensor:
    """A mixture of 8 isotropic Gaussians (std ``std``) evenly spaced on a circle of ``radius``."""
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k.float() * (2 * math.pi / 8)
    centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centres + std * torch.randn(n, 2, generator=generator)


def checkerboard(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform on the 8 dark squares (column + row even) of a 4x4 board covering ``[-2, 2]^2``."""
    col = torch.randint(0, 4, (n,), generator=generator)
    row = 2 * torch.randint(0, 2, (n,), generator=generator) + col % 2  # same parity as the column
    cell = torch.stack([col, row], dim=1).float() - 2
    return cell + torch.rand(n, 2, generator=generator)


def two_spirals(n: int, generator: torch.Generator | None = None, noise: float = 0.1) -> torch.Tensor:
    """Two interleaved spirals of radius up to about 3, with Gaussian noise."""
    r = torch.sqrt(torch.rand(n, generator=generator)) * 3 * math.pi
    arm = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    pts = torch.stack([-torch.cos(r) * r, torch.sin(r) * r], dim=1) * arm[:, None] / 3
    return pts + noise * torch.randn(n, 2, generator=generator)


def circles(n: int, generator: torch.Generator | None = None, noise: float = 0.08) -> torch.Tensor:
    """Two concentric circles of radii 1 and 2 (equal mass), with Gaussian noise."""
    radius = torch.randint(1, 3, (n,), generator=generator).float()
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    pts = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return pts + noise * torch.randn(n, 2, generator=generator)


DATASETS: dict[str, Sampler] = {
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "2spirals": two_spirals,
    "circles": circles,
}


def sample(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` samples of the toy set ``name`` (one of `DATASETS`)."""
    if name not in DATASETS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](n, generator=generator)


def eight_gaussians_log_density(x: torch.Tensor, radius: float = 2.0, std: float = 0.2) -> torch.Tensor:
    """Exact log-density of [`eight_gaussians`][mpnode.models.toy_data.eight_gaussians] at ``x`` (``(n, 2)`` ->
    ``(n,)``)."""
    angle = torch.arange(8, dtype=x.dtype, device=x.device) * (2 * math.pi / 8)
    centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    d2 = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
    log_comp = -d2 / (2 * std**2) - math.log(2 * math.pi * std**2)
    return torch.logsumexp(log_comp, dim=1) - math.log(8)
