"""Iso-surface extraction from an SDF grid: the algorithms, with no backend choice.

Everything here is plain torch/numpy and sits below ``data``, ``render`` and ``metrics`` (datasets
extract ground-truth surfaces with it, renderers and methods their predictions);
:mod:`recon3d.render.isosurface` adds the CUDA backend (``diso``) and the extractor that picks one.

Grid convention: ``sdf[i, j, k]`` is the value at world point
``lo + (i, j, k) * (hi - lo) / (dims - 1)`` (``indexing="ij"``, first axis = x), negative inside.
Outputs are in world coordinates of the grid's box, with triangles wound counter-clockwise seen
from outside (normals point out of the object).

- :func:`marching_cubes`: pure torch, differentiable. Vertices lie on grid edges at
  ``t = (level - s0) / (s1 - s0)``, so gradients of vertex positions reach the two SDF values of
  their edge (what DiffMC gives GTR). Its triangle table is built at import from first principles
  (below) rather than typed in.
- :func:`marching_cubes_fast`: PyMCubes (C++), no gradients, for export.
- :class:`~recon3d.render.isosurface.DisoMarchingCubes` and
  :class:`~recon3d.render.isosurface.IsoSurfaceExtractor` (render layer): the CUDA backend and the
  object a method builds once.

How the table is built: each of the 256 inside/outside corner patterns is contoured face by face.
On a face walked counter-clockwise from outside, every sign change is an *entry* (outside→inside)
or an *exit*; each entry is joined to the next exit. On faces with four sign changes this always
separates the inside corners, and since the rule only reads the face's own corners, two cubes
sharing a face draw the same segments, so the mesh is watertight. Each edge is an entry on one of
its faces and an exit on the other, so the segments chain into closed loops, which are fanned
into triangles.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from recon3d.errors import ShapeError
from recon3d.utils.checks import check_finite, check_shape

__all__ = ["marching_cubes", "marching_cubes_fast", "EmptySurfaceError", "grid_points", "check_grid", "nonempty", "grid_to_world",
           "winding_points_inward"]


class EmptySurfaceError(ShapeError):
    """The SDF grid has no sign change at the requested level (no surface to extract)."""


# ---------------------------------------------------------------------------- table construction
_CORNERS = [(c & 1, (c >> 1) & 1, (c >> 2) & 1) for c in range(8)]
# Edge e runs from corner EDGE_START[e] along axis EDGE_AXIS[e].
_EDGES = [(c, a) for a in range(3) for c in range(8) if not (c >> a) & 1]
_EDGE_OF = {frozenset((c, c | (1 << a))): e for e, (c, a) in enumerate(_EDGES)}


def _faces() -> list[list[int]]:
    faces = []
    for a in range(3):
        u, v = (a + 1) % 3, (a + 2) % 3
        for side in (0, 1):
            ring = [(0, 0), (1, 0), (1, 1), (0, 1)]  # counter-clockwise about +e_a
            if side == 0:
                ring = ring[::-1]
            faces.append([(side << a) | (du << u) | (dv << v) for du, dv in ring])
    return faces


def _build_table() -> tuple[np.ndarray, np.ndarray]:
    faces = _faces()
    tris_per_case: list[list[tuple[int, int, int]]] = []
    for case in range(256):
        inside = [(case >> c) & 1 for c in range(8)]
        nxt: dict[int, int] = {}
        for ring in faces:
            crossings = []  # (edge, is_entry) in counter-clockwise order
            for m in range(4):
                p, q = ring[m], ring[(m + 1) % 4]
                if inside[p] != inside[q]:
                    crossings.append((_EDGE_OF[frozenset((p, q))], inside[q] == 1))
            for n, (edge, is_entry) in enumerate(crossings):
                if is_entry:
                    nxt[edge] = crossings[(n + 1) % len(crossings)][0]
        tris = []
        todo = set(nxt)
        while todo:
            start = min(todo)
            loop, e = [], start
            while e in todo:
                todo.discard(e)
                loop.append(e)
                e = nxt[e]
            tris += [(loop[0], loop[i], loop[i + 1]) for i in range(1, len(loop) - 1)]
        tris_per_case.append(tris)
    width = max(len(t) for t in tris_per_case)
    table = np.full((256, width, 3), -1, dtype=np.int64)
    for case, tris in enumerate(tris_per_case):
        if tris:
            table[case, : len(tris)] = tris
    return table, np.array([len(t) for t in tris_per_case])


_TRI_TABLE, _TRI_COUNT = _build_table()
_EDGE_START = np.array([_CORNERS[c] for c, _ in _EDGES], dtype=np.int64)  # (12, 3)
_EDGE_AXIS = np.array([a for _, a in _EDGES], dtype=np.int64)  # (12,)


_TABLE_CACHE: dict = {}


def _tri_table(dev) -> torch.Tensor:
    key = ("table", str(dev))
    if key not in _TABLE_CACHE:
        _TABLE_CACHE[key] = torch.as_tensor(_TRI_TABLE, device=dev)
    return _TABLE_CACHE[key]


def _tri_count(dev) -> torch.Tensor:
    key = ("count", str(dev))
    if key not in _TABLE_CACHE:
        _TABLE_CACHE[key] = torch.as_tensor(_TRI_COUNT, dtype=torch.int64, device=dev)
    return _TABLE_CACHE[key]


# ---------------------------------------------------------------------------- helpers
def _box(aabb) -> torch.Tensor:
    box = torch.as_tensor(aabb, dtype=torch.float64)
    if box.shape == (2,):
        box = box[:, None].expand(2, 3)
    if box.shape != (2, 3) or not bool((box[1] > box[0]).all()):
        raise ShapeError(f"aabb: expected (lo, hi) or a (2, 3) box with lo < hi, got {box.tolist()}")
    return box


def grid_points(resolution: int | tuple[int, int, int], aabb=(-1.0, 1.0), device=None) -> torch.Tensor:
    """World coordinates ``(X, Y, Z, 3)`` of the grid points that an SDF grid of this size samples."""
    res = (resolution,) * 3 if isinstance(resolution, int) else tuple(resolution)
    box = _box(aabb).float()
    axes = [torch.linspace(float(box[0, a]), float(box[1, a]), res[a], device=device) for a in range(3)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)


def check_grid(sdf: torch.Tensor, level: float) -> None:
    """Every extractor's input check: ``sdf (X, Y, Z)``, >= 2 samples per axis, finite, crossing ``level``.

    Raises :class:`ShapeError` for a bad grid, :class:`EmptySurfaceError` when nothing crosses.
    """
    check_shape(sdf, "X Y Z", "sdf")
    if min(sdf.shape) < 2:
        raise ShapeError(f"sdf: expected at least 2 samples per axis, got {list(sdf.shape)}")
    lo_t, hi_t = torch.aminmax(sdf.detach())
    lo, hi = float(lo_t), float(hi_t)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        check_finite(sdf.detach(), "sdf")
    if not (lo < level <= hi) and not (lo < level < hi):
        raise EmptySurfaceError(f"sdf: no surface at level {level} (values span [{lo:.4g}, {hi:.4g}], no sign change)")


def nonempty(verts: torch.Tensor, faces: torch.Tensor, level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every extractor's output check: a sign change that yields no triangle is no surface either."""
    if faces.shape[0] == 0:
        raise EmptySurfaceError(f"sdf: no surface at level {level} (the grid crosses it but yields no faces)")
    return verts, faces


