"""Grid occupancy / winding numbers (the fast inside test of mesh IoU) vs closed forms and an
independent float64 numpy brute-force generalised winding number (Jacobson et al. 2013)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial.transform import Rotation

from recon3d.metrics import grid_points, mesh_occupancy_grid, winding_number, winding_number_grid


def np_winding_number(v: np.ndarray, f: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Sum of signed solid angles (Van Oosterom & Strackee 1983) / 4 pi, one query at a time."""
    tri = v[f]
    out = np.empty(len(q))
    for i, x in enumerate(q):
        a, b, c = tri[:, 0] - x, tri[:, 1] - x, tri[:, 2] - x
        la, lb, lc = (np.linalg.norm(t, axis=1) for t in (a, b, c))
        det = np.einsum("ij,ij->i", a, np.cross(b, c))
        den = la * lb * lc + np.einsum("ij,ij->i", a, b) * lc + np.einsum("ij,ij->i", b, c) * la + np.einsum("ij,ij->i", c, a) * lb
        out[i] = np.arctan2(det, den).sum() / (2 * np.pi)
    return out


def _t(m: trimesh.Trimesh):
    return torch.tensor(m.vertices), torch.tensor(m.faces, dtype=torch.long)


def test_sphere_and_boxes_against_closed_forms():
    q = grid_points(32).numpy()
    # sphere: inside the polyhedron's in-radius surely inside, beyond r surely outside
    m = trimesh.creation.icosphere(subdivisions=4, radius=0.8)
    occ = mesh_occupancy_grid(*_t(m), 32).numpy()
    r_in = np.abs(np.einsum("ij,ij->i", m.face_normals, m.triangles_center)).min()
    r = np.linalg.norm(q, axis=1)
    sure = (r < r_in) | (r > 0.8)
    assert (occ[sure] == (r[sure] < r_in)).all() and sure.mean() > 0.97
    # a rotated, shifted box: inside iff every local coordinate is within the half extents
    ext, rot, c = np.array([1.3, 0.9, 0.55]), Rotation.from_euler("xyz", [20, 35, -50], degrees=True).as_matrix(), np.array([0.1, -0.05, 0.2])
    box = trimesh.creation.box(extents=ext)
    box.apply_transform(np.block([[rot, c[:, None]], [np.zeros((1, 3)), np.ones((1, 1))]]))
    local = (q - c) @ rot
    truth = (np.abs(local) < ext / 2).all(1)
    margin = np.abs(np.abs(local) - ext / 2).min(1) > 1e-9
    assert (mesh_occupancy_grid(*_t(box), 32).numpy()[margin] == truth[margin]).all() and truth.sum() > 1000


def test_rays_through_edges_and_vertices_count_once():
    # an axis-aligned box whose x/y faces, edges, corners and face diagonals lie exactly on the
    # grid lines of voxel centres, subdivided twice so that vertices shared by 4-6 faces sit on
    # interior lines: rays along z meet shared edges and vertices (a tie rule that is not one
    # perturbation of the ray counts some of them twice or never)
    h = 2 / 16
    c = -1 + h / 2 + h * np.arange(16)
    lo, hi = np.array([c[3], c[5], -0.3]), np.array([c[11], c[13], 0.45])
    box = trimesh.creation.box(bounds=np.stack([lo, hi])).subdivide().subdivide()
    q = grid_points(16).numpy()
    inside = ((q > lo) & (q < hi)).all(1)
    on_face = np.isclose(q[:, None, :], np.stack([lo, hi])[None], atol=1e-12).any((1, 2))
    w = winding_number_grid(*_t(box), 16).numpy()
    assert np.array_equal(w[~on_face], inside[~on_face].astype(float)), np.unique(w[~on_face])
    # the same box turned inside out, and as a soup of unshared vertices: same occupancy
    flipped = torch.tensor(box.faces[:, ::-1].copy(), dtype=torch.long)
    assert np.array_equal(winding_number_grid(torch.tensor(box.vertices), flipped, 16).numpy(), -w)
    soup_v = torch.tensor(box.vertices[box.faces].reshape(-1, 3))
    soup_f = torch.arange(soup_v.shape[0]).reshape(-1, 3)
    assert np.array_equal(winding_number_grid(soup_v, soup_f, 16).numpy(), w)


def _open_and_odd_meshes():
    box = trimesh.creation.box(extents=(1.2, 0.9, 0.7))
    sph = trimesh.creation.icosphere(subdivisions=2, radius=0.75)
    bowl = sph.faces[sph.triangles_center[:, 2] < 0.4]
    two = trimesh.util.concatenate([box, trimesh.creation.box(extents=(0.5, 0.5, 1.6), transform=trimesh.transformations.translation_matrix([0.4, 0.1, 0.2]))])
    return {
        "box without a side": (box.vertices, box.faces[2:]),
        "sphere with a cap cut off": (sph.vertices, bowl),
        "two overlapping boxes (w = 2 inside both)": (two.vertices, two.faces),
        "sphere (closed)": (sph.vertices, sph.faces),
    }


@pytest.mark.parametrize("name", list(_open_and_odd_meshes()))
def test_grid_matches_brute_force_generalised_winding_number(name):
    v, f = _open_and_odd_meshes()[name]
    q = grid_points(16).numpy()
    ref = np_winding_number(v, f, q)
    w = winding_number_grid(torch.tensor(v), torch.tensor(f, dtype=torch.long), 16).numpy()
    assert np.array_equal(np.abs(w) >= 0.5, np.abs(ref) >= 0.5)
    # exact wherever an axis ray leaves through a hole (w is then not an integer) and everywhere
    # for a closed mesh; where all six axis rays agree, their shared integer count is returned,
    # off by the solid angle of holes no axis ray goes through
    closed = "closed" in name or "overlapping" in name
    exact = np.ones_like(w, bool) if closed else ~np.isclose(w, np.round(w), atol=1e-12)
    assert np.allclose(w[exact], ref[exact], atol=1e-9) and np.abs(w - ref).max() < 0.4
    assert closed or exact.sum() > 100


def test_brute_force_winding_number_vs_numpy():
    m = trimesh.creation.icosphere(subdivisions=2, radius=0.6)
    v, f = m.vertices, m.faces[m.triangles_center[:, 0] < 0.3]  # open
    g = np.random.default_rng(0)
    near = m.vertices[g.integers(0, len(m.vertices), 50)] * (1 + g.choice([-1e-3, 1e-3], (50, 1)))
    q = np.concatenate([g.uniform(-1, 1, (200, 3)), near])
    out = winding_number(torch.tensor(v), torch.tensor(f, dtype=torch.long), torch.tensor(q), chunk_elems=5000).numpy()
    np.testing.assert_allclose(out, np_winding_number(v, f, q), atol=1e-9)


def test_large_mesh_smoke_and_bad_resolution():
    m = trimesh.creation.torus(0.6, 0.25, major_sections=160, minor_sections=64)  # 20k faces
    occ = mesh_occupancy_grid(*_t(m), 24)
    q = grid_points(24).numpy()
    d = np.hypot(np.hypot(q[:, 0], q[:, 1]) - 0.6, q[:, 2])
    sure = np.abs(d - 0.25) > 0.01
    assert np.array_equal(occ.numpy()[sure], (d < 0.25)[sure])
    with pytest.raises(ValueError, match="resolution"):
        mesh_occupancy_grid(*_t(m), 0)
