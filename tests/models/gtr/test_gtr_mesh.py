"""Density-grid smoothing before marching cubes (``mesh_smoothing``): equals scipy's Gaussian filter,
is the identity at 0, and brings a grainy sphere's level set closer to the true sphere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from recon3d.errors import ConfigError
from recon3d.models.gtr.mesh import extract_mesh, smooth_grid
from recon3d.render.isosurface import grid_points


@pytest.mark.parametrize("sigma", [0.5, 0.7, 1.3])
def test_smooth_grid_matches_scipy(sigma):
    g = torch.rand(12, 10, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = ndimage.gaussian_filter(g.numpy(), sigma, mode="nearest", truncate=3.0)
    np.testing.assert_allclose(smooth_grid(g, sigma).numpy(), ref, rtol=0, atol=1e-12)


def test_smooth_grid_identity_gradient_and_bad_sigma():
    g = torch.rand(6, 6, 6, requires_grad=True)
    assert smooth_grid(g, 0.0) is g
    out = smooth_grid(g, 1.0)
    out.sum().backward()
    # a normalised kernel with border replication passes the total mass of the gradient through
    assert torch.isfinite(g.grad).all() and abs(float(g.grad.sum()) - g.numel()) < 1e-3
    with pytest.raises(ConfigError, match="mesh_smoothing"):
        smooth_grid(g, -0.5)
    with pytest.raises(ConfigError, match="mesh_smoothing"):
        smooth_grid(g, float("nan"))


class _GrainySphere(torch.nn.Module):
    """Density 20 inside a sphere of radius 0.6 and 0 outside, plus grid-scale noise."""

    def __init__(self, res: int):
        super().__init__()
        self.noise = 8.0 * torch.randn(res, res, res, generator=torch.Generator().manual_seed(1))

    def density(self, planes, pts, views=None):
        r = pts[0].norm(dim=-1)
        base = 20.0 * torch.sigmoid((0.6 - r) * 40.0)
        return (base + self.noise.reshape(-1)[: pts.shape[1]])[None]


def test_smoothing_brings_a_grainy_level_set_to_the_true_surface():
    res = 32
    field = _GrainySphere(res)
    planes = torch.zeros(1, 3, 1, 2, 2)
    assert grid_points(res, (-1.0, 1.0)).reshape(-1, 3).shape[0] == res**3  # the noise is per grid point
    errs = {}
    for sigma in (0.0, 1.0):
        verts, _ = extract_mesh(field, planes, res, 10.0, (-1.0, 1.0), differentiable=False, smoothing=sigma)
        errs[sigma] = float((verts.norm(dim=-1) - 0.6).abs().mean())
    # closed form: the true surface is |x| = 0.6; the noise moves the raw level set by ~a voxel
    assert errs[1.0] < 0.5 * errs[0.0], errs
    assert errs[1.0] < 0.02, errs


def test_smooth_grid_below_a_voxel_is_the_identity_as_in_scipy():
    g = torch.rand(5, 6, 7, dtype=torch.float64)
    np.testing.assert_array_equal(smooth_grid(g, 0.1).numpy(), ndimage.gaussian_filter(g.numpy(), 0.1, mode="nearest", truncate=3.0))
