"""Procedural 3D textures (solid textures): colour is a function of the world point only.

Being 3D, they are view-independent and seam-free, so every view of an object agrees on the
colour of a surface point — the property multi-view reconstruction assumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Texture", "sample_texture", "TEXTURE_KINDS", "TEXTURE_PALETTES"]

TEXTURE_KINDS = ("stripes", "checker", "gradient", "noise")
#: how the second colour is drawn: ``complementary`` (``b ~ 1 - a``: maximal contrast, and an
#: object's mean colour is near grey) or ``independent`` (``b`` drawn like ``a``: the mean colour
#: keeps a hue, so a blurred reconstruction is still recognisably coloured).
TEXTURE_PALETTES = ("complementary", "independent")


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


def sample_texture(
    g: torch.Generator,
    kinds: tuple[str, ...] = TEXTURE_KINDS,
    palette: str = "complementary",
    frequency: tuple[float, float] = (2.0, 6.0),
) -> Texture:
    """Draw a texture (kind, two colours, orientation, frequency) from ``g``.

    ``kinds`` restricts the pattern kinds, ``palette`` is one of :data:`TEXTURE_PALETTES`,
    ``frequency`` the range of the pattern frequency (stripes: period ``2 / f`` world units).
    The number of random draws does not depend on these options, so the objects' shapes (drawn
    from the same generator) are the same under every texture setting.
    """
    kind = kinds[int(torch.randint(len(kinds), (), generator=g))]
    a = torch.rand(3, generator=g) * 0.6 + 0.2
    jitter = torch.rand(3, generator=g)
    if palette == "complementary":
        b = (1.0 - a + (jitter - 0.5) * 0.3).clamp(0.05, 0.95)
    elif palette == "independent":
        b = jitter * 0.6 + 0.2
    else:
        from recon3d.errors import ConfigError

        raise ConfigError(f"texture palette: expected one of {list(TEXTURE_PALETTES)}, got {palette!r}")
    axis = torch.nn.functional.normalize(torch.randn(3, generator=g), dim=0)
    lo, hi = float(frequency[0]), float(frequency[1])
    freq = lo + (hi - lo) * float(torch.rand((), generator=g))
    salt = int(torch.randint(1 << 20, (), generator=g))
    return Texture(kind, a, b, axis, freq, salt)
