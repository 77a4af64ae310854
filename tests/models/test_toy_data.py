"""Toy data sets: shapes, scale, unknown names, and the 8-Gaussians reference density."""

from __future__ import annotations

import pytest
import torch

from mpnode.models.toy_data import DATASETS, eight_gaussians_log_density, sample


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_toy_data(name):
    x = sample(name, 2000, torch.Generator().manual_seed(0))
    assert x.shape == (2000, 2) and x.dtype == torch.float32
    assert float(x.mean(0).abs().max()) < 0.2 and 0.7 < float(x.std(0).min()) < 2.0
    with pytest.raises(ValueError, match="unknown toy data set"):
        sample("moons?", 3)


def test_eight_gaussians_log_density_integrates_to_one():
    grid = torch.linspace(-4, 4, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    dens = eight_gaussians_log_density(torch.stack([xx.flatten(), yy.flatten()], 1)).exp()
    assert abs(float(dens.sum() * (grid[1] - grid[0]) ** 2) - 1.0) < 1e-3
