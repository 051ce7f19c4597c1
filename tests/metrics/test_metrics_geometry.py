"""Geometry metrics vs brute-force numpy and closed forms; alignment; pose metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recon3d.errors import ShapeError
from recon3d.metrics import (
    PRESETS,
    ChamferDistance,
    FScore,
    NormalConsistency,
    PoseError,
    VolumeIoU,
    align_points,
    chamfer_fscore,
    grid_points,
    mesh_occupancy,
    nearest_neighbors,
    normal_consistency,
    relative_rotation_errors,
    sample_surface,
    translation_errors,
    umeyama,
)


def _brute(p, g, squared, reduction, tau, on_sq):
    d = np.sqrt(((p[:, None] - g[None]) ** 2).sum(-1))
    a, b = d.min(1), d.min(0)
    e = (a**2, b**2) if squared else (a, b)
    cd = e[0].mean() + e[1].mean()
    cd = cd / 2 if reduction == "mean" else cd
    t = (a**2, b**2) if on_sq else (a, b)
    pr, rc = (t[0] <= tau).mean(), (t[1] <= tau).mean()
    return cd, pr, rc, 0.0 if pr + rc == 0 else 2 * pr * rc / (pr + rc)


@pytest.mark.parametrize("backend", ["kdtree", "torch"])
@pytest.mark.parametrize("squared,reduction,tau,on_sq", [(False, "mean", 0.3, False), (True, "sum", 0.05, True)])
def test_chamfer_fscore_vs_numpy(backend, squared, reduction, tau, on_sq):
    rng = np.random.default_rng(0)
    p, g = rng.normal(size=(200, 3)), rng.normal(size=(150, 3))
    out = chamfer_fscore(torch.from_numpy(p).float(), torch.from_numpy(g).float(), squared=squared, reduction=reduction,
                         threshold=tau, threshold_on_squared=on_sq, cd_scale=10.0, backend=backend)
    cd, pr, rc, f = _brute(p.astype(np.float32).astype(np.float64), g.astype(np.float32).astype(np.float64), squared, reduction, tau, on_sq)
    assert abs(float(out["cd"]) - 10 * cd) < 1e-5
    assert abs(float(out["precision"]) - pr) < 1e-9 and abs(float(out["recall"]) - rc) < 1e-9
    assert abs(float(out["fscore"]) - f) < 1e-9


def test_nearest_backends_agree():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3000, 3, generator=g), torch.rand(2500, 3, generator=g)
    d1, _ = nearest_neighbors(a, b, "kdtree")
    d2, _ = nearest_neighbors(a, b, "torch", chunk=700)
    torch.testing.assert_close(d1, d2, atol=1e-6, rtol=0)


def _fib_sphere(n):
    i = torch.arange(n, dtype=torch.float64) + 0.5
    phi, theta = torch.arccos(1 - 2 * i / n), math.pi * (1 + 5**0.5) * i
    return torch.stack([torch.cos(theta) * torch.sin(phi), torch.sin(theta) * torch.sin(phi), torch.cos(phi)], -1)


def test_concentric_spheres_closed_form():
    # the same directions at radii r and r + delta: every nearest distance is exactly delta
    u = _fib_sphere(2000)
    r, delta = 0.5, 0.03
    inner, outer = r * u, (r + delta) * u
    out = chamfer_fscore(inner, outer, threshold=0.031)
    assert abs(float(out["cd"]) - delta) < 1e-9 and float(out["fscore"]) == 1.0
    ssr = chamfer_fscore(inner, outer, **{**PRESETS["ssr"].metric_kwargs(), "threshold": delta**2 * 0.99})
    assert abs(float(ssr["cd"]) - 1000 * 2 * delta**2) < 1e-9 and float(ssr["fscore"]) == 0.0


def _cube(lo=(0.0, 0.0, 0.0), size=1.0):
    v = torch.tensor([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=torch.float64) * size
    v = v + torch.tensor(lo, dtype=torch.float64)
    # outward-facing triangles (counter-clockwise seen from outside)
    f = torch.tensor([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                      [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    return v, f


def _rot(axis, deg):
    axis = torch.tensor(axis, dtype=torch.float64)
    axis = axis / axis.norm()
    k = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64)
    a = math.radians(deg)
    return torch.eye(3, dtype=torch.float64) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


def test_cube_vs_rotated_itself_after_icp():
    v, f = _cube((-0.5, -0.5, -0.5))
    pts, _ = sample_surface(v, f, 1200, generator=torch.Generator().manual_seed(0))
    rot = _rot((1.0, 2.0, 3.0), 50.0)
    shift = torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64)
    # (a) the same points rotated: a small rotation is undone exactly by plain ICP
    small = pts @ _rot((1.0, 2.0, 3.0), 12.0).T + shift
    aligned, _ = align_points(small, pts, mode="icp", rotation_search=False)
    assert float(chamfer_fscore(aligned, pts)["cd"]) < 1e-9
    # (b) an independent sampling of the rotated cube, 50 degrees off: after rotation search + ICP
    # the CD is at the sampling noise floor (two samplings of the same unrotated cube)
    other, _ = sample_surface(v, f, 1200, generator=torch.Generator().manual_seed(1))
    floor = float(chamfer_fscore(other, pts)["cd"])
    moved = other @ rot.T + shift
    before = float(chamfer_fscore(moved, pts)["cd"])
    aligned, t = align_points(moved, pts, mode="icp", rotation_search=True, generator=torch.Generator().manual_seed(0))
    after = float(chamfer_fscore(aligned, pts)["cd"])
    assert before > 3 * floor and after < 1.1 * floor, (before, after, floor)
    # the recovered rotation is one of the cube's symmetries composed with rot^-1
    rel = t[:3, :3] @ rot
    assert torch.allclose(rel.abs().round(), rel.abs(), atol=2e-2)


def test_umeyama_recovers_similarity():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(100, 3, generator=g, dtype=torch.float64)
    rot, s, tr = _rot((0.0, 1.0, 1.0), 70), 1.7, torch.tensor([0.3, 0.1, -2.0], dtype=torch.float64)
    t = umeyama(x, s * x @ rot.T + tr, with_scale=True)
    torch.testing.assert_close(t[:3, :3], s * rot)
    torch.testing.assert_close(t[:3, 3], tr)


def test_sampling_normals_and_nc():
    v, f = _cube((-0.5, -0.5, -0.5))
    pts, nrm = sample_surface(v, f, 4000, generator=torch.Generator().manual_seed(0))
    assert (pts.abs().max(-1).values - 0.5).abs().max() < 1e-9  # on the surface
    assert torch.allclose((pts * nrm).sum(-1).clamp(max=0), torch.zeros(4000, dtype=torch.float64))  # outward
    # area weighting: each of the 6 faces gets ~1/6
    counts = torch.bincount((nrm.abs().argmax(-1) * 2 + (nrm.sum(-1) > 0).long()), minlength=6).double()
    assert (counts / 4000 - 1 / 6).abs().max() < 0.03
    u = _fib_sphere(1500)
    assert abs(float(normal_consistency(u, u, u, u)) - 1.0) < 1e-12
    # inside-out copy: orientation is ignored by default (|cos|), counted with oriented=True
    assert abs(float(normal_consistency(u, u, u, -u)) - 1.0) < 1e-12
    assert abs(float(normal_consistency(u, u, u, -u, oriented=True)) + 1.0) < 1e-12
    m = NormalConsistency()
    m.update(u[None], u[None], u[None], -u[None])
    assert abs(float(m.compute()) - 1.0) < 1e-6


def test_iou_of_offset_cubes():
    a, fa = _cube((0.0, 0.0, 0.0))
    b, fb = _cube((0.5, 0.0, 0.0))
    q = grid_points(16, 2.0)  # voxel centres never on the cube faces
    oa, ob = mesh_occupancy(a, fa, q), mesh_occupancy(b, fb, q)
    assert int(oa.sum()) == 64 and int(ob.sum()) == 64
    m = VolumeIoU()
    m.update(oa[None], ob[None])
    m.update(oa[None], oa[None])
    assert abs(float(m.compute()) - (1 / 3 + 1) / 2) < 1e-6
    # an open box (top removed) is still "inside" for its interior points (winding number ~ 5/6... > 0.5)
    inner = torch.tensor([[0.5, 0.5, 0.3]], dtype=torch.float64)
    assert bool(mesh_occupancy(a, fa[[i for i in range(12) if i not in (10, 11)]], inner)[0])


def test_metric_classes_and_presets():
    g = torch.Generator().manual_seed(0)
    p, q = torch.rand(2, 300, 3, generator=g), torch.rand(2, 250, 3, generator=g)
    cd = ChamferDistance.from_preset("ssr")
    cd.update(p, q)
    ref = np.mean([float(chamfer_fscore(p[i], q[i], **PRESETS["ssr"].metric_kwargs())["cd"]) for i in range(2)])
    assert abs(float(cd.compute()) - ref) < 1e-4
    fs = FScore.from_preset("reconviagen")
    fs.update([p[0], p[1]], [q[0], q[1]])
    assert set(fs.compute()) == {"fscore", "precision", "recall"}
    assert PRESETS["m3d"].cd_scale == 1000 and PRESETS["gtr"].num_points == 16000
    with pytest.raises(ShapeError, match="gt"):
        cd.update(p, q[..., :2])


def test_pose_metrics():
    g = torch.Generator().manual_seed(0)
    c2w = torch.eye(4, dtype=torch.float64).repeat(4, 1, 1)
    for k in range(4):
        c2w[k, :3, :3] = _rot(torch.rand(3, generator=g).tolist(), 40.0 * k)
        c2w[k, :3, 3] = torch.randn(3, generator=g, dtype=torch.float64)
    assert relative_rotation_errors(c2w, c2w).abs().max() < 1e-5
    assert translation_errors(c2w, c2w).abs().max() < 1e-9
    # a global similarity of the whole rig changes nothing
    sim = torch.eye(4, dtype=torch.float64)
    sim[:3, :3] = _rot((1.0, 0.0, 0.0), 33)
    sim[:3, 3] = torch.tensor([1.0, 2.0, 3.0])
    moved = sim @ c2w
    moved[:, :3, 3] *= 2.5
    assert relative_rotation_errors(moved, c2w).abs().max() < 1e-5
    assert translation_errors(moved, c2w).abs().max() < 1e-9
    # one camera rotated by 30 degrees about its own optical axis
    pred = c2w.clone()
    pred[1, :3, :3] = pred[1, :3, :3] @ _rot((0.0, 0.0, 1.0), 30.0)
    rre = relative_rotation_errors(pred[:2], c2w[:2])
    assert abs(float(rre[0]) - 30.0) < 1e-6
    m = PoseError()
    m.update(pred[None], c2w[None])
    out = m.compute()
    assert abs(float(out["rre"]) - 30.0 * 3 / 6) < 1e-4  # 3 of the 6 pairs involve camera 1
    assert abs(float(out["acc@15"]) - 0.5) < 1e-6 and float(out["acc@30"]) == 0.5
