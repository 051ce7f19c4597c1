"""One result type for every renderer: one name per rendered quantity.

Every renderer of :mod:`recon3d.render` (volume, Gaussians, the mesh route of
:func:`recon3d.render.render`) returns a :class:`RenderOutput`; methods' ``render_views`` return one
too (or a plain dict with the same keys). Coverage is called ``alpha`` everywhere (the volume
renderer's accumulated opacity, the Gaussian rasterizer's ``1 - T``, a mesh's (soft) silhouette).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from recon3d.errors import ShapeError
from recon3d.utils.checks import check_shape

__all__ = ["RenderOutput", "RENDER_QUANTITIES"]

#: The named quantities, in order; everything else a renderer returns goes to ``extras``.
RENDER_QUANTITIES = ("rgb", "alpha", "depth", "normal")


@dataclass
class RenderOutput:
    """Images rendered into ``(B, V)`` cameras.

    Attributes:
        rgb: ``(B, V, 3, H, W)`` colour with the background composited.
        alpha: ``(B, V, 1, H, W)`` coverage in [0, 1], or None.
        depth: ``(B, V, 1, H, W)`` z-depth along the camera axis, 0 where empty, or None.
        normal: ``(B, V, 3, H, W)`` world-space normals, or None.
        extras: renderer-specific outputs (e.g. the Gaussian rasterizer's ``means2d``, ``radii``).

    Read-only mapping access (``out["rgb"]``, ``out.get("normal")``, ``"depth" in out``) covers
    the named quantities that are set and the extras, so code written for the dict outputs of
    earlier versions keeps working with the new names.
    """

    rgb: torch.Tensor
    alpha: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    normal: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        dims = check_shape(self.rgb, "B V 3 H W", "rgb")
        for name, c in (("alpha", 1), ("depth", 1), ("normal", 3)):
            x = getattr(self, name)
            if x is not None:
                check_shape(x, f"B V {c} H W", name, dims)
        clash = set(self.extras) & set(RENDER_QUANTITIES)
        if clash:
            raise ShapeError(f"extras: {sorted(clash)} are named quantities of RenderOutput, not extras")

    # ------------------------------------------------------------------ mapping access
    def keys(self) -> list[str]:
        return [k for k in RENDER_QUANTITIES if getattr(self, k) is not None] + list(self.extras)

    def __getitem__(self, key: str) -> Any:
        if key in RENDER_QUANTITIES:
            value = getattr(self, key)
            if value is not None:
                return value
        elif key in self.extras:
            return self.extras[key]
        raise KeyError(f"{key!r}: this render has {self.keys()}")

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def items(self) -> list[tuple[str, Any]]:
        return [(k, self[k]) for k in self.keys()]

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_dict(cls, out: dict[str, Any]) -> RenderOutput:
        """From a dict with ``rgb`` and optionally ``alpha``/``depth``/``normal`` (others: extras)."""
        if "rgb" not in out:
            raise ShapeError(f"render output: expected an 'rgb' entry, got keys {sorted(out)}")
        named = {k: out.get(k) for k in RENDER_QUANTITIES}
        return cls(**named, extras={k: v for k, v in out.items() if k not in RENDER_QUANTITIES})

    @classmethod
    def cat(cls, outputs: Sequence[RenderOutput]) -> RenderOutput:
        """Concatenate along the object axis ``B`` (renders of one object each, e.g. ragged sets).

        A quantity is kept when every part has it. An extra every part has is concatenated along
        its first axis when all parts' values are tensors agreeing in the other axes, else kept as
        the list of the parts' values (e.g. ``means2d`` of ragged Gaussian sets).
        """
        if not outputs:
            raise ShapeError("outputs: expected at least one RenderOutput to concatenate")
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extras":
                continue
            parts = [getattr(o, f.name) for o in outputs]
            kw[f.name] = torch.cat(parts) if all(p is not None for p in parts) else None
        if len(outputs) == 1:
            return cls(**kw, extras=dict(outputs[0].extras))
        extras = {}
        for k in sorted(set.intersection(*(set(o.extras) for o in outputs))):
            vals = [o.extras[k] for o in outputs]
            same = all(isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[1:] == vals[0].shape[1:] for v in vals)
            extras[k] = torch.cat(vals) if same else vals
        return cls(**kw, extras=extras)
