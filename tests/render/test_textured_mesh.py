"""Textured-mesh rendering (recon3d.render.mesh.textured) against closed-form renders.

References: a sphere's silhouette is a disc of radius ``f tan(asin(r / d))`` for a camera at
distance ``d`` on its axis; the front face of a box seen head-on shows its texture at UVs computed
from ray-plane intersections (no rasterizer involved); a y-up mesh turned to z-up and normalised
has the analytic bounding box.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recon3d.data.cameras import Cameras, intrinsics_from_fov, look_at
from recon3d.data.mesh_assets import MeshPart, TexturedMesh, load_textured_mesh
from recon3d.render.mesh.textured import render_textured_mesh

trimesh = pytest.importorskip("trimesh")

RED, BLUE = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])


def checker(cells: int = 4, px: int = 16) -> np.ndarray:
    """``(cells*px, cells*px, 3)`` uint8 red/blue checker, red at texture row 0 (top) column 0."""
    i = np.arange(cells * px) // px
    odd = (i[:, None] + i[None, :]) % 2 == 1
    return np.where(odd[..., None], BLUE * 255, RED * 255).astype(np.uint8)


def textured_box(texture: np.ndarray) -> trimesh.Trimesh:
    """Unit cube ``[-0.5, 0.5]^3`` with every face mapping its square onto the whole texture:
    at a face point ``(s, t)`` in [0, 1]^2 of the face's own axes, ``uv = (s, t)``."""
    from PIL import Image

    verts, uvs, faces = [], [], []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            a, b = [k for k in range(3) if k != axis]
            if sign < 0:
                a, b = b, a  # keep the winding outward
            base = len(verts)
            for s, t in ((0, 0), (1, 0), (1, 1), (0, 1)):
                p = np.zeros(3)
                p[axis], p[a], p[b] = 0.5 * sign, s - 0.5, t - 0.5
                verts.append(p)
                uvs.append((s, t))
            faces += [[base, base + 1, base + 2], [base, base + 2, base + 3]]
    mesh = trimesh.Trimesh(np.array(verts), np.array(faces), process=False)
    mesh.visual = trimesh.visual.TextureVisuals(uv=np.array(uvs, float), image=Image.fromarray(texture))
    return mesh


def uv_sphere(radius: float = 1.0, count: int = 48) -> trimesh.Trimesh:
    return trimesh.creation.uv_sphere(radius=radius, count=[count, count])


def _camera(eye, fov_deg: float, size: int) -> Cameras:
    c2w = look_at(torch.tensor([eye], dtype=torch.float32))
    return Cameras(c2w, intrinsics_from_fov(fov_deg, size, size)[None], size, size)


def test_sphere_silhouette_is_the_analytic_disc_and_depth_normals_match():
    d, fov, size = 4.0, 40.0, 96
    m = load_textured_mesh_from(uv_sphere(1.0, 64))
    r = render_textured_mesh(m, _camera([d, 0.0, 0.0], fov, size))
    f = 0.5 * size / math.tan(math.radians(fov) / 2)
    rho = f * math.tan(math.asin(1.0 / d))  # silhouette radius in pixels
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    disc = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) <= rho**2
    mask = r.alpha[0, 0] > 0.5
    iou = (mask & disc).sum() / (mask | disc).sum()
    assert iou > 0.98, float(iou)
    # depth along the axis: the sphere's front at d - 1 (a 64-gon's faces lie inside by < 1e-2)
    c = size // 2
    assert float(r.depth[0, 0, c, c]) == pytest.approx(d - 1.0, abs=1e-2)
    # normals at covered pixels: the unit vector from the centre to the surface point on the ray
    K = intrinsics_from_fov(fov, size, size)
    dirs_cam = torch.stack([(xx - K[0, 2]) / K[0, 0], (yy - K[1, 2]) / K[1, 1], torch.ones_like(xx)], -1)
    c2w = look_at(torch.tensor([[d, 0.0, 0.0]]))[0]
    dirs = torch.nn.functional.normalize(dirs_cam @ c2w[:3, :3].T, dim=-1)
    o = c2w[:3, 3]
    b = (dirs * o).sum(-1)
    disc_term = b**2 - (o @ o - 1.0)
    t = -b - disc_term.clamp_min(0).sqrt()
    n_ref = o + t[..., None] * dirs
    inner = disc & (disc_term > 0.2)  # away from the grazing rim
    n = r.normals[0].permute(1, 2, 0)
    cos = (n[inner] * n_ref[inner]).sum(-1)
    assert float(cos.min()) > math.cos(math.radians(3.0))
    assert torch.all(r.normals[0][:, ~mask] == 0) and torch.all(r.depth[0, 0][~mask] == 0)


def load_textured_mesh_from(mesh: trimesh.Trimesh) -> TexturedMesh:
    """The same conversion the loader does, without a file (colour white)."""
    v = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32)
    f = torch.as_tensor(np.asarray(mesh.faces), dtype=torch.int64)
    return TexturedMesh(v, f, torch.zeros(len(f), 3, 2), torch.ones(len(f), 3, 3),
                        torch.as_tensor(np.array(mesh.vertex_normals), dtype=torch.float32), [MeshPart(0, len(f))])


