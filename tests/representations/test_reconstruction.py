"""Reconstruction: per-object selection of every representation, per-object seeds, validation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from recon3d.data.cameras import orbit_cameras
from recon3d.errors import ShapeError
from recon3d.models.refiners import test_time_optimization, trainable_copy
from recon3d.representations import Gaussians, Meshes, SparseVoxels, Triplanes
from recon3d.representations.reconstruction import Reconstruction, object_seed, object_seeds


def _gaussians(B=3, N=5):
    q = torch.zeros(B, N, 4)
    q[..., 0] = 1
    return Gaussians(torch.randn(B, N, 3), q, torch.rand(B, N, 3), torch.rand(B, N), torch.rand(B, N, 3))


def test_select_splits_every_part_consistently():
    B = 3
    planes = torch.randn(B, 3, 4, 8, 8)
    meshes = Meshes([torch.randn(4 + b, 3) for b in range(B)], [torch.tensor([[0, 1, 2]])] * B)
    vox = SparseVoxels.from_list([(torch.tensor([[b, 0, 0]], dtype=torch.int32), torch.full((1, 2), float(b))) for b in range(B)], resolution=4)
    rec = Reconstruction([f"o{b}" for b in range(B)], Triplanes(planes, lambda p, x: {}),
                         {"mesh": meshes, "gauss": _gaussians(B), "voxels": vox, "encoding": {"f": torch.arange(B)}, "res": 48},
                         to_world=torch.eye(4).expand(B, 4, 4).clone(), seeds=[1, 2, 3])
    one = rec.select(1)
    assert one.object_ids == ["o1"] and len(one) == 1 and one.seeds == [2]
    assert torch.equal(one.representation.planes, planes[1:2])
    assert torch.equal(one.get("mesh").verts[0], meshes.verts[1])
    assert torch.equal(one.get("gauss").means, rec.get("gauss").means[1:2])
    assert torch.equal(one.get("voxels").feats, torch.full((1, 2), 1.0)) and one.get("voxels").coords[0, 0] == 0
    assert torch.equal(one.get("encoding")["f"], torch.tensor([1])) and one.get("res") == 48
    assert one.find(Meshes) is one.get("mesh") and rec.select(-1).object_ids == ["o2"]
    with pytest.raises(ShapeError, match="index"):
        rec.select(3)


def test_validation_names_the_field():
    with pytest.raises(ShapeError, match="to_world"):
        Reconstruction(["a", "b"], None, to_world=torch.eye(4)[None])
    with pytest.raises(ShapeError, match="seeds"):
        Reconstruction(["a"], None, seeds=[1, 2])
    with pytest.raises(ShapeError, match="cannot be split"):
        Reconstruction(["a"], object()).select(0)


def test_object_seed_depends_on_id_and_seed_only():
    ids = ["chair_1", "table_7", "chair_1"]
    seeds = object_seeds(ids, 3)
    assert seeds[0] == seeds[2] != seeds[1] and object_seed("chair_1", 4) != seeds[0]
    assert all(0 <= s < 2**63 for s in seeds)
    # Not Python's salted str hash: another interpreter gives the same number.
    code = "from recon3d.representations.reconstruction import object_seed; print(object_seed('chair_1', 3))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONHASHSEED": "123"}, check=True)
    assert int(other.stdout) == seeds[0]


def test_test_time_optimization_leaves_inference_mode():
    with torch.inference_mode():
        frozen = torch.ones(3)
        with pytest.raises(RuntimeError, match="inference mode"):
            trainable_copy(frozen)
        with test_time_optimization():
            x = trainable_copy(frozen, requires_grad=True)
            (x * 2).sum().backward()
            assert torch.equal(x.grad, torch.full((3,), 2.0))
        assert torch.is_inference_mode_enabled()


def test_eval_feeds_poses_and_occupancy_from_the_reconstruction():
    """A method whose reconstruction carries predicted cameras and sparse voxels gets pose and
    occupancy metrics without code of its own: the base eval step feeds them to the protocol."""
    from recon3d.data.batch import Batch, Geometry, Views
    from recon3d.methods.base import ReconModule
    from recon3d.metrics import EvaluationProtocol

    # Occupancy of a voxel set at points, against the closed form: voxel (1, 2, 3) of a 4^3 grid
    # over [-1, 1]^3 spans [-0.5, 0) x [0, 0.5) x [0.5, 1).
    vox = SparseVoxels(torch.tensor([[0, 1, 2, 3]], dtype=torch.int32), torch.zeros(1, 1), 4, 1)
    pts = torch.tensor([[-0.25, 0.25, 0.75], [-0.25, 0.25, 0.25], [0.25, 0.25, 0.75], [-0.25, 0.25, 1.5]])
    assert vox.occupied(pts).tolist() == [True, False, False, False]

    cams = orbit_cameras(torch.tensor([0.0, 120.0, 240.0]), torch.tensor([10.0, 20.0, 30.0]), 2.5, 40.0, 8, 8).reshape(1, 3)
    img = torch.ones(1, 3, 3, 8, 8)
    q = torch.tensor([[-0.25, 0.25, 0.75], [0.5, 0.5, 0.5]])
    batch = Batch(["obj"], Views(img, cams, torch.ones(1, 3, 1, 8, 8)), Views(img, cams, torch.ones(1, 3, 1, 8, 8)),
                  Geometry(sdf_points=q[None], sdf_values=torch.tensor([[-0.1, -0.1]])))

    class Fixed(ReconModule):
        def reconstruct(self, b):
            return Reconstruction(list(b.object_ids), vox, cameras=b.inputs.cameras)

        def render_reconstruction(self, rec, cameras):
            return {"rgb": torch.ones(1, 3, 3, 8, 8), "alpha": torch.ones(1, 3, 1, 8, 8)}

    model = Fixed(evaluation=EvaluationProtocol(image_metrics=["psnr"]))
    model._eval_step(batch, "val")
    res = model.evaluation.compute()
    assert res["rre"] == pytest.approx(0.0, abs=0.05) and res["te"] == pytest.approx(0.0, abs=1e-4)  # degrees; float32 acos
    assert res["iou"] == pytest.approx(0.5)  # one of the two inside points is in the voxel


def test_views_select_keeps_every_field():
    from recon3d.data.batch import Views

    cams = orbit_cameras(torch.tensor([0.0, 90.0, 180.0, 270.0]), torch.tensor([10.0] * 4), 2.5, 40.0, 8, 8).reshape(2, 2)
    v = Views(torch.rand(2, 2, 3, 8, 8), cams, torch.rand(2, 2, 1, 8, 8), torch.rand(2, 2, 1, 8, 8), torch.rand(2, 2, 3, 8, 8))
    one = v.select(1)
    for name in ("images", "masks", "depths", "normals"):
        assert torch.equal(getattr(one, name), getattr(v, name)[1:2]), name
    assert torch.equal(one.cameras.c2w, cams.c2w[1:2]) and Views(v.images).select(0).cameras is None
    with pytest.raises(ShapeError, match="one-object"):
        SparseVoxels.from_list([(torch.zeros(1, 3, dtype=torch.int32), torch.zeros(1, 1))] * 2, resolution=2).occupied(torch.zeros(1, 3))
