"""The standard 3DGS parameterisation, batched.

Attributes are stored *activated*: unit-free scales (not log), opacities in [0, 1], quaternions
``(w, x, y, z)`` (normalised on use). Colours are either RGB ``(B, N, 3)`` in [0, 1] or real
spherical-harmonics coefficients ``(B, N, (d+1)^2, 3)`` whose DC term encodes ``rgb - 0.5``
(``rgb = 0.5 + C0 * f_dc``), as in the 3DGS code and gsplat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recon3d.errors import ShapeError
from recon3d.utils.checks import check_finite, check_shape

__all__ = ["Gaussians", "quat_to_rotmat", "eval_sh", "SH_C0", "rgb_to_sh_dc", "sh_dc_to_rgb"]

SH_C0 = 0.28209479177387814  # 1 / (2 sqrt(pi))


def rgb_to_sh_dc(rgb: torch.Tensor) -> torch.Tensor:
    """DC SH coefficient giving colour ``rgb`` (any shape)."""
    return (rgb - 0.5) / SH_C0


def sh_dc_to_rgb(dc: torch.Tensor) -> torch.Tensor:
    """Colour of a DC-only SH coefficient (any shape)."""
    return dc * SH_C0 + 0.5


def quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` from quaternions ``(..., 4)`` ``(w, x, y, z)`` (normalised here)."""
    w, x, y, z = torch.nn.functional.normalize(q, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        -1,
    ).reshape(*q.shape[:-1], 3, 3)


def eval_sh(coeffs: torch.Tensor, dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """Colour from real SH ``coeffs (..., K, 3)`` seen along unit ``dirs (..., 3)``, degree ≤ 3.

    Returns ``(..., 3)``: ``0.5 + sum_k Y_k(dir) c_k``, clamped at 0 (the 3DGS convention).
    """
    if not 0 <= degree <= 3:
        raise ShapeError(f"sh degree: expected 0..3, got {degree}")
    if coeffs.shape[-2] < (degree + 1) ** 2:
        raise ShapeError(f"coeffs: expected at least {(degree + 1) ** 2} SH coefficients for degree {degree}, got {coeffs.shape[-2]}")
    x, y, z = dirs.unbind(-1)
    basis = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        c1 = math.sqrt(3 / (4 * math.pi))
        basis += [-c1 * y, c1 * z, -c1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        c2a, c2b, c2c = math.sqrt(15 / (4 * math.pi)), math.sqrt(5 / (16 * math.pi)), math.sqrt(15 / (16 * math.pi))
        basis += [c2a * xy, -c2a * yz, c2b * (2 * zz - xx - yy), -c2a * xz, c2c * (xx - yy)]
    if degree >= 3:
        a = math.sqrt(35 / (32 * math.pi))
        b = math.sqrt(105 / (4 * math.pi))
        c = math.sqrt(21 / (32 * math.pi))
        d = math.sqrt(7 / (16 * math.pi))
        e = math.sqrt(105 / (16 * math.pi))
        basis += [
            -a * y * (3 * xx - yy),
            b * xy * z,
            -c * y * (4 * zz - xx - yy),
            d * z * (2 * zz - 3 * xx - 3 * yy),
            -c * x * (4 * zz - xx - yy),
            e * z * (xx - yy),
            -a * x * (xx - 3 * yy),
        ]
    Y = torch.stack(basis, -1)  # ..., K
    return ((Y[..., None] * coeffs[..., : Y.shape[-1], :]).sum(-2) + 0.5).clamp_min(0.0)


@dataclass
class Gaussians:
    """A batch of 3D Gaussian sets, ``B`` sets of ``N`` Gaussians each.

    Attributes:
        means: ``(B, N, 3)`` world positions.
        quats: ``(B, N, 4)`` rotations ``(w, x, y, z)``.
        scales: ``(B, N, 3)`` standard deviations along the local axes (activated).
        opacities: ``(B, N)`` in [0, 1] (activated).
        colors: ``(B, N, 3)`` RGB in [0, 1], or SH coefficients ``(B, N, K, 3)`` with ``sh_degree``.
        sh_degree: ``None`` for RGB colours, else the SH degree of ``colors``.
    """

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor
    sh_degree: int | None = None

    def __post_init__(self) -> None:
        dims = check_shape(self.means, "B N 3", "means")
        check_shape(self.quats, "B N 4", "quats", dims)
        check_shape(self.scales, "B N 3", "scales", dims)
        check_shape(self.opacities, "B N", "opacities", dims)
        if self.sh_degree is None:
            check_shape(self.colors, "B N 3", "colors", dims)
        else:
            check_shape(self.colors, "B N K 3", "colors (SH coefficients)", dims)
            if self.colors.shape[2] < (self.sh_degree + 1) ** 2:
                raise ShapeError(f"colors: expected >= {(self.sh_degree + 1) ** 2} SH coefficients for degree {self.sh_degree}, got {self.colors.shape[2]}")
        if dims["N"] == 0:
            raise ShapeError("means: expected a non-empty Gaussian set, got N=0")
        for name in ("means", "quats", "scales", "opacities"):
            check_finite(getattr(self, name).detach(), name)

    @classmethod
    def from_raw(cls, means, quats, log_scales, opacity_logits, colors, sh_degree: int | None = None) -> Gaussians:
        """Build from unconstrained parameters (log scales, opacity logits), as optimised in 3DGS."""
        return cls(means, quats, torch.exp(log_scales), torch.sigmoid(opacity_logits), colors, sh_degree)

    @property
    def batch_size(self) -> int:
        return self.means.shape[0]

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[1]

    def covariances(self) -> torch.Tensor:
        """World covariances ``(B, N, 3, 3)`` = ``R diag(s²) Rᵀ``."""
        R = quat_to_rotmat(self.quats)
        M = R * self.scales[..., None, :]
        return M @ M.transpose(-1, -2)

    def rgb(self, cam_centers: torch.Tensor | None = None) -> torch.Tensor:
        """Colours ``(B, V, N, 3)`` seen from camera centres ``(B, V, 3)`` (view-independent if RGB)."""
        if self.sh_degree is None:
            V = 1 if cam_centers is None else cam_centers.shape[1]
            return self.colors[:, None].expand(-1, V, -1, -1)
        if cam_centers is None:
            raise ShapeError("cam_centers: SH colours need the camera centres")
        dirs = torch.nn.functional.normalize(self.means[:, None] - cam_centers[:, :, None], dim=-1)
        return eval_sh(self.colors[:, None], dirs, self.sh_degree)

    def to(self, *args, **kwargs) -> Gaussians:
        t = lambda x: x.to(*args, **kwargs)
        return Gaussians(t(self.means), t(self.quats), t(self.scales), t(self.opacities), t(self.colors), self.sh_degree)

    def __getitem__(self, idx) -> Gaussians:
        """Select batch entries (keeps the batch dimension for an int index)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Gaussians(self.means[idx], self.quats[idx], self.scales[idx], self.opacities[idx], self.colors[idx], self.sh_degree)
