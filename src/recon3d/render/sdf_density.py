"""Signed distance to volume density, for rendering SDFs with the volume renderer.

Sign convention: the SDF is negative inside the object and positive outside.

- :class:`LaplaceDensity` (VolSDF; M3D eq. 6): ``sigma = alpha * Psi_beta(-sdf)`` with
  ``Psi_beta`` the CDF of a zero-mean Laplace distribution of scale ``beta`` and
  ``alpha = 1 / beta``. ``beta`` is learnable and kept above ``beta_min``.
- :class:`NeuSDensity` (NeuS): opacities from the logistic CDF ``Phi_s`` of consecutive SDF
  samples along a ray, ``alpha_i = max((Phi_s(f_i) - Phi_s(f_{i+1})) / Phi_s(f_i), 0)``, with a
  learnable sharpness ``s = exp(10 * variance)`` as in the NeuS code.

Both expose ``alphas(sdf, deltas)`` (per-sample opacities along rays), which is what the volume
renderer composites; ``LaplaceDensity`` also gives a density via ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn

from recon3d.errors import ConfigError
from recon3d.utils.checks import check_shape

__all__ = ["LaplaceDensity", "NeuSDensity", "density_to_alpha"]


def density_to_alpha(density: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Per-sample opacity ``1 - exp(-sigma * delta)``; any matching shapes ``(..., S)``."""
    return 1 - torch.exp(-torch.relu(density) * deltas)


class LaplaceDensity(nn.Module):
    """VolSDF density ``sigma(s) = (1/beta) * Psi_beta(-s)`` with learnable ``beta``.

    Args:
        beta_init: initial Laplace scale (world units).
        beta_min: floor added to ``|beta|`` so the density stays finite.
        learnable: whether ``beta`` is a parameter.
    """

    def __init__(self, beta_init: float = 0.1, beta_min: float = 1e-4, learnable: bool = True):
        super().__init__()
        if beta_init <= 0 or beta_min < 0:
            raise ConfigError(f"LaplaceDensity: expected beta_init > 0 and beta_min >= 0, got {beta_init}, {beta_min}")
        self.beta_min = float(beta_min)
        b = torch.tensor(float(beta_init))
        if learnable:
            self.raw_beta = nn.Parameter(b)
        else:
            self.register_buffer("raw_beta", b)

    @property
    def beta(self) -> torch.Tensor:
        return self.raw_beta.abs() + self.beta_min

    def forward(self, sdf: torch.Tensor, beta: torch.Tensor | None = None) -> torch.Tensor:
        """Density for SDF values of any shape (same shape out)."""
        beta = self.beta if beta is None else beta
        alpha = 1 / beta
        # Written with exp(-|s|/beta) so neither branch overflows for large |s|.
        e = 0.5 * torch.exp(-sdf.abs() / beta)
        return alpha * torch.where(sdf >= 0, e, 1 - e)

    def alphas(self, sdf: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """Opacities ``(..., S)`` of ray samples from SDF values and segment lengths ``(..., S)``."""
        return density_to_alpha(self(sdf), deltas)


class NeuSDensity(nn.Module):
    """NeuS logistic-CDF opacities with learnable sharpness ``s = exp(10 * variance)``.

    Args:
        init_variance: initial value of the variance parameter (NeuS: 0.3, i.e. ``s ≈ 20``).
        learnable: whether the variance is a parameter.
    """

    def __init__(self, init_variance: float = 0.3, learnable: bool = True):
        super().__init__()
        v = torch.tensor(float(init_variance))
        if learnable:
            self.variance = nn.Parameter(v)
        else:
            self.register_buffer("variance", v)

    @property
    def sharpness(self) -> torch.Tensor:
        return torch.exp(self.variance * 10.0).clamp(1e-6, 1e6)

    def forward(self, sdf: torch.Tensor) -> torch.Tensor:
        """The logistic density ``phi_s(sdf)`` (for visualisation; rendering uses :meth:`alphas`)."""
        s = self.sharpness
        e = torch.exp(-s * sdf.abs())
        return s * e / (1 + e) ** 2

    def alphas(self, sdf: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """Opacities ``(..., S)`` from SDF values at ordered ray samples ``(..., S)``.

        Sample ``i`` covers the segment to sample ``i+1``; the last sample's segment is closed
        with its own SDF minus its slope times ``delta`` (a linear continuation).
        """
        check_shape(deltas, "*B S", "deltas", {"B": sdf.shape[:-1], "S": sdf.shape[-1]})
        s = self.sharpness
        if sdf.shape[-1] > 1:
            slope = (sdf[..., -1:] - sdf[..., -2:-1]) / deltas[..., -2:-1].clamp_min(1e-8)
            nxt = torch.cat([sdf[..., 1:], sdf[..., -1:] + slope * deltas[..., -1:]], -1)
        else:
            nxt = sdf
        cdf_prev = torch.sigmoid(sdf * s)
        cdf_next = torch.sigmoid(nxt * s)
        return ((cdf_prev - cdf_next + 1e-6) / (cdf_prev + 1e-6)).clamp(0.0, 1.0)


def laplace_cdf(x: torch.Tensor, beta: float) -> torch.Tensor:
    """CDF of the zero-mean Laplace distribution with scale ``beta`` (used in tests)."""
    return torch.where(x <= 0, 0.5 * torch.exp(x / beta), 1 - 0.5 * torch.exp(-x / beta))


