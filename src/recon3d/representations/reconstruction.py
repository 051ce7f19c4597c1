"""``Reconstruction``: what a method's ``reconstruct(batch)`` returns, once per batch.

Validation, test and predict call :meth:`recon3d.methods.base.ReconModule.reconstruct` exactly
once per batch and derive everything else from the result: the renders scored against the
target views, the surface points scored against the ground truth, the meshes and poses fed to
the evaluation protocol, the exported files and the inputs of test-time refiners. A stochastic
generator is therefore scored, exported and refined on one and the same sample, drawn from a
per-object seed (:func:`object_seed`) so that evaluation is reproducible.

The representation types live beside this module; :class:`Reconstruction` only bundles them
with the object ids, the optional predicted cameras and the optional transform from the
method's canonical frame to the dataset's world frame.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from recon3d.errors import ShapeError

if TYPE_CHECKING:  # a type only: representations import nothing of data at run time
    from recon3d.data.cameras import Cameras

__all__ = ["Reconstruction", "object_seed", "object_seeds"]


def object_seed(object_id: str, seed: int = 0) -> int:
    """A seed for ``object_id`` that depends on the id and ``seed`` only (not on the batch it is
    in, the rank, or Python's per-process string hashing): ``sha1(f"{seed}:{id}")`` as a 63-bit
    integer. Generators draw their noise for an object from ``torch.Generator().manual_seed(it)``
    so the same object gets the same sample at every validation, test and predict."""
    if not isinstance(object_id, str):
        raise ShapeError(f"object_id: expected a string, got {type(object_id).__name__}")
    digest = hashlib.sha1(f"{int(seed)}:{object_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def object_seeds(object_ids: list[str], seed: int = 0) -> list[int]:
    """:func:`object_seed` of every id."""
    return [object_seed(i, seed) for i in object_ids]


def _select(rep: Any, index: int, what: str) -> Any:
    """Object ``index`` of ``rep`` as a batch of one. Every representation type indexes that way
    (an int keeps the batch dimension); lists give a one-entry list, tensors a ``[i:i+1]`` slice,
    dicts are split value by value and plain numbers / strings are kept."""
    if isinstance(rep, (list, tuple)):
        return [rep[index]]
    if isinstance(rep, torch.Tensor):
        return rep[index : index + 1]
    if isinstance(rep, dict):
        return {k: _select(v, index, f"{what}[{k!r}]") for k, v in rep.items()}
    if rep is None or isinstance(rep, (bool, int, float, str)):
        return rep  # metadata of the whole reconstruction (a resolution, a name), not per object
    try:
        return rep[index]
    except TypeError:
        raise ShapeError(f"{what}: a {type(rep).__name__} cannot be split per object (it is not indexable)") from None


@dataclass
class Reconstruction:
    """The reconstruction of ``B`` objects.

    Attributes:
        object_ids: ``B`` ids, in batch order.
        representation: the primary representation the default renderer draws
            (:class:`~recon3d.representations.Triplanes`, :class:`~recon3d.representations.NeuralField`,
            :class:`~recon3d.representations.Gaussians`, :class:`~recon3d.representations.Meshes`,
            :class:`~recon3d.representations.SparseVoxels`, or a list with one entry per object).
        extras: further representations or by-products by name, e.g. ``"mesh"``
            (:class:`~recon3d.representations.Meshes`, used for geometry metrics and export when
            the primary one is not a mesh), ``"voxels"``, ``"latents"``.
        cameras: predicted input-view cameras ``(B, V)`` (pose-free methods), else None.
        to_world: ``(B, 4, 4)`` transform from the method's canonical frame to the dataset's
            world frame, or None when the method already works in the dataset's frame.
        seeds: the per-object seeds the sample was drawn with (stochastic methods), else None.
    """

    object_ids: list[str]
    representation: Any
    extras: dict[str, Any] = field(default_factory=dict)
    cameras: Cameras | None = None
    to_world: torch.Tensor | None = None
    seeds: list[int] | None = None

    def __post_init__(self) -> None:
        self.object_ids = list(self.object_ids)
        if not all(isinstance(i, str) for i in self.object_ids):
            raise ShapeError("object_ids: expected a list of strings")
        B = len(self.object_ids)
        if self.to_world is not None and tuple(self.to_world.shape) != (B, 4, 4):
            raise ShapeError(f"to_world: expected ({B}, 4, 4) for {B} objects, got {tuple(self.to_world.shape)}")
        if self.seeds is not None and len(self.seeds) != B:
            raise ShapeError(f"seeds: expected {B} seeds, got {len(self.seeds)}")
        if self.cameras is not None and self.cameras.batch_shape[0] != B:
            raise ShapeError(f"cameras: expected batch {B}, got {tuple(self.cameras.batch_shape)}")

    def __len__(self) -> int:
        return len(self.object_ids)

    def get(self, name: str, default: Any = None) -> Any:
        """``extras[name]``, or ``default``."""
        return self.extras.get(name, default)

    def find(self, kind: type) -> Any:
        """The first of the primary representation and the extras that is a ``kind``, else None
        (e.g. ``rec.find(Meshes)`` for the geometry metrics)."""
        for rep in (self.representation, *self.extras.values()):
            if isinstance(rep, kind):
                return rep
        return None

    def select(self, index: int) -> Reconstruction:
        """Object ``index`` alone (``B = 1``): every representation, the cameras, the transform."""
        if not -len(self) <= index < len(self):
            raise ShapeError(f"index: expected 0 <= index < {len(self)}, got {index}")
        index %= len(self)
        return Reconstruction(
            [self.object_ids[index]],
            _select(self.representation, index, "representation"),
            {k: _select(v, index, f"extras[{k!r}]") for k, v in self.extras.items()},
            None if self.cameras is None else self.cameras[index : index + 1],
            None if self.to_world is None else self.to_world[index : index + 1],
            None if self.seeds is None else [self.seeds[index]],
        )

    def replace(self, **changes: Any) -> Reconstruction:
        """A copy with some fields changed (refiners return one)."""
        return replace(self, **changes)
