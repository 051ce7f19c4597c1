from __future__ import annotations

import numpy as np
import pytest
import torch

from recon3d.data.cameras import Cameras, orbit_cameras
from recon3d.errors import ShapeError
from recon3d.render import (
    EmptySurfaceError,
    IsoSurfaceExtractor,
    MeshRasterizer,
    TorchMeshRasterizer,
    bake_texture,
    grid_points,
    marching_cubes,
    marching_cubes_fast,
    sample_texture,
    save_image_grid,
    save_mesh,
    save_video,
    turntable_cameras,
    vertex_normals,
)


def _front(size=16, f=20.0, dist=2.0, dtype=torch.float32):
    c2w = torch.eye(4, dtype=dtype)[None, None].clone()
    c2w[..., 2, 3] = -dist
    return Cameras(c2w, torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1]], dtype=dtype)[None, None], size, size)


def _quad(z=0.0, half=0.5):
    v = torch.tensor([[-half, -half, z], [half, -half, z], [half, half, z], [-half, half, z]])
    return v[None], torch.tensor([[0, 1, 2], [0, 2, 3]])


def test_plane_depth_mask_and_interpolation():
    v, f = _quad(0.3)
    cams = _front(16, 20.0, 2.0)
    fr = TorchMeshRasterizer()(v, f, cams)
    # The quad spans |x| < 0.5 at z-depth 2.3: pixels within 20*0.5/2.3 ≈ 4.35 px of the centre.
    assert fr.mask[0, 0, 0, 8, 8] == 1 and fr.mask[0, 0, 0, 0, 0] == 0
    assert int(fr.mask.sum()) == 8 * 8
    torch.testing.assert_close(fr.depth[0, 0, 0][fr.mask[0, 0, 0] > 0], torch.full((64,), 2.3))
    pos = fr.interpolate(v)  # world position per pixel
    cx = (torch.arange(16) + 0.5 - 8) / 20 * 2.3
    torch.testing.assert_close(pos[0, 0, 0, 8, 4:12], cx[4:12], atol=1e-5, rtol=0)
    assert set(fr.face_ids.unique().tolist()) == {-1, 0, 1}
    n = vertex_normals(v, f)
    torch.testing.assert_close(n[0], torch.tensor([[0.0, 0.0, 1.0]]).expand(4, 3))


def test_perspective_correct_depth_on_tilted_plane():
    """A plane z = 2 + 0.5 x seen by a pinhole: depth at each pixel is the exact ray-plane hit."""
    v = torch.tensor([[-1.0, -1.0, 1.5], [1.0, -1.0, 2.5], [1.0, 1.0, 2.5], [-1.0, 1.0, 1.5]])[None]
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    c2w = torch.eye(4)[None, None]
    cams = Cameras(c2w, torch.tensor([[[[10.0, 0, 8], [0, 10, 8], [0, 0, 1]]]]), 16, 16)
    fr = TorchMeshRasterizer()(v, f, cams)
    u = (torch.arange(16) + 0.5 - 8) / 10  # x/z per column
    expected = 2 / (1 - 0.5 * u)
    got = fr.depth[0, 0, 0, 8]
    hit = fr.mask[0, 0, 0, 8] > 0
    torch.testing.assert_close(got[hit], expected[hit], atol=1e-5, rtol=1e-5)


def test_zbuffer_keeps_nearest():
    a, fa = _quad(0.5)
    b, _ = _quad(-0.5, 0.3)
    v = torch.cat([a, b], 1)
    f = torch.cat([fa, fa + 4])
    fr = TorchMeshRasterizer()(v, f, _front())
    assert fr.face_ids[0, 0, 8, 8] >= 2 and abs(float(fr.depth[0, 0, 0, 8, 8]) - 1.5) < 1e-5


def test_soft_silhouette_moves_vertices():
    v, f = _quad(0.0, 0.3)
    v = v.clone().requires_grad_(True)
    fr = TorchMeshRasterizer(sigma=0.7)(v, f, _front(16))
    target = torch.ones_like(fr.soft_mask)
    ((fr.soft_mask - target) ** 2).sum().backward()
    # Growing the quad reduces the loss: corner gradients point inward-negative (outward step).
    g = v.grad[0]
    assert (g[:, :2] * v.detach()[0, :, :2]).sum() < 0


