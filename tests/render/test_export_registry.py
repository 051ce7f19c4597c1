"""Export by representation: the registry of formats, the 3DGS .ply read back with plyfile, voxel
points, meshes re-opened with trimesh, turntables, and one-line refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recon3d.data.cameras import orbit_cameras
from recon3d.errors import ConfigError
from recon3d.render import load_ply
from recon3d.render.export import check_export_formats, export_formats, export_representation
from recon3d.representations import Gaussians, Meshes, SparseVoxels, Triplanes

plyfile = pytest.importorskip("plyfile", reason="plyfile (a dev dependency) reads the exported .ply files")

SH_C0 = 1 / (2 * math.sqrt(math.pi))


def _gaussians(N=7, sh_degree=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    colors = torch.rand(1, N, 3, generator=g) if sh_degree is None else torch.randn(1, N, (sh_degree + 1) ** 2, 3, generator=g)
    return Gaussians((torch.rand(1, N, 3, generator=g) - 0.5), torch.randn(1, N, 4, generator=g), torch.rand(1, N, 3, generator=g) * 0.1 + 0.01,
                     torch.rand(1, N, generator=g) * 0.9 + 0.05, colors, sh_degree)


def test_registry_lists_formats_per_representation():
    assert export_formats(Meshes) == ("glb", "obj", "ply", "gif", "mp4")
    assert export_formats(Gaussians) == ("ply", "gif", "mp4")
    assert export_formats(SparseVoxels) == ("ply",)
    assert "gif" in export_formats(Triplanes) and export_formats(int) == ()
    assert check_export_formats(Meshes, ["GLB", ".obj", "glb"]) == ("glb", "obj")
    with pytest.raises(ConfigError, match=r"^format: Gaussians cannot be exported as glb; supported: ply, gif, mp4$"):
        check_export_formats(Gaussians, ["glb"])


def test_gaussian_ply_is_the_3dgs_layout_and_round_trips(tmp_path):
    g = _gaussians(sh_degree=3)
    files = export_representation(g, tmp_path, ["ply"])
    assert list(files) == ["gaussians.ply"]
    ply = plyfile.PlyData.read(files["gaussians.ply"])
    el = ply["vertex"]
    names = [p.name for p in el.properties]
    expected = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(45)]
    expected += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert names == expected and all(p.val_dtype in ("f4", "float32") for p in el.properties)
    col = lambda n: torch.from_numpy(np.asarray(el[n], dtype=np.float64))
    d = g.means.double()[0]
    torch.testing.assert_close(torch.stack([col("x"), col("y"), col("z")], 1), d)
    # INRIA convention: logit opacity, log scales, (w, x, y, z) quaternions as stored
    o = g.opacities.double()[0]
    torch.testing.assert_close(col("opacity"), torch.log(o / (1 - o)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack([col(f"scale_{i}") for i in range(3)], 1), g.scales.double()[0].log(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.stack([col(f"rot_{i}") for i in range(4)], 1), g.quats.double()[0])
    # f_dc_c = SH coefficient 0 of channel c; f_rest channel-major: f_rest_{c*15 + k-1} = coefficient k of channel c
    sh = g.colors.double()[0]
    torch.testing.assert_close(torch.stack([col(f"f_dc_{c}") for c in range(3)], 1), sh[:, 0])
    for c in range(3):
        for k in range(1, 16):
            torch.testing.assert_close(col(f"f_rest_{c * 15 + k - 1}"), sh[:, k, c])
    back = load_ply(files["gaussians.ply"])
    torch.testing.assert_close(back.opacities, g.opacities, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back.colors, g.colors)


def test_rgb_gaussians_and_an_empty_object(tmp_path):
    g = _gaussians()
    path = export_representation(g, tmp_path, ["ply"])["gaussians.ply"]
    el = plyfile.PlyData.read(path)["vertex"]
    dc = np.stack([el[f"f_dc_{c}"] for c in range(3)], 1)
    np.testing.assert_allclose(dc, (g.colors[0].numpy() - 0.5) / SH_C0, rtol=1e-6, atol=1e-6)
    assert not any(p.name.startswith("f_rest") for p in el.properties)
    ragged = Gaussians.from_list([g, Gaussians(torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, 3), counts=[0])])
    empty = export_representation(ragged, tmp_path / "e", ["ply"], index=1)["gaussians.ply"]
    assert plyfile.PlyData.read(empty)["vertex"].count == 0
    assert load_ply(empty).counts.tolist() == [0]


def test_voxels_export_as_points(tmp_path):
    v = SparseVoxels.from_list([(torch.tensor([[0, 0, 0], [3, 1, 2]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]])),
                                (torch.tensor([[2, 2, 2]]), torch.tensor([[5.0, 6.0]]))], resolution=4)
    path = export_representation(v, tmp_path, ["ply"], index=0)["voxels.ply"]
    el = plyfile.PlyData.read(path)["vertex"]
    # centres of a 4^3 grid on [-1, 1]: -1 + (i + 0.5) * 0.5
    np.testing.assert_allclose(np.stack([el["x"], el["y"], el["z"]], 1), [[-0.75, -0.75, -0.75], [0.75, -0.25, 0.25]])
    np.testing.assert_allclose(np.stack([el["feat_0"], el["feat_1"]], 1), [[1, 2], [3, 4]])
    with pytest.raises(ConfigError, match="SparseVoxels cannot be exported as glb; supported: ply"):
        export_representation(v, tmp_path, ["glb"])


def test_meshes_reopen_and_turntables_render(tmp_path):
    import trimesh
    from PIL import Image

    v = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]]) * 0.5
    f = torch.tensor([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    m = Meshes.from_list([Meshes.single(v * 2, f, torch.rand(6, 3)), Meshes.single(v, f, torch.rand(6, 3))])
    cams = orbit_cameras(torch.tensor([0.0, 120, 240]), torch.full((3,), 20.0), 2.5, 40, 24, 24).reshape(1, 3)
    files = export_representation(m, tmp_path, ["glb", "obj", "ply", "gif"], index=1, suffix="_b", turntable=cams)
    assert list(files) == ["mesh_b.glb", "mesh_b.obj", "mesh_b.ply", "turntable_b.gif"]
    for name in ("mesh_b.glb", "mesh_b.obj", "mesh_b.ply"):
        tm = trimesh.load(files[name], force="mesh", process=False)
        assert len(tm.faces) == 8, name
        np.testing.assert_allclose(np.abs(tm.vertices).max(), 0.5, rtol=1e-6)  # object 1, not object 0
    with Image.open(files["turntable_b.gif"]) as im:
        assert im.n_frames == 3 and im.size == (24, 24)
    gif = export_representation(_gaussians(), tmp_path, ["gif"], turntable=cams)["turntable.gif"]
    with Image.open(gif) as im:
        assert im.n_frames == 3
