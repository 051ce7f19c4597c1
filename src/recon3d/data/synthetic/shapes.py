"""Analytic signed distance functions for the synthetic set, and a seeded object sampler.

An object is a small CSG tree of posed primitives: a base primitive, then zero to two more
primitives each joined by union or subtracted (difference). Distances follow the usual
analytic forms (Inigo Quilez's catalogue of SDFs); they are exact for a single primitive and
a conservative bound with the correct sign and zero set for CSG combinations, which is what
SDF supervision and sphere tracing need.

Coordinates: world ``[-1, 1]^3``, +Z up; every object is scaled to fit inside the cube.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from recon3d.data.synthetic.textures import Texture, sample_texture

__all__ = ["FAMILIES", "Primitive", "SyntheticObject", "sample_object", "random_rotation"]

#: Primitive families the sampler draws from.
FAMILIES = ("sphere", "box", "torus", "capsule", "cylinder")


def _sd_sphere(p: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    return p.norm(dim=-1) - size[0]


def _sd_box(p: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    # size = half extents (3) + corner rounding radius (1)
    q = p.abs() - size[:3] + size[3]
    return q.clamp_min(0).norm(dim=-1) + q.amax(-1).clamp_max(0) - size[3]


def _sd_torus(p: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    # size = major radius, minor radius; torus lies in the local xy plane
    q = torch.stack([p[..., :2].norm(dim=-1) - size[0], p[..., 2]], -1)
    return q.norm(dim=-1) - size[1]


def _sd_capsule(p: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    # size = half length along local z, radius
    z = p[..., 2].clamp(-size[0], size[0])
    return torch.stack([p[..., 0], p[..., 1], p[..., 2] - z], -1).norm(dim=-1) - size[1]


def _sd_cylinder(p: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    # size = radius, half height along local z
    d = torch.stack([p[..., :2].norm(dim=-1) - size[0], p[..., 2].abs() - size[1]], -1)
    return d.amax(-1).clamp_max(0) + d.clamp_min(0).norm(dim=-1)


_SDF = {"sphere": _sd_sphere, "box": _sd_box, "torus": _sd_torus, "capsule": _sd_capsule, "cylinder": _sd_cylinder}


def _bounding_radius(kind: str, size: torch.Tensor) -> float:
    s = size.tolist()
    return {
        "sphere": lambda: s[0],
        "box": lambda: math.sqrt(sum(x * x for x in s[:3])),
        "torus": lambda: s[0] + s[1],
        "capsule": lambda: s[0] + s[1],
        "cylinder": lambda: math.hypot(s[0], s[1]),
    }[kind]()


def random_rotation(g: torch.Generator) -> torch.Tensor:
    """A uniformly random 3x3 rotation (from a normalised Gaussian quaternion)."""
    q = torch.randn(4, generator=g)
    w, x, y, z = (q / q.norm()).tolist()
    return torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


@dataclass
class Primitive:
    """A posed primitive: ``sdf(p) = scale * base((R^T (p - t)) / scale)`` combined by ``op``.

    Attributes:
        kind: one of :data:`FAMILIES`.
        size: family-specific size parameters (see the ``_sd_*`` functions).
        rotation: ``(3, 3)`` local-to-world rotation.
        translation: ``(3,)`` world position.
        op: ``"union"`` or ``"difference"`` with the object built so far (ignored for the first).
    """

    kind: str
    size: torch.Tensor
    rotation: torch.Tensor
    translation: torch.Tensor
    op: str = "union"

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        local = (p - self.translation.to(p)) @ self.rotation.to(p)
        return _SDF[self.kind](local, self.size.to(p))

    def bounding_radius(self) -> float:
        return float(self.translation.norm()) + _bounding_radius(self.kind, self.size)


@dataclass
class SyntheticObject:
    """A CSG object with a procedural texture. ``sdf`` and ``albedo`` take ``(..., 3)`` points."""

    primitives: list[Primitive]
    texture: Texture
    name: str = "object"
    families: list[str] = field(default_factory=list)

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        """Signed distance ``(...)`` at world points ``p (..., 3)``; negative inside."""
        d = self.primitives[0].sdf(p)
        for prim in self.primitives[1:]:
            e = prim.sdf(p)
            d = torch.minimum(d, e) if prim.op == "union" else torch.maximum(d, -e)
        return d

    def normal(self, p: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
        """Outward unit normal ``(..., 3)`` from the SDF's central-difference gradient."""
        offs = torch.eye(3, dtype=p.dtype, device=p.device) * eps
        g = torch.stack([self.sdf(p + offs[i]) - self.sdf(p - offs[i]) for i in range(3)], -1)
        return torch.nn.functional.normalize(g, dim=-1)

    def albedo(self, p: torch.Tensor) -> torch.Tensor:
        """Base colour ``(..., 3)`` in ``[0, 1]`` at world points ``p``."""
        return self.texture(p)

    def bounding_radius(self) -> float:
        return max(prim.bounding_radius() for prim in self.primitives)


def _sample_primitive(kind: str, g: torch.Generator, scale: float) -> torch.Tensor:
    u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))
    if kind == "sphere":
        return torch.tensor([u(0.45, 0.75) * scale])
    if kind == "box":
        return torch.tensor([u(0.3, 0.6) * scale, u(0.3, 0.6) * scale, u(0.3, 0.6) * scale, u(0.0, 0.08) * scale])
    if kind == "torus":
        R = u(0.4, 0.6)
        return torch.tensor([R * scale, u(0.12, 0.25) * scale])
    if kind == "capsule":
        return torch.tensor([u(0.2, 0.45) * scale, u(0.18, 0.3) * scale])
    return torch.tensor([u(0.25, 0.5) * scale, u(0.25, 0.55) * scale])


def sample_object(seed: int, families: tuple[str, ...] = FAMILIES, max_parts: int = 3, name: str | None = None,
                  texture: dict | None = None) -> SyntheticObject:
    """Draw one object deterministically from ``seed``.

    ``texture``: keyword arguments of :func:`~recon3d.data.synthetic.textures.sample_texture`
    (kinds, palette, frequency); they change the texture only, never the shape.

    The object is a base primitive plus up to ``max_parts - 1`` posed parts joined by union
    (70 %) or subtracted (30 %), randomly rotated, then re-scaled so that its bounding sphere
    has radius at most 0.95 (so it lies inside ``[-1, 1]^3``).
    """
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        from recon3d.errors import ConfigError

        raise ConfigError(f"families: unknown {bad}; expected a subset of {list(FAMILIES)}")
    g = torch.Generator().manual_seed(int(seed))
    pick = lambda: families[int(torch.randint(len(families), (), generator=g))]
    n_parts = 1 + int(torch.randint(max_parts, (), generator=g))
    prims = [Primitive(pick(), torch.empty(0), random_rotation(g), torch.zeros(3))]
    prims[0].size = _sample_primitive(prims[0].kind, g, 1.0)
    for _ in range(n_parts - 1):
        kind = pick()
        op = "difference" if float(torch.rand((), generator=g)) < 0.3 else "union"
        t = (torch.rand(3, generator=g) * 2 - 1) * 0.45
        prims.append(Primitive(kind, _sample_primitive(kind, g, 0.7), random_rotation(g), t, op))
    obj = SyntheticObject(prims, sample_texture(g, **(texture or {})), name or f"obj_{seed}", [p.kind for p in prims])
    r = obj.bounding_radius()
    s = 0.95 / max(r, 0.95) * (0.8 + 0.2 * float(torch.rand((), generator=g)))
    for prim in obj.primitives:
        prim.size = prim.size * s
        prim.translation = prim.translation * s
    return obj
