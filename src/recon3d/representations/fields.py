"""Neural fields: a callable from world points to density (or SDF) and colour, inside a box.

A field answers ``points (B, N, 3) -> {"density" (B, N) | "sdf" (B, N), "rgb" (B, N, 3), ...}``
for ``B`` objects at once (the contract of :class:`recon3d.render.volume.VolumeRenderer`).

- :class:`NeuralField` wraps any such callable with its box (e.g. M3D's image-conditioned SDF
  decoder closed over one batch's features);
- :class:`Triplanes` is the triplane field of GTR / LRM: feature planes ``(B, 3, C, R, R)`` (xy,
  xz, yz) plus the decoder module that maps ``(planes, points)`` to the field's outputs
  (:class:`recon3d.models.gtr.field.TriplaneField`), and the cube the planes span.

Both are representations (renderable by :func:`recon3d.render.render` through the volume
renderer); neither owns parameters: the decoder is a reference to the method's module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from recon3d.errors import ShapeError
from recon3d.utils.checks import check_shape

if TYPE_CHECKING:
    from recon3d.data.batch import Views

__all__ = ["NeuralField", "Triplanes", "as_box"]


def as_box(aabb, name: str = "aabb") -> torch.Tensor:
    """``(lo, hi)`` of a cube or a ``(2, 3)`` box as a float32 ``(2, 3)`` tensor with ``lo < hi``."""
    box = torch.as_tensor(aabb, dtype=torch.float32).detach().cpu()
    if box.shape == (2,):
        box = box[:, None].expand(2, 3).clone()
    if box.shape != (2, 3) or not bool((box[1] > box[0]).all()):
        raise ShapeError(f"{name}: expected (lo, hi) or a (2, 3) box with lo < hi, got {box.tolist()}")
    return box


@dataclass
class NeuralField:
    """Any batched field with its box.

    Attributes:
        fn: ``points (B, N, 3) -> dict`` (module docstring).
        aabb: ``(2, 3)`` box (or ``(lo, hi)``) outside which the field is empty.
        batch_size: ``B``, the number of objects ``fn`` answers for.
    """

    fn: Callable[[torch.Tensor], dict]
    aabb: torch.Tensor
    batch_size: int = 1

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ShapeError(f"fn: expected a callable points (B, N, 3) -> dict, got {type(self.fn).__name__}")
        self.aabb = as_box(self.aabb)
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ShapeError(f"batch_size: expected an integer >= 1, got {self.batch_size!r}")

    def __call__(self, points: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fn(points)


@dataclass
class Triplanes:
    """Triplane feature planes and the decoder that reads them (module docstring).

    Attributes:
        planes: ``(B, 3, C, R, R)`` planes in the order xy, xz, yz.
        decoder: module with ``decoder(planes, points (B, N, 3)) -> dict`` (density or sdf, rgb);
            GTR's :class:`~recon3d.models.gtr.field.TriplaneField`.
        aabb: the cube ``(lo, hi)`` (or ``(2, 3)`` box) the planes span; defaults to
            ``decoder.aabb`` when the decoder has one, else ``(-1, 1)``.
        views: the input views a pixel-aligned decoder reads besides the planes
            (:class:`~recon3d.models.gtr.pixel_field.PixelAlignedTriplaneField`): a
            :class:`~recon3d.data.batch.Views` of batch ``(B, V)``, passed as
            ``decoder(planes, points, views=views)`` and sliced with the planes; None for a
            decoder of the planes alone.
    """

    planes: torch.Tensor
    decoder: nn.Module | Callable
    aabb: torch.Tensor | tuple[float, float] | None = None
    views: Views | None = None

    def __post_init__(self) -> None:
        dims = check_shape(self.planes, "B 3 C H W", "planes")
        if not callable(self.decoder):
            raise ShapeError(f"decoder: expected a module decoder(planes, points) -> dict, got {type(self.decoder).__name__}")
        if self.aabb is None:
            self.aabb = getattr(self.decoder, "aabb", (-1.0, 1.0))
        self.aabb = as_box(self.aabb)
        if self.views is not None:
            check_shape(self.views.images, f"{dims['B']} V 3 H W", "views.images")

    @property
    def batch_size(self) -> int:
        return self.planes.shape[0]

    @property
    def resolution(self) -> int:
        return self.planes.shape[-1]

    def __call__(self, points: torch.Tensor) -> dict[str, torch.Tensor]:
        """The field at world ``points (B, N, 3)``."""
        if self.views is None:
            return self.decoder(self.planes, points)
        return self.decoder(self.planes, points, views=self.views)

    def __getitem__(self, idx: int | slice) -> Triplanes:
        """Objects ``idx`` (an int keeps the batch dimension); the views follow the planes."""
        if isinstance(idx, int):
            if not -self.batch_size <= idx < self.batch_size:
                raise IndexError(f"Triplanes index {idx}: the batch has {self.batch_size} objects")
            idx = slice(idx % self.batch_size, idx % self.batch_size + 1)
        views = None if self.views is None else self.views.slice(idx)
        return Triplanes(self.planes[idx], self.decoder, self.aabb, views)

    def split(self) -> list[Triplanes]:
        return [self[i] for i in range(self.batch_size)]

    @classmethod
    def from_list(cls, items: list[Triplanes]) -> Triplanes:
        """Stack batches of triplanes that share one decoder and box."""
        if not items:
            raise ShapeError("items: expected at least one Triplanes")
        for i, t in enumerate(items[1:], 1):
            if t.decoder is not items[0].decoder or not torch.equal(t.aabb, items[0].aabb):
                raise ShapeError(f"items[{i}]: expected the decoder and aabb of items[0] (one field, several objects)")
            if (t.views is None) != (items[0].views is None):
                raise ShapeError(f"items[{i}]: expected views like items[0] (all or none)")
        views = None
        if items[0].views is not None:
            from recon3d.data.batch import Views

            views = Views.cat([t.views for t in items])
        return cls(torch.cat([t.planes for t in items]), items[0].decoder, items[0].aabb, views)

    def to(self, *args, **kwargs) -> Triplanes:
        """Move/cast the planes and views (the decoder is the method's module and is not moved)."""
        views = None if self.views is None else self.views.to(*args, **kwargs)
        return Triplanes(self.planes.to(*args, **kwargs), self.decoder, self.aabb, views)

    def detach(self) -> Triplanes:
        return Triplanes(self.planes.detach(), self.decoder, self.aabb, self.views)
