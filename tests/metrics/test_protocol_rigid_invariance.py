"""EvaluationProtocol: a rigid motion of the prediction scores as the prediction itself.

Issue 12, item 3: prediction and ground truth used to be normalised by their *own* bounding boxes
and then aligned rigidly; the box of a rotated object is larger, so a rotated exact copy scored up
to 10x worse CD than the mesh itself. References here are independent of the protocol: the
unrotated mesh's own score, the sampling noise floor computed with scipy's KD-tree, and closed
forms for a scaled copy.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from recon3d.errors import ConfigError
from recon3d.metrics import PRESETS, EvaluationProtocol, GeometryProtocol


def asymmetric_mesh(subdivisions: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A closed, star-shaped blob with no symmetry (distinct principal axes, a bump off every
    axis): a deformed icosphere. Returns ``verts (V, 3) float64``, ``faces (F, 3) long``."""
    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    x, y, z = m.vertices.T
    bump = 0.15 * np.exp(-8 * ((x - 0.3) ** 2 + (y + 0.6) ** 2 + (z - 0.5) ** 2))
    r = 1 + 0.3 * x + 0.25 * y * y - 0.2 * x * z + bump
    v = m.vertices * r[:, None] * np.array([1.0, 0.7, 0.5])
    return torch.tensor(v), torch.tensor(m.faces, dtype=torch.long)


def _score(preset: GeometryProtocol, pred, gt, iou: bool = True) -> dict[str, float]:
    proto = EvaluationProtocol(image_metrics=("psnr",), geometry_preset=preset)
    proto.update_meshes(["blob"], [pred], [gt], iou=iou)
    return proto.compute()


@pytest.mark.parametrize("name", ["gtr", "m3d"])
def test_rigid_motions_of_an_asymmetric_mesh_score_as_the_mesh_itself(name):
    # gtr: each mesh into the cube by its own box + similarity ICP; m3d (SSR): the ground truth's
    # transform for both + rigid ICP. Fewer points than the papers keep the test fast.
    preset = replace(PRESETS[name], num_points=2000, iou_resolution=24)
    v, f = asymmetric_mesh()
    ref = _score(preset, (v, f), (v, f))
    # independent anchor: two samplings of the same surface, no alignment, scipy KD-tree
    m = trimesh.Trimesh(v.numpy(), f.numpy(), process=False)
    vn = (v - (v.max(0).values + v.min(0).values) / 2) / ((v.max(0).values - v.min(0).values).max() / 2)
    mn = trimesh.Trimesh(vn.numpy(), f.numpy(), process=False)
    a = trimesh.sample.sample_surface(mn, 2000, seed=1)[0]
    b = trimesh.sample.sample_surface(mn, 2000, seed=2)[0]
    da, db = cKDTree(b).query(a)[0], cKDTree(a).query(b)[0]
    floor = (da.mean() + db.mean()) / 2 * 100 if name == "gtr" else ((da**2).mean() + (db**2).mean()) * 1000
    assert 0.8 * floor < ref["cd"] < 1.1 * floor, (ref["cd"], floor)
    assert ref["iou"] > 0.98 and ref["nc"] > 0.99 and m.is_watertight
    rng = np.random.default_rng(12)
    for k in range(10):
        rot = torch.tensor(Rotation.random(random_state=rng).as_matrix())
        shift = torch.tensor(rng.normal(scale=3.0, size=3))
        out = _score(preset, (v @ rot.T + shift, f), (v, f))
        for key in ("cd", "fscore", "nc", "iou"):
            assert abs(out[key] - ref[key]) <= 0.02 * abs(ref[key]), (k, key, out[key], ref[key])


def test_point_clouds_rigid_motion_and_what_each_frame_scores():
    v, f = asymmetric_mesh(2)
    m = trimesh.Trimesh(v.numpy(), f.numpy(), process=False)
    gt = torch.tensor(trimesh.sample.sample_surface(m, 2000, seed=0)[0])
    pred = torch.tensor(trimesh.sample.sample_surface(m, 2000, seed=1)[0])
    rot = torch.tensor(Rotation.from_euler("xyz", [40, -70, 110], degrees=True).as_matrix())

    def cd(name, p):
        proto = EvaluationProtocol(image_metrics=("psnr",), geometry_preset=replace(PRESETS[name], num_points=2000))
        proto.update_geometry(["x"], [p], [gt])
        return proto.compute()["cd"]

    for name in ("gtr", "m3d"):
        ref = cd(name, pred)
        assert abs(cd(name, pred @ rot.T - 2.0) - ref) <= 0.02 * ref
        # a copy 1.25x too large: "each" rescales it away, "gt" (SSR) scores it. Every pred point
        # then lies ~|x| / 4 off the surface; its CD is far above the sampling floor.
        big = cd(name, 1.25 * pred)
        assert (abs(big - ref) <= 0.02 * ref) if name == "gtr" else big > 20 * ref, (name, big, ref)


def test_geometry_protocol_rejects_unknown_options_in_one_line():
    with pytest.raises(ConfigError, match="normalize_frame.*'own'"):
        GeometryProtocol("mine", normalize_frame="own")
    with pytest.raises(ConfigError, match="align"):
        replace(PRESETS["gtr"], align="similarity")
    assert PRESETS["ssr"].normalize_frame == "gt" and PRESETS["ssr"].align == "icp"
    assert all(PRESETS[n].normalize_frame == "each" and PRESETS[n].align == "icp_scale" for n in ("gtr", "mvboost", "reconviagen"))
