"""Meshes: ragged per-object meshes, validation, vertex normals, trimesh round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recon3d.errors import ShapeError
from recon3d.representations import Meshes, vertex_normals


def _octahedron():
    v = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
    f = torch.tensor([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    return v, f


def _tri():
    return torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]), torch.tensor([[0, 1, 2]])


def test_ragged_batch_index_split_and_empty_objects():
    (v1, f1), (v2, f2) = _octahedron(), _tri()
    m = Meshes([v1, torch.zeros(0, 3), v2], [f1, torch.zeros(0, 3, dtype=torch.long), f2])
    assert m.batch_size == 3 and m.num_verts == [6, 0, 3] and m.num_faces == [8, 0, 1]
    assert m[2].verts[0] is v2 and m[1].num_faces == [0]
    back = Meshes.from_list(m.split())
    assert all(torch.equal(a, b) for a, b in zip(back.verts, m.verts))
    assert all(torch.equal(a, b) for a, b in zip(back.faces, m.faces))
    assert m.faces[0].dtype == torch.int64


def test_vertex_normals_closed_form():
    # By symmetry each vertex normal of a regular octahedron points along the vertex itself.
    v, f = _octahedron()
    n = Meshes.single(v, f).vertex_normals()[0]
    torch.testing.assert_close(n, v)
    # A CCW triangle in z = 0 faces +z; the same function is what render.mesh re-exports.
    from recon3d.render.mesh import vertex_normals as rendered

    assert rendered is vertex_normals
    torch.testing.assert_close(vertex_normals(_tri()[0][None], _tri()[1])[0], torch.tensor([[0.0, 0, 1]] * 3))


def test_checks_name_the_argument():
    v, f = _tri()
    with pytest.raises(ShapeError, match=r"faces\[0\]: expected vertex indices in \[0, 3\)"):
        Meshes([v], [torch.tensor([[0, 1, 3]])])
    with pytest.raises(ShapeError, match=r"faces\[0\]: expected integer"):
        Meshes([v], [f.float()])
    with pytest.raises(ShapeError, match=r"vertex_colors\[1\]"):
        Meshes([v, v], [f, f], [torch.rand(3, 3), torch.rand(2, 3)])
    with pytest.raises(ShapeError, match="uvs and textures go together"):
        Meshes([v], [f], uvs=[torch.rand(3, 2)])
    with pytest.raises(ShapeError, match="faces: expected one entry per object"):
        Meshes([v, v], [f])
    with pytest.raises(ShapeError, match="verts: expected a list"):
        Meshes(v, f)
    with pytest.raises(ShapeError, match=r"verts\[0\]"):
        Meshes([torch.full((3, 3), math.nan)], [f])


def test_trimesh_round_trip_vertex_colours_and_texture(tmp_path):
    import trimesh

    v, f = _octahedron()
    cols = torch.rand(6, 3, generator=torch.Generator().manual_seed(0))
    m = Meshes.single(v, f, cols)
    tm = m.to_trimesh()
    assert isinstance(tm, trimesh.Trimesh) and np.array_equal(tm.faces, f.numpy())
    back = Meshes.from_trimesh(tm)
    torch.testing.assert_close(back.verts[0], v)
    assert torch.equal(back.faces[0], f)
    assert (back.vertex_colors[0] - cols).abs().max() <= 0.5 / 255 + 1e-6  # uint8 quantisation

    uvs = torch.rand(6, 2, generator=torch.Generator().manual_seed(1))
    tex = torch.rand(8, 8, 3, generator=torch.Generator().manual_seed(2))
    t = Meshes.from_trimesh(Meshes.single(v, f, uvs=uvs, texture=tex).to_trimesh())
    torch.testing.assert_close(t.uvs[0], uvs)
    assert (t.textures[0] - tex).abs().max() <= 0.5 / 255 + 1e-6

    # through a file: glb keeps vertices and colours (trimesh reads a Scene; it is concatenated)
    path = tmp_path / "m.glb"
    tm.export(path)
    loaded = Meshes.from_trimesh(trimesh.load(path))
    assert loaded.num_faces == [8]
    torch.testing.assert_close(loaded.verts[0][loaded.faces[0]], v[f])
