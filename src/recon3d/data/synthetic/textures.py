"""Procedural 3D textures (solid textures): colour is a function of the world point only.

Being 3D, they are view-independent and seam-free, so every view of an object agrees on the
colour of a surface point — the property multi-view reconstruction assumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Texture", "sample_texture", "TEXTURE_KINDS"]

TEXTURE_KINDS = ("stripes", "checker", "gradient", "noise")


def _hash3(ijk: torch.Tensor, salt: int) -> torch.Tensor:
    """Deterministic pseudo-random value in [0, 1) per integer lattice point ``(..., 3)``."""
    h = ijk[..., 0] * 73856093 ^ ijk[..., 1] * 19349663 ^ ijk[..., 2] * 83492791 ^ salt
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF).to(torch.float32) / 65536.0


def value_noise(p: torch.Tensor, freq: float, salt: int) -> torch.Tensor:
    """Trilinear value noise in [0, 1) at points ``(..., 3)``."""
    q = p * freq
    i0 = torch.floor(q)
    f = q - i0
    f = f * f * (3 - 2 * f)  # smoothstep weights: C1 across lattice cells
    i0 = i0.to(torch.int64)
    out = torch.zeros(p.shape[:-1], dtype=p.dtype, device=p.device)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                corner = i0 + torch.tensor([dx, dy, dz], device=p.device)
                w = (f[..., 0] if dx else 1 - f[..., 0]) * (f[..., 1] if dy else 1 - f[..., 1]) * (f[..., 2] if dz else 1 - f[..., 2])
                out = out + w * _hash3(corner, salt).to(p.dtype)
    return out


@dataclass
class Texture:
    """A solid texture mixing two colours by a scalar pattern ``t(p) in [0, 1]``."""

    kind: str
    color_a: torch.Tensor
    color_b: torch.Tensor
    axis: torch.Tensor
    freq: float
    salt: int

    def pattern(self, p: torch.Tensor) -> torch.Tensor:
        s = p @ self.axis.to(p)
        if self.kind == "stripes":
            return 0.5 + 0.5 * torch.sin(s * self.freq * torch.pi)
        if self.kind == "checker":
            c = torch.floor(p * self.freq * 0.5).to(torch.int64).sum(-1) % 2
            return c.to(p.dtype)
        if self.kind == "gradient":
            return ((s + 1) / 2).clamp(0, 1)
        # Raw value noise clusters around 0.5; stretch it so the two colours both show.
        return ((value_noise(p, self.freq, self.salt) - 0.5) * 2.5 + 0.5).clamp(0, 1)

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        t = self.pattern(p)[..., None]
        return self.color_a.to(p) * (1 - t) + self.color_b.to(p) * t


def sample_texture(g: torch.Generator) -> Texture:
    """Draw a texture (kind, two contrasting colours, orientation, frequency) from ``g``."""
    kind = TEXTURE_KINDS[int(torch.randint(len(TEXTURE_KINDS), (), generator=g))]
    a = torch.rand(3, generator=g) * 0.6 + 0.2
    b = (1.0 - a + (torch.rand(3, generator=g) - 0.5) * 0.3).clamp(0.05, 0.95)
    axis = torch.nn.functional.normalize(torch.randn(3, generator=g), dim=0)
    freq = 2.0 + 4.0 * float(torch.rand((), generator=g))
    salt = int(torch.randint(1 << 20, (), generator=g))
    return Texture(kind, a, b, axis, freq, salt)