def grid_to_world(idx_pos: torch.Tensor, dims: tuple[int, int, int], aabb) -> torch.Tensor:
    """Grid-index positions ``(V, 3)`` (fractional) of a ``dims`` grid spanning ``aabb`` -> world ``(V, 3)``."""
    box = _box(aabb).to(device=idx_pos.device, dtype=idx_pos.dtype)
    scale = (box[1] - box[0]) / (torch.tensor(dims, device=idx_pos.device, dtype=idx_pos.dtype) - 1)
    return box[0] + idx_pos * scale


# ---------------------------------------------------------------------------- torch marching cubes
def marching_cubes(sdf: torch.Tensor, aabb=(-1.0, 1.0), level: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable marching cubes in pure torch.

    Args:
        sdf: ``(X, Y, Z)`` grid values (module docstring), negative inside.
        aabb: ``(lo, hi)`` or ``(2, 3)`` box spanned by the grid (first to last sample).
        level: iso-value.

    Returns:
        ``verts (V, 3)`` in world units (dtype of ``sdf``; differentiable w.r.t. ``sdf``) and
        ``faces (F, 3)`` int64, counter-clockwise seen from outside. Each crossing grid edge gives
        exactly one vertex (shared by its triangles).

    Raises:
        EmptySurfaceError: no sign change at ``level``.
    """
    check_grid(sdf, level)
    X, Y, Z = sdf.shape
    dev = sdf.device
    with torch.no_grad():
        # Case index of every cube in one separable uint8 pass (corner c = i + 2j + 4k -> bit c).
        inside = (sdf.detach() < level).to(torch.uint8)
        c = inside[:, :, :-1] | (inside[:, :, 1:] << 4)
        c = c[:, :-1] | (c[:, 1:] << 2)
        case = (c[:-1] | (c[1:] << 1)).reshape(-1)
        # Active cubes only (not all-outside 0, not all-inside 255), in row-major order.
        # (case + 1) >> 1 is 0 exactly for cases 0 and 255 (uint8 wraps 255 + 1 to 0).
        active = case + 1
        active >>= 1
        # int32 ids when every global edge id fits (grids up to ~890^3), int64 beyond.
        itype = torch.int32 if 3 * X * Y * Z < 2**31 else torch.int64
        idx = active.nonzero()[:, 0].to(itype)
        cases = case[idx].long()
        n_tri = _tri_count(dev)[cases]
        cube = torch.repeat_interleave(idx, n_tri)  # F: flat cube id of each triangle
        slot = torch.arange(cube.numel(), device=dev) - torch.repeat_interleave(torch.cumsum(n_tri, 0) - n_tri, n_tri)
        local = _tri_table(dev)[torch.repeat_interleave(cases, n_tri), slot]  # F, 3 local edge ids
        # Global edge id ((axis * X + x) * Y + y) * Z + z = cube's grid-point id + per-edge offset.
        ci = cube // ((Y - 1) * (Z - 1))
        cj = (cube // (Z - 1)) % (Y - 1)
        ck = cube % (Z - 1)
        base = (ci * Y + cj) * Z + ck
        off = torch.as_tensor(_EDGE_START @ np.array([Y * Z, Z, 1]) + _EDGE_AXIS * (X * Y * Z), dtype=itype, device=dev)
        gid = base[:, None] + off[local]
        uid, inverse = torch.unique(gid.reshape(-1), return_inverse=True)
        faces = inverse.reshape(-1, 3).long()
        uid = uid.long()
        u_axis = uid // (X * Y * Z)
        i0 = uid % (X * Y * Z)  # flat grid id of the edge's start point
        i1 = i0 + torch.as_tensor([Y * Z, Z, 1], device=dev)[u_axis]
        p0 = torch.stack([i0 // (Y * Z), (i0 // Z) % Y, i0 % Z], -1)
        step = torch.nn.functional.one_hot(u_axis, 3).to(sdf.dtype)
    # One gather for both ends: the backward is a single scatter into one dense gradient.
    s0, s1 = sdf.reshape(-1).index_select(0, torch.cat([i0, i1])).chunk(2)
    t = (level - s0) / (s1 - s0)
    pos = p0.to(sdf.dtype) + t[:, None] * step
    return nonempty(grid_to_world(pos, (X, Y, Z), aabb), faces, level)


def marching_cubes_fast(sdf: torch.Tensor, aabb=(-1.0, 1.0), level: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-differentiable marching cubes (PyMCubes) with the same inputs and outputs as :func:`marching_cubes`.

    Returns ``verts (V, 3)`` float32 and ``faces (F, 3)`` int64 on ``sdf``'s device.
    """
    import mcubes

    check_grid(sdf, level)
    vol = sdf.detach().double().cpu().numpy()
    # PyMCubes treats values above the level as inside; negate so "inside" means sdf < level.
    v, f = mcubes.marching_cubes(-vol, -level)
    verts = grid_to_world(torch.from_numpy(v.astype(np.float64)), tuple(sdf.shape), aabb).float()
    faces = torch.from_numpy(f.astype(np.int64))
    if faces.numel() and winding_points_inward(verts, faces, sdf, aabb):
        faces = faces[:, [0, 2, 1]]
    return nonempty(verts.to(sdf.device), faces.to(sdf.device), level)


def winding_points_inward(verts: torch.Tensor, faces: torch.Tensor, sdf: torch.Tensor, aabb) -> bool:
    """Whether ``faces (F, 3)`` over ``verts (V, 3)`` are wound with normals into the object."""
    # Orientation check via the signed volume: positive for outward-wound closed surfaces; open
    # surfaces clipped by the box still have a clear majority sign.
    a, b, c = verts[faces[:, 0]].double(), verts[faces[:, 1]].double(), verts[faces[:, 2]].double()
    centre = verts.double().mean(0)
    vol = ((a - centre) * torch.linalg.cross(b - centre, c - centre)).sum()
    return bool(vol < 0)
