"""The one batch contract between datasets and methods.

A dataset yields one :class:`Sample` per object (no batch dimension); :func:`collate_samples`
stacks them into a :class:`Batch`. Shapes (``B`` objects, ``V`` views, images ``H x W``):

================================  =========================  ====================================
field                             shape                      meaning
================================  =========================  ====================================
``Views.images``                  ``(B, V, 3, H, W)``        RGB in [0, 1], composited on ``background``
``Views.masks``                   ``(B, V, 1, H, W)``        foreground alpha in [0, 1] (optional)
``Views.depths``                  ``(B, V, 1, H, W)``        z-depth along the camera axis, 0 where empty (optional)
``Views.normals``                 ``(B, V, 3, H, W)``        world-space unit normals, 0 where empty (optional)
``Views.cameras``                 ``Cameras`` ``(B, V)``     OpenCV c2w + pixel K; None for unposed views
``Geometry.surface_points``       ``(B, P, 3)``              points on the true surface (world)
``Geometry.surface_normals``      ``(B, P, 3)``              their outward unit normals
``Geometry.sdf_points``           ``(B, S, 3)``              query points (world)
``Geometry.sdf_values``           ``(B, S)``                 signed distance, negative inside
``Geometry.mesh_paths``           ``list[str]`` of ``B``     ground-truth mesh files (optional)
================================  =========================  ====================================

Methods read the fields they need through :meth:`Batch.require`, which names what is missing
(``batch.require("inputs.cameras", who="LGM")`` for a method that cannot run on unposed views;
``"extras.<key>"`` for a dataset-specific tensor).

Collation (:func:`collate_samples`): per-object tensors of one shape (images, geometry, extras)
are stacked along a new batch dimension; tensors whose shapes differ between the objects of a
batch (a point set of 100 rows and one of 137, sparse-voxel coordinates) become a **list** of
``B`` tensors instead, in batch order. Read such a field with :func:`stacked` where a method
needs one tensor (a one-line DataError names the field and its shapes if it is ragged), or
handle ``list`` explicitly. Images of different sizes are still refused (resize them in the
datamodule), and so is a field present for some objects and absent for others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from recon3d.data.cameras import Cameras
from recon3d.errors import DataError, ShapeError
from recon3d.utils.checks import check_range, check_shape

__all__ = ["Views", "Geometry", "Sample", "Batch", "collate_samples", "stacked"]

#: A collated per-object field: one ``(B, ...)`` tensor, or a list of ``B`` tensors when ragged.
Field = torch.Tensor | list[torch.Tensor]


def _opt_to(x, *args, **kwargs):
    if x is None:
        return None
    if isinstance(x, list):  # a ragged field (module docstring)
        return [t.to(*args, **kwargs) for t in x]
    return x.to(*args, **kwargs)


def stacked(x: Field | None, name: str) -> torch.Tensor | None:
    """``x`` as one ``(B, ...)`` tensor: a tensor as it is, a ragged list refused with one line.

    Args:
        x: a collated field (a tensor, a list of per-object tensors, or None).
        name: the field's dotted name for the message (``"geometry.surface_points"``).
    """
    if x is None or isinstance(x, torch.Tensor):
        return x
    shapes = sorted({tuple(t.shape) for t in x})
    if len(shapes) == 1:
        return torch.stack(list(x))
    raise DataError("batch", f"{name} has a different shape per object ({', '.join(str(list(s)) for s in shapes[:3])}"
                    f"{' ...' if len(shapes) > 3 else ''}); expected one shape to stack (use a batch size of 1, or "
                    "read the list per object)")

#: Why a field may be absent, for :meth:`Batch.require`'s message.
_HINTS = {
    "cameras": "the dataset gives unposed views (e.g. ImageFolderDataset without a cameras file); use a posed "
               "dataset or a method that predicts cameras",
    "masks": "the images carry no alpha (RGB files); use RGBA images or a mask folder",
}

@dataclass
class Views:
    """A set of views, with or without a leading batch dimension; ``cameras`` is None when unposed."""

    images: torch.Tensor
    cameras: Cameras | None = None
    masks: torch.Tensor | None = None
    depths: torch.Tensor | None = None
    normals: torch.Tensor | None = None

    def validate(self, prefix: str, batched: bool) -> None:
        """Check shapes and value ranges; raise :class:`ShapeError` naming ``prefix.field``."""
        lead = "B V" if batched else "V"
        dims: dict = {}
        check_shape(self.images, f"{lead} 3 H W", f"{prefix}.images", dims)
        check_range(self.images, f"{prefix}.images", 0.0, 1.0)
        for name, ch in (("masks", 1), ("depths", 1), ("normals", 3)):
            t = getattr(self, name)
            if t is not None:
                check_shape(t, f"{lead} {ch} H W", f"{prefix}.{name}", dims)
        if self.masks is not None:
            check_range(self.masks, f"{prefix}.masks", 0.0, 1.0)
        if self.cameras is None:
            return
        cam_shape = tuple(self.images.shape[: 2 if batched else 1])
        if tuple(self.cameras.batch_shape) != cam_shape:
            raise ShapeError(f"{prefix}.cameras: expected batch shape {list(cam_shape)}, got {list(self.cameras.batch_shape)}")
        if (self.cameras.height, self.cameras.width) != tuple(self.images.shape[-2:]):
            raise ShapeError(
                f"{prefix}.cameras: image size {self.cameras.width}x{self.cameras.height} does not match "
                f"images {self.images.shape[-1]}x{self.images.shape[-2]}"
            )

    @property
    def num_views(self) -> int:
        return self.images.shape[-4]

    def select(self, index: int) -> Views:
        """Object ``index`` of a batched set, keeping the batch dimension (``(1, V, ...)``)."""
        return self.slice(slice(index, index + 1))

    def slice(self, sl: slice) -> Views:
        """Objects ``sl`` of a batched set (every field sliced alike)."""
        pick = lambda x: None if x is None else x[sl]  # noqa: E731
        return Views(self.images[sl], pick(self.cameras), pick(self.masks), pick(self.depths), pick(self.normals))

    @staticmethod
    def cat(items: list[Views]) -> Views:
        """Batched sets concatenated along the batch; a field is kept only if every item has it."""
        def join(name: str):
            parts = [getattr(v, name) for v in items]
            if any(p is None for p in parts):
                return None
            return Cameras.cat(parts) if name == "cameras" else torch.cat(parts)

        return Views(join("images"), join("cameras"), join("masks"), join("depths"), join("normals"))

    def to(self, *args, **kwargs) -> Views:
        return Views(
            self.images.to(*args, **kwargs),
            _opt_to(self.cameras, *args, **kwargs),
            _opt_to(self.masks, *args, **kwargs),
            _opt_to(self.depths, *args, **kwargs),
            _opt_to(self.normals, *args, **kwargs),
        )


@dataclass
class Geometry:
    """Ground-truth geometry of an object (all optional).

    In a :class:`Batch` each tensor field is ``(B, ...)``, or a list of ``B`` tensors when the
    objects' sizes differ (module docstring).
    """

    surface_points: Field | None = None
    surface_normals: Field | None = None
    sdf_points: Field | None = None
    sdf_values: Field | None = None
    mesh_paths: list[str] | None = None

    def to(self, *args, **kwargs) -> Geometry:
        return Geometry(
            _opt_to(self.surface_points, *args, **kwargs),
            _opt_to(self.surface_normals, *args, **kwargs),
            _opt_to(self.sdf_points, *args, **kwargs),
            _opt_to(self.sdf_values, *args, **kwargs),
            self.mesh_paths,
        )


@dataclass
class Sample:
    """One object: its input views, supervision views and optional geometry (no batch dim)."""

    object_id: str
    inputs: Views
    targets: Views
    geometry: Geometry = field(default_factory=Geometry)
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    #: Dataset-specific tensors (e.g. 3D-FRONT ``roi_box``, ``class_code``, ``depth_prior``),
    #: stacked along a new batch dimension by :func:`collate_samples`.
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def validate(self) -> Sample:
        self.inputs.validate("inputs", batched=False)
        self.targets.validate("targets", batched=False)
        return self


@dataclass
class Batch:
    """A collated batch of :class:`Sample` objects (see module docstring for shapes)."""

    object_ids: list[str]
    inputs: Views
    targets: Views
    geometry: Geometry = field(default_factory=Geometry)
    background: torch.Tensor | None = None  # (B, 3)
    #: ``(object_id, reason)`` of objects dropped from this batch by ``on_bad_sample="skip"``.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: Dataset-specific tensors, ``(B, ...)`` each, or a list of ``B`` when ragged (see
    #: :attr:`Sample.extras` and the module docstring).
    extras: dict[str, Field] = field(default_factory=dict)

    @classmethod
    def empty(cls, skipped: list[tuple[str, str]]) -> Batch:
        """A batch whose every object was skipped (methods skip the step)."""
        nothing = Views(torch.zeros(0, 0, 3, 1, 1), Cameras(torch.eye(4).expand(0, 0, 4, 4), torch.eye(3).expand(0, 0, 3, 3), 1, 1))
        return cls([], nothing, nothing, Geometry(), None, skipped)

    def __len__(self) -> int:
        return len(self.object_ids)

    def to(self, *args, **kwargs) -> Batch:
        return Batch(
            self.object_ids,
            self.inputs.to(*args, **kwargs),
            self.targets.to(*args, **kwargs),
            self.geometry.to(*args, **kwargs),
            _opt_to(self.background, *args, **kwargs),
            self.skipped,
            {k: _opt_to(v, *args, **kwargs) for k, v in self.extras.items()},
        )

    def require(self, *paths: str, who: str = "this method") -> None:
        """Raise :class:`DataError` unless every dotted field is present.

        Args:
            paths: fields such as ``"inputs.cameras"``, ``"targets.depths"``,
                ``"geometry.sdf_points"`` or ``"extras.depth_prior"`` (a key of :attr:`extras`).
            who: the method (or part) that needs them, named in the message.

        A path that names no field of the batch contract is a programming error: ``ValueError``
        listing the fields that exist.
        """
        missing = []
        for p in paths:
            obj: object = self
            for part in p.split("."):
                if isinstance(obj, dict):
                    obj = obj.get(part)
                elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
                    names = [f.name for f in dataclasses.fields(obj)]
                    if part not in names:
                        raise ValueError(f"Batch.require({p!r}): {type(obj).__name__} has no field {part!r}; "
                                         f"expected one of {names}")
                    obj = getattr(obj, part)
                else:
                    raise ValueError(f"Batch.require({p!r}): {part!r} is below a tensor, not a field")
                if obj is None:
                    break
            if obj is None:
                missing.append(p)
        if missing:
            hints = sorted({_HINTS[m.rsplit(".", 1)[-1]] for m in missing if m.rsplit(".", 1)[-1] in _HINTS})
            why = "; ".join(hints) if hints else "check the dataset's options"
            raise DataError(
                f"batch of {self.object_ids[:3]}",
                f"{who} needs {', '.join(missing)}; the dataset does not provide it ({why})",
            )


def _stack_or_list(items: list[torch.Tensor]) -> Field:
    """One ``(B, ...)`` tensor when every item has one shape, else the list itself (module docstring)."""
    items = [torch.as_tensor(x) for x in items]
    if len({tuple(x.shape) for x in items}) == 1:
        return torch.stack(items)
    return items


def _stack_opt(items: list, name: str, ids: list[str] | None = None):
    present = [x is not None for x in items]
    if not any(present):
        return None
    if not all(present):
        ids = ids or [str(i) for i in range(len(items))]
        lack = [i for i, p in zip(ids, present) if not p]
        have = [i for i, p in zip(ids, present) if p]
        hint = " (RGB images among RGBA ones?)" if name.endswith(".masks") else ""
        raise DataError(
            f"objects {lack[:3]}" + (f" (+{len(lack) - 3} more)" if len(lack) > 3 else ""),
            f"have no {name} while {have[:3]} in the same batch do{hint}; expected every object of the dataset "
            "to provide it or none",
        )
    return _stack_or_list(items)


def _collate_views(views: list[Views], name: str, ids: list[str] | None = None) -> Views:
    sizes = {tuple(v.images.shape) for v in views}
    if len(sizes) != 1:
        raise DataError("collate", f"{name}.images of different shapes in one batch: {sorted(sizes)}; resize them in the datamodule")
    posed = [v.cameras is not None for v in views]
    if any(posed) and not all(posed):
        ids = ids or [str(i) for i in range(len(views))]
        lack = [i for i, p in zip(ids, posed) if not p]
        raise DataError(f"objects {lack[:3]}", f"have no {name}.cameras while other objects of the batch do; expected "
                        "every object of the dataset posed or none")
    return Views(
        torch.stack([v.images for v in views]),
        Cameras.stack([v.cameras for v in views]) if all(posed) else None,
        _stack_opt([v.masks for v in views], f"{name}.masks", ids),
        _stack_opt([v.depths for v in views], f"{name}.depths", ids),
        _stack_opt([v.normals for v in views], f"{name}.normals", ids),
    )


def collate_samples(samples: list[Sample]) -> Batch:
    """Stack samples into a :class:`Batch` (``torch.utils.data.DataLoader`` ``collate_fn``).

    Same-shape per-object tensors stack to ``(B, ...)``; ragged ones become lists of ``B`` tensors
    (module docstring).
    """
    if not samples:
        raise DataError("collate", "empty batch (every object of the batch was skipped)")
    ids = [str(s.object_id) for s in samples]
    geo = [s.geometry for s in samples]
    geometry = Geometry(
        *(_stack_opt([getattr(g, f.name) for g in geo], f"geometry.{f.name}", ids) for f in dataclasses.fields(Geometry) if f.name != "mesh_paths"),
        mesh_paths=[g.mesh_paths[0] for g in geo] if all(g.mesh_paths for g in geo) else None,
    )
    keys = [set(s.extras) for s in samples]
    if any(k != keys[0] for k in keys):
        raise DataError("collate", f"extras keys differ between objects of one batch: {sorted(set.union(*keys) - set.intersection(*keys))}")
    return Batch(
        [s.object_id for s in samples],
        _collate_views([s.inputs for s in samples], "inputs", ids),
        _collate_views([s.targets for s in samples], "targets", ids),
        geometry,
        torch.tensor([s.background for s in samples], dtype=torch.float32),
        extras={k: _stack_or_list([s.extras[k] for s in samples]) for k in keys[0]},
    )
