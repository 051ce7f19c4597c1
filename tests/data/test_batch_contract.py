"""The batch contract for every method (issue 14 item 4): unposed views, ``Batch.require``, ragged fields."""

from __future__ import annotations

import pytest
import torch

from recon3d.data import Batch, Geometry, Sample, Views, collate_samples, orbit_cameras
from recon3d.data.batch import stacked
from recon3d.errors import DataError


def _views(posed: bool, v: int = 2, size: int = 8, seed: int = 0) -> Views:
    g = torch.Generator().manual_seed(seed)
    cams = orbit_cameras(torch.arange(v) * 90.0, torch.zeros(v), 2.5, 40.0, size, size) if posed else None
    return Views(torch.rand(v, 3, size, size, generator=g), cams, masks=torch.ones(v, 1, size, size))


def _sample(i: int, posed: bool = True, points: int = 10, extras: dict | None = None) -> Sample:
    geo = Geometry(surface_points=torch.randn(points, 3), sdf_values=torch.randn(5))
    return Sample(f"obj{i}", _views(posed, seed=i), _views(posed, seed=i + 10), geo, extras=extras or {}).validate()


def test_unposed_views_collate_and_move():
    batch = collate_samples([_sample(0, posed=False), _sample(1, posed=False)])
    assert batch.inputs.cameras is None and batch.targets.cameras is None
    assert batch.inputs.images.shape == (2, 2, 3, 8, 8)
    moved = batch.to(torch.float64)
    assert moved.inputs.cameras is None and moved.inputs.images.dtype == torch.float64


def test_posed_and_unposed_objects_in_one_batch_are_refused():
    with pytest.raises(DataError, match=r"objects \['obj1'\].*inputs.cameras"):
        collate_samples([_sample(0), _sample(1, posed=False)])


def test_require_names_the_missing_key_and_the_method():
    batch = collate_samples([_sample(0, posed=False), _sample(1, posed=False)])
    with pytest.raises(DataError) as info:
        batch.require("inputs.images", "inputs.cameras", who="LGM")
    msg = str(info.value)
    assert "\n" not in msg
    assert "LGM needs inputs.cameras" in msg and "inputs.images" not in msg
    assert "unposed" in msg and "obj0" in msg
    batch.require("inputs.images", "targets.masks", "geometry.surface_points")  # present: no error
    posed = collate_samples([_sample(0), _sample(1)])
    posed.require("inputs.cameras", who="GTR")


def test_require_reads_extras_keys_and_refuses_unknown_fields():
    batch = collate_samples([_sample(0, extras={"roi": torch.zeros(4)}), _sample(1, extras={"roi": torch.ones(4)})])
    batch.require("extras.roi")
    with pytest.raises(DataError, match="M3D needs extras.depth_prior"):
        batch.require("extras.depth_prior", who="M3D")
    with pytest.raises(ValueError, match="no field 'camera'.*cameras"):
        batch.require("inputs.camera")  # a typo is the method's bug, not missing data


def test_same_shape_fields_stack_ragged_ones_become_lists():
    extras = [{"coords": torch.zeros(100, 4, dtype=torch.int32), "code": torch.tensor([1, 0])},
              {"coords": torch.ones(137, 4, dtype=torch.int32), "code": torch.tensor([0, 1])}]
    batch = collate_samples([_sample(0, points=10, extras=extras[0]), _sample(1, points=12, extras=extras[1])])
    # Same shape: one stacked tensor, as before.
    assert isinstance(batch.extras["code"], torch.Tensor) and batch.extras["code"].shape == (2, 2)
    assert isinstance(batch.geometry.sdf_values, torch.Tensor) and batch.geometry.sdf_values.shape == (2, 5)
    # Different shapes: a list in batch order, the tensors untouched.
    coords = batch.extras["coords"]
    assert isinstance(coords, list) and [c.shape[0] for c in coords] == [100, 137]
    assert torch.equal(coords[1], extras[1]["coords"]) and coords[1].dtype == torch.int32
    pts = batch.geometry.surface_points
    assert isinstance(pts, list) and [p.shape for p in pts] == [(10, 3), (12, 3)]
    # Lists travel with .to like tensors.
    moved = batch.to(torch.float64)
    assert isinstance(moved.geometry.surface_points, list) and moved.geometry.surface_points[0].dtype == torch.float64
    assert isinstance(moved.extras["coords"], list) and [c.shape[0] for c in moved.extras["coords"]] == [100, 137]


def test_stacked_gives_a_tensor_or_one_line_naming_the_field():
    same = collate_samples([_sample(0), _sample(1)])
    assert stacked(same.geometry.surface_points, "geometry.surface_points").shape == (2, 10, 3)
    assert stacked(None, "x") is None
    ragged = collate_samples([_sample(0, points=10), _sample(1, points=12)])
    with pytest.raises(DataError, match=r"geometry.surface_points has a different shape per object \(\[10, 3\], \[12, 3\]"):
        stacked(ragged.geometry.surface_points, "geometry.surface_points")
    assert torch.equal(stacked([torch.ones(2), torch.zeros(2)], "x"), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


def test_empty_batch_still_builds():
    assert len(Batch.empty([("a", "bad")])) == 0