@pytest.mark.parametrize("suffix", [".obj", ".glb"])
def test_box_face_shows_its_texture_at_the_analytic_uvs(tmp_path, suffix):
    tex = checker(4, 16)
    path = tmp_path / f"box{suffix}"
    textured_box(tex).export(path)
    m = load_textured_mesh(path)
    if suffix == ".glb":  # trimesh writes its default material's 0.4 grey as the glTF baseColorFactor (the spec multiplies)
        assert torch.allclose(m.corner_rgb, torch.full_like(m.corner_rgb, m.corner_rgb[0, 0, 0].item()))
        m.corner_rgb = torch.ones_like(m.corner_rgb)
    d, fov, size = 3.0, 30.0, 64
    r = render_textured_mesh(m, _camera([d, 0.0, 0.0], fov, size))
    # The ray through each pixel centre hits the plane x = 0.5 at world (0.5, y, z).
    cam = _camera([d, 0.0, 0.0], fov, size)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    K, c2w = cam.K[0], cam.c2w[0]
    dirs = torch.stack([(xx - K[0, 2]) / K[0, 0], (yy - K[1, 2]) / K[1, 1], torch.ones_like(xx)], -1) @ c2w[:3, :3].T
    t = (0.5 - d) / dirs[..., 0]
    hit = c2w[:3, 3] + t[..., None] * dirs  # (H, W, 3)
    # the +x face: axis 0, sign +1 -> (a, b) = (1, 2): s = y + 0.5, t = z + 0.5
    s_, t_ = hit[..., 1] + 0.5, hit[..., 2] + 0.5
    on_face = (s_ > 0) & (s_ < 1) & (t_ > 0) & (t_ < 1)
    # OBJ convention: v up, texture row 0 at the top -> texture row = (1 - t) * rows
    col = (s_ * 4).floor().long().clamp(0, 3)
    row = ((1 - t_) * 4).floor().long().clamp(0, 3)
    want = torch.where(((row + col) % 2 == 1)[..., None], torch.tensor(BLUE).float(), torch.tensor(RED).float())
    # pixels well inside one checker cell (bilinear lookups at cell borders blend)
    frac_s, frac_t = (s_ * 4) % 1, (t_ * 4) % 1
    inner = on_face & (frac_s > 0.15) & (frac_s < 0.85) & (frac_t > 0.15) & (frac_t < 0.85)
    assert int(inner.sum()) > 300
    got = r.rgb[0].permute(1, 2, 0)
    assert torch.allclose(got[inner], want[inner], atol=1e-4)
    # seen from (3, 0, 0) the other faces turn away: the silhouette is the +x face's square
    assert int(((r.alpha[0, 0] > 0.5) != on_face).sum()) == 0


def test_supersampling_gives_fractional_coverage_and_the_same_interior():
    m = load_textured_mesh_from(uv_sphere(1.0, 32))
    cam = _camera([4.0, 0.0, 0.0], 40.0, 32)
    hard, soft = render_textured_mesh(m, cam), render_textured_mesh(m, cam, supersample=3)
    frac = (soft.alpha > 0) & (soft.alpha < 1)
    assert bool(frac.any())  # anti-aliased rim
    full = (soft.alpha == 1) & (hard.alpha == 1)
    assert torch.allclose(soft.rgb.expand(-1, 3, -1, -1)[full.expand(-1, 3, -1, -1)], torch.ones(1))
    assert float((soft.alpha - hard.alpha).abs().mean()) < 0.05


def test_missing_texture_is_refused_and_ids_follow_the_folder_layout(tmp_path):
    from recon3d.data.mesh_assets import find_meshes
    from recon3d.errors import DataError

    obj = tmp_path / "gso" / "Mug" / "meshes" / "model.obj"
    obj.parent.mkdir(parents=True)
    textured_box(checker(2, 4)).export(obj)
    here = load_textured_mesh(obj).parts[0].texture
    assert here is not None
    # Google Scanned Objects: the .mtl next to the mesh names texture.png, which lives in materials/textures/
    png = next(obj.parent.glob("*.png"))
    gso = obj.parent.parent / "materials" / "textures" / png.name
    gso.parent.mkdir(parents=True)
    png.rename(gso)
    moved = load_textured_mesh(obj).parts[0].texture
    assert moved is not None and torch.equal(moved, here)
    gso.unlink()  # nowhere: trimesh alone would render the box in its flat Kd grey
    with pytest.raises(DataError, match=rf"texture {png.name} named by .*\.mtl not found"):
        load_textured_mesh(obj)
    for rel in ("Cup/meshes/model.obj", "omni/apple/apple_001/Scan/Scan.obj", "omni/apple/apple_002/Scan/Scan.obj"):
        (tmp_path / "gso" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "gso" / rel).write_text("v 0 0 0\n")
    ids = [i for i, _ in find_meshes(tmp_path / "gso")]
    assert ids == ["Cup", "Mug", "omni__apple__apple_001", "omni__apple__apple_002"]
