"""Camera refinement by render-to-input matching + PnP (models/reconviagen/pose.py) on a richly
textured cube (random colour blocks, UV-mapped) rendered by recon3d's torch mesh rasteriser."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from recon3d.data.batch import Views
from recon3d.data.cameras import Cameras, orbit_cameras
from recon3d.errors import ShapeError
from recon3d.models.reconviagen import NearestRenderStart, PoseRefiner, rotation_angle_deg
from recon3d.render import render
from recon3d.representations import Meshes
from recon3d.representations.reconstruction import Reconstruction

pytest.importorskip("cv2")

TORCH = {"backend": "torch"}
SIZE = 1.0  # the cube's side: the object size the translation tolerance refers to


def textured_cube(seed: int = 0, res: int = 240, blocks: int = 24) -> Meshes:
    """A unit cube, each face its own tile of a 3x2 atlas of random colour blocks."""
    g = torch.Generator().manual_seed(seed)
    tex = torch.rand(blocks, blocks, 3, generator=g)
    k = res // blocks
    tex = tex.repeat_interleave(k, 0).repeat_interleave(k, 1)
    verts, uvs, faces = [], [], []
    for f, (n, sgn) in enumerate([(0, 1), (0, -1), (1, 1), (1, -1), (2, 1), (2, -1)]):
        a, b = [i for i in range(3) if i != n]
        base = len(verts)
        for p, q in [(-1, -1), (1, -1), (1, 1), (-1, 1)]:
            v = [0.0, 0.0, 0.0]
            v[n], v[a], v[b] = 0.5 * sgn * SIZE, 0.5 * p * SIZE, 0.5 * q * SIZE
            verts.append(v)
            uvs.append([(f % 3 + (p + 1) / 2) / 3, (f // 3 + (q + 1) / 2) / 2])
        faces += [[base, base + 1, base + 2], [base, base + 2, base + 3]]
    return Meshes.single(torch.tensor(verts), torch.tensor(faces), uvs=torch.tensor(uvs), texture=tex)


def perturbed(cams: Cameras, deg: float, shift: float, seed: int = 1) -> Cameras:
    """Each camera rotated by ``deg`` about a random axis (in its own frame) and moved by ``shift``."""
    g = torch.Generator().manual_seed(seed)
    c2w = cams.c2w.clone()
    for v in range(c2w.shape[1]):
        ax = torch.randn(3, generator=g)
        ax = ax / ax.norm()
        Kx = torch.tensor([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
        a = math.radians(deg)
        R = torch.eye(3) + math.sin(a) * Kx + (1 - math.cos(a)) * Kx @ Kx
        c2w[0, v, :3, :3] = c2w[0, v, :3, :3] @ R
        d = torch.randn(3, generator=g)
        c2w[0, v, :3, 3] += shift * d / d.norm()
    return Cameras(c2w, cams.K.clone(), cams.width, cams.height)


@pytest.fixture(scope="module")
def scene():
    mesh = textured_cube()
    cams = orbit_cameras(torch.tensor([30.0]), torch.tensor([25.0]), 2.2, 40.0, 160, 160)[None]
    with torch.no_grad():
        images = render(mesh, cams, "black", backend="torch").rgb
    return mesh, cams, images


def _errors(a: Cameras, b: Cameras, v: int = 0) -> tuple[float, float]:
    return (rotation_angle_deg(a.c2w[0, v, :3, :3], b.c2w[0, v, :3, :3]),
            float((a.c2w[0, v, :3, 3] - b.c2w[0, v, :3, 3]).norm()))


def test_pose_refinement_recovers_a_known_perturbation(scene):
    mesh, cams, images = scene
    start = perturbed(cams, 5.0, 0.08)
    assert _errors(start, cams) == pytest.approx((5.0, 0.08), rel=1e-3)
    res = PoseRefiner(start=start, render_opts=TORCH).refine_cameras(mesh, images)
    rot, trans = _errors(res.cameras, cams)
    assert rot < 2.0 and trans < 0.02 * SIZE, (rot, trans, res.records)
    assert res.fallback == [[False]]
    rounds = res.records[0][0]
    assert 1 <= len(rounds) <= 3 and all(r["status"] == "ok" for r in rounds)
    # the refined camera is a proper recon3d camera with the start's intrinsics
    torch.testing.assert_close(res.cameras.K, start.K)


def test_a_failed_refinement_keeps_the_previous_cameras_and_warns(scene, caplog):
    mesh, cams, images = scene
    start = perturbed(cams, 5.0, 0.08)
    blank = torch.zeros_like(images)  # nothing to match
    with caplog.at_level(logging.WARNING, logger="recon3d.models.reconviagen.pose"):
        res = PoseRefiner(start=start, render_opts=TORCH).refine_cameras(mesh, blank)
    assert torch.equal(res.cameras.c2w, start.c2w)
    assert res.fallback == [[True]]
    assert any("keeping the previous camera" in m and "matches" in m for m in caplog.messages)

    def broken(*args):
        raise RuntimeError("no matcher today")

    res = PoseRefiner(start=start, matcher=broken, render_opts=TORCH).refine_cameras(mesh, images)
    assert torch.equal(res.cameras.c2w, start.c2w) and "matcher error" in res.records[0][0][0]["status"]

    def nan_points(a, b, ma, mb):  # matches that cannot give a pose: all on one pixel
        return np.full((50, 2), 80.0), np.full((50, 2), 80.0)

    res = PoseRefiner(start=start, matcher=nan_points, render_opts=TORCH).refine_cameras(mesh, images)
    assert torch.isfinite(res.cameras.c2w).all() and torch.equal(res.cameras.c2w, start.c2w)


def test_nearest_render_start_picks_the_render_of_the_input_pose():
    mesh = textured_cube()
    start = NearestRenderStart(n_renders=8, radius=2.2, fov=40.0, elevations=(25.0,), render_opts=TORCH)
    orbit = start.orbit(48, 48)
    truth = [5, 2]
    cams = Cameras(orbit.c2w[truth][None], orbit.K[truth][None], 48, 48)
    with torch.no_grad():
        images = render(mesh, cams, "black", backend="torch").rgb
    out = start(mesh, images)
    assert start.last.tolist() == [truth]
    torch.testing.assert_close(out.c2w, cams.c2w)

    def estimator(imgs):  # an oracle pose estimator in its own frame: every camera turned by one rotation
        B, S = imgs.shape[:2]
        allc = torch.cat([orbit.c2w, cams.c2w[0]], 0)
        M = torch.eye(4)
        M[:3, :3] = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
        return Cameras((M @ allc)[None], torch.cat([orbit.K, cams.K[0]])[None], 48, 48)

    est = NearestRenderStart(n_renders=8, radius=2.2, fov=40.0, elevations=(25.0,), pose_estimator=estimator, render_opts=TORCH)
    est(mesh, images)
    assert est.last.tolist() == [truth]


def test_align_mapping_recovers_input_cameras_from_an_estimator_frame():
    """An oracle estimator in a frame rotated, scaled by 0.3 and shifted: 'align' maps the inputs'
    estimated cameras back exactly (inputs between the renders, where 'nearest' would be off)."""
    mesh = textured_cube()
    start = NearestRenderStart(n_renders=6, radius=2.2, fov=40.0, elevations=(25.0, 5.0), render_opts=TORCH)
    orbit = start.orbit(40, 40)
    cams = orbit_cameras(torch.tensor([17.0, 200.0]), torch.tensor([40.0, -10.0]), 1.9, 40.0, 40, 40)[None]
    with torch.no_grad():
        images = render(mesh, cams, "black", backend="torch").rgb
    c, s_ = math.cos(0.7), math.sin(0.7)
    R = torch.tensor([[c, 0.0, s_], [0, 1, 0], [-s_, 0, c]]) @ torch.tensor([[1.0, 0, 0], [0, c, -s_], [0, s_, c]])
    scale, t = 0.3, torch.tensor([0.5, -1.0, 2.0])

    def estimator(imgs):
        allc = torch.cat([orbit.c2w, cams.c2w[0]], 0).clone()
        allc[:, :3, :3] = R @ allc[:, :3, :3]
        allc[:, :3, 3] = scale * allc[:, :3, 3] @ R.T + t
        return Cameras(allc[None], torch.cat([orbit.K, cams.K[0]])[None], 40, 40)

    est = NearestRenderStart(n_renders=6, radius=2.2, fov=40.0, elevations=(25.0, 5.0), pose_estimator=estimator,
                             mapping="align", render_opts=TORCH)
    out = est(mesh, images)
    torch.testing.assert_close(out.c2w, cams.c2w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.K, cams.K)


def test_pose_refiner_as_a_refiner_sets_the_reconstruction_cameras(scene):
    mesh, cams, images = scene
    start = perturbed(cams, 3.0, 0.05, seed=4)
    rec = Reconstruction(["cube"], mesh, cameras=start)
    with torch.inference_mode():
        out = PoseRefiner(rounds=2, render_opts=TORCH).refine(rec, Views(images, cams))
    rot, trans = _errors(out.cameras, cams)
    assert rot < 2.0 and trans < 0.02 * SIZE
    assert out.extras["pose_refinement"]["fallback"] == [[False]]
    with pytest.raises(ShapeError, match="start"):
        PoseRefiner(start=Cameras.cat([start, start], 1), render_opts=TORCH).refine_cameras(mesh, images)


def test_nearest_render_start_then_refinement_end_to_end():
    """Official pipeline without VGGT: the nearest of 20 orbit renders (8.6 deg and 0.36 off here,
    other radius and elevation) as the start, then <= 3 rounds of matching + PnP."""
    mesh = textured_cube()
    cams = orbit_cameras(torch.tensor([47.0]), torch.tensor([20.0]), 2.0, 40.0, 160, 160)[None]
    with torch.no_grad():
        images = render(mesh, cams, "black", backend="torch").rgb
    res = PoseRefiner(start=NearestRenderStart(n_renders=20, radius=2.2, fov=40.0, render_opts=TORCH), render_opts=TORCH).refine_cameras(mesh, images)
    assert _errors(res.start, cams)[0] > 5.0
    rot, trans = _errors(res.cameras, cams)
    assert rot < 2.0 and trans < 0.02 * SIZE, (rot, trans, res.records)