def test_gradcheck_interpolation_double():
    v, f = _quad(0.2)
    v = (v.double() + 0.01 * torch.randn(1, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    cams = _front(8, 10.0, 2.0, torch.float64)
    r = TorchMeshRasterizer(sigma=0.5)
    fn = lambda x: (r(x, f, cams).depth, r(x, f, cams).soft_mask)
    assert torch.autograd.gradcheck(fn, (v,), atol=1e-5, rtol=1e-3)


def test_texture_lookup():
    tex = torch.zeros(1, 3, 2, 2)
    tex[0, 0, 0, 0] = 1  # top-left texel red: uv (0, 1)
    uv = torch.tensor([0.25, 0.75]).reshape(1, 1, 2, 1, 1)
    torch.testing.assert_close(sample_texture(tex, uv)[0, 0, :, 0, 0], torch.tensor([1.0, 0, 0]))


def test_mesh_bad_args():
    v, f = _quad()
    with pytest.raises(ShapeError, match="faces"):
        TorchMeshRasterizer()(v, f + 10, _front())
    with pytest.raises(ShapeError, match="verts"):
        TorchMeshRasterizer()(v[0], f, _front())
    with pytest.raises(ShapeError, match="faces"):
        TorchMeshRasterizer()(v, f[:0], _front())
    assert MeshRasterizer(backend="auto").backend == "torch" or torch.cuda.is_available()


def test_marching_cubes_sphere_and_gradients():
    g = grid_points(32, (-1.0, 1.0))
    sdf = (g.norm(dim=-1) - 0.6).double().requires_grad_(True)
    v, f = marching_cubes(sdf, (-1.0, 1.0))
    assert (v.norm(dim=-1) - 0.6).abs().max() < 0.01
    # Outward winding: face normals point away from the centre.
    n = torch.linalg.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    assert ((n * v[f].mean(1)).sum(-1) > 0).all()
    v.norm(dim=-1).sum().backward()
    assert sdf.grad is not None and sdf.grad.abs().sum() > 0
    vf, ff = marching_cubes_fast(sdf.detach(), (-1.0, 1.0))
    d = torch.cdist(v.detach().float(), vf, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    assert vf.shape[0] == v.shape[0] and d.max() < 1e-5


def test_marching_cubes_matches_skimage_and_is_watertight():
    skimage = pytest.importorskip("skimage.measure")
    import trimesh

    g = grid_points(24, (-1.0, 1.0))
    sdf = torch.minimum(g.norm(dim=-1) - 0.5, (g - 0.4).abs().amax(-1) - 0.3)
    v, f = marching_cubes(sdf, (-1.0, 1.0))
    vs, _, _, _ = skimage.marching_cubes(sdf.numpy(), 0.0, spacing=(2 / 23,) * 3)
    vs = torch.from_numpy(vs.copy()).float() - 1.0
    assert vs.shape[0] == v.shape[0]
    assert torch.cdist(v, vs, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.max() < 1e-5
    assert trimesh.Trimesh(v.numpy(), f.numpy(), process=False).is_watertight


def test_gradcheck_marching_cubes():
    g = grid_points(6, (-1.0, 1.0)).double()
    sdf0 = g.norm(dim=-1) - 0.55
    fn = lambda s: marching_cubes(s, (-1.0, 1.0))[0]
    assert torch.autograd.gradcheck(fn, (sdf0.requires_grad_(True),))


def test_empty_sdf_errors():
    with pytest.raises(EmptySurfaceError, match="no surface"):
        marching_cubes(torch.ones(8, 8, 8))
    with pytest.raises(EmptySurfaceError):
        marching_cubes_fast(-torch.ones(8, 8, 8))
    with pytest.raises(ShapeError, match="sdf"):
        marching_cubes(torch.ones(8, 8))
    assert IsoSurfaceExtractor(backend="torch")(grid_points(8).norm(dim=-1) - 0.5)[1].shape[1] == 3


def test_exports(tmp_path):
    import trimesh

    v, f = marching_cubes(grid_points(16).norm(dim=-1) - 0.6)
    save_mesh(tmp_path / "m.glb", v, f, vertex_colors=(v + 1) / 2)
    save_mesh(tmp_path / "m.obj", v, f, vertex_colors=(v + 1) / 2)
    m = trimesh.load(tmp_path / "m.glb", force="mesh")
    assert m.vertices.shape[0] == v.shape[0]
    assert trimesh.load(tmp_path / "m.obj", force="mesh").faces.shape[0] == f.shape[0]
    v2, f2, uv, tex = bake_texture(v, f, lambda p: (p + 1) / 2, size=64)
    assert tex.shape == (64, 64, 3) and uv.shape == (v2.shape[0], 2)
    save_mesh(tmp_path / "t.glb", v2, f2, uvs=uv, texture=tex)
    save_mesh(tmp_path / "t.obj", v2, f2, uvs=uv, texture=tex)
    assert (tmp_path / "t.mtl").exists() and any(p.suffix == ".png" for p in tmp_path.iterdir())
    frames = torch.rand(4, 3, 16, 16)
    save_video(tmp_path / "a.gif", frames, fps=4)
    save_image_grid(tmp_path / "g.png", frames, nrow=2)
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == (2 * 18 + 2, 2 * 18 + 2)
    assert Image.open(tmp_path / "a.gif").n_frames == 4
    assert turntable_cameras(6, size=32).batch_shape == (1, 6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_turntable_render_end_to_end():
    v, f = marching_cubes(grid_points(16).norm(dim=-1) - 0.6)
    cams = turntable_cameras(3, size=24)
    fr = TorchMeshRasterizer()(v[None], f, cams)
    assert fr.mask.shape == (1, 3, 1, 24, 24) and np.isclose(fr.mask.mean().item(), fr.mask[0, 0].mean().item(), atol=0.05)


@pytest.mark.gpu
def test_parity_with_nvdiffrast():
    v, f = marching_cubes(grid_points(24).norm(dim=-1) - 0.6)
    cams = orbit_cameras(torch.tensor([0.0, 90.0]), torch.tensor([20.0, 0]), 2.5, 40, 64, 64).reshape(1, 2).to("cuda")
    res = {}
    for backend in ("torch", "nvdiffrast"):
        x = v[None].cuda().requires_grad_(True)
        fr = MeshRasterizer(backend=backend, device="cuda")(x, f.cuda(), cams)
        fr.depth.sum().backward()
        res[backend] = (fr.mask, fr.depth, x.grad)
    (ma, da, ga), (mb, db, gb) = res["torch"], res["nvdiffrast"]
    assert ((ma != mb).float().mean()) < 0.01
    both = (ma > 0) & (mb > 0)
    torch.testing.assert_close(da[both], db[both], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ga, gb, atol=1e-2, rtol=5e-2)
