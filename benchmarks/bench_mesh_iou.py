"""Mesh IoU's inside test: the grid winding number vs the previous per-point O(points x faces) one.

Both measured in the same run on the same meshes (ratios, not absolutes):

- ``mesh_occupancy_grid`` (axis-aligned ray counts, plus exact solid angles of a boundary cone
  where a ray leaves through a hole) on the whole ``R^3`` grid;
- the previous implementation (every grid point against every face, ``(q, F, 3, 3)`` temporaries;
  reproduced here as the reference) timed on a random subset of the grid points and scaled to the
  whole grid (its cost is exactly linear in the number of points); also the current brute-force
  :func:`recon3d.metrics.winding_number` (the same O(points x faces), affine-in-q terms as matrix
  products) on that subset;
- agreement: the occupancy of both at the subset points (must be 100 %).

Cases: a closed 102k-face torus and the same torus cut open, at 64^3; two 5.8k-face meshes at 32^3
(what one ``update_meshes`` call with IoU costs: the prediction and the ground truth).

Run: ``.venv/bin/python benchmarks/bench_mesh_iou.py [--quick]`` or ``python -m benchmarks.run_all -k mesh_iou``.
"""

from __future__ import annotations

import math
import sys
import time

import torch


def _old_winding_number(verts: torch.Tensor, faces: torch.Tensor, query: torch.Tensor, chunk_elems: int = 2_000_000) -> torch.Tensor:
    """The inside test mesh IoU used before (recon3d 016952b): sum of solid angles, O(Q F)."""
    tri = verts[faces.long()].double()
    q = query.double()
    step = max(1, chunk_elems // max(1, tri.shape[0]))
    out = []
    for i in range(0, q.shape[0], step):
        rel = tri[None] - q[i : i + step, None, None]
        a, b, c = rel[:, :, 0], rel[:, :, 1], rel[:, :, 2]
        la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
        det = (a * torch.linalg.cross(b, c, dim=-1)).sum(-1)
        den = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
        out.append((2 * torch.atan2(det, den)).sum(-1) / (4 * math.pi))
    return torch.cat(out)


def _torus(major: int, minor: int, cut: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    import trimesh

    m = trimesh.creation.torus(0.6, 0.25, major_sections=major, minor_sections=minor)
    faces = m.faces[m.triangles_center[:, 0] < 0.45] if cut else m.faces
    return torch.tensor(m.vertices), torch.tensor(faces, dtype=torch.long)


def _case(name: str, meshes, res: int, subset: int) -> tuple:
    from recon3d.metrics import grid_points, mesh_occupancy_grid, winding_number

    q = grid_points(res)
    sel = torch.randperm(q.shape[0], generator=torch.Generator().manual_seed(0))[:subset]
    t_new = t_old = t_bf = 0.0
    agree = 0
    for v, f in meshes:
        t0 = time.perf_counter()
        occ = mesh_occupancy_grid(v, f, res)
        t_new += time.perf_counter() - t0
        t0 = time.perf_counter()
        old = _old_winding_number(v, f, q[sel]).abs() >= 0.5
        t_old += (time.perf_counter() - t0) * q.shape[0] / subset
        t0 = time.perf_counter()
        winding_number(v, f, q[sel])
        t_bf += (time.perf_counter() - t0) * q.shape[0] / subset
        agree += int((old == occ[sel]).sum())
    faces = "+".join(f"{int(f.shape[0]) / 1000:.1f}k" for _, f in meshes)
    return (f"{name} {faces} faces, {res}^3", t_new, t_old, t_bf, agree / (subset * len(meshes)))


def main(quick: bool = False) -> None:
    """Print the table. ``quick``: smaller meshes and grids, fewer reference points (~seconds)."""
    import trimesh

    torch.manual_seed(0)
    res, sub = (32, 32) if quick else (64, 256)
    big = (80, 40) if quick else (320, 160)  # 2 * 320 * 160 = 102,400 faces
    rows = [
        _case("closed torus", [_torus(*big)], res, sub),
        _case("open torus (cut)", [_torus(*big, cut=True)], res, sub),
    ]
    # two ~5.8k-face meshes at 32^3, as one update_meshes call with IoU (prediction + ground truth)
    s = trimesh.creation.icosphere(subdivisions=4)  # 5,120 faces
    blob = s.vertices * (1 + 0.3 * s.vertices[:, :1]) * [1.0, 0.7, 0.5]
    pair = [_torus(60, 48), (torch.tensor(blob), torch.tensor(s.faces, dtype=torch.long))]
    rows.append(_case("pair", pair, 16 if quick else 32, sub))

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, quick={quick}")
    print("old / brute force: timed on a random subset of grid points, scaled to the whole grid")
    print(f"{'case':38s} {'grid [s]':>9s} {'old [s]':>10s} {'old/grid':>9s} {'brute [s]':>10s} {'brute/grid':>10s}  agree")
    for name, t_new, t_old, t_bf, agree in rows:
        print(f"{name:38s} {t_new:9.3f} {t_old:10.1f} {t_old / t_new:9.0f} {t_bf:10.1f} {t_bf / t_new:10.0f}  {agree:.2%}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
