"""Export: meshes (.glb / .obj, vertex colours or a baked UV texture), Gaussians (.ply),
turntable videos (.mp4 / .gif) and PNG grids. Every write is atomic (:func:`recon3d.utils.io.atomic_path`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from recon3d.data.cameras import Cameras, orbit_cameras
from recon3d.errors import BackendUnavailableError, ConfigError, ShapeError
from recon3d.render.gaussians.ply import save_ply
from recon3d.render.mesh.torch_rasterizer import rasterize_screen
from recon3d.utils.checks import check_shape
from recon3d.utils.io import atomic_path

__all__ = ["save_mesh", "bake_texture", "save_gaussians", "save_video", "save_image_grid", "turntable_cameras", "to_uint8_frames"]

save_gaussians = save_ply


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def save_mesh(
    path: str | os.PathLike,
    verts: torch.Tensor,
    faces: torch.Tensor,
    vertex_colors: torch.Tensor | None = None,
    uvs: torch.Tensor | None = None,
    texture: torch.Tensor | None = None,
) -> None:
    """Write a mesh to ``.glb`` or ``.obj`` (format from the suffix).

    Args:
        verts: ``(V, 3)``; faces: ``(F, 3)``.
        vertex_colors: optional ``(V, 3)`` RGB in [0, 1].
        uvs: optional ``(V, 2)`` (OBJ convention, v up) with ``texture`` ``(H, W, 3)`` in [0, 1];
            the OBJ gets a ``.mtl`` and a PNG beside it (written atomically too).
    """
    import trimesh

    check_shape(verts, "V 3", "verts")
    check_shape(faces, "F 3", "faces")
    path = Path(path)
    if path.suffix.lower() not in (".glb", ".obj"):
        raise ConfigError(f"save_mesh: expected a .glb or .obj path, got {str(path)!r}")
    if (uvs is None) != (texture is None):
        raise ConfigError("save_mesh: uvs and texture go together")
    if uvs is not None:
        check_shape(uvs, "V 2", "uvs", {"V": verts.shape[0]})
        check_shape(texture, "H W 3", "texture")
        from PIL import Image

        img = Image.fromarray((_np(texture).clip(0, 1) * 255).round().astype(np.uint8))
        visual = trimesh.visual.TextureVisuals(uv=_np(uvs), material=trimesh.visual.material.SimpleMaterial(image=img))
        mesh = trimesh.Trimesh(_np(verts), _np(faces), visual=visual, process=False)
    else:
        colors = None
        if vertex_colors is not None:
            check_shape(vertex_colors, "V 3", "vertex_colors", {"V": verts.shape[0]})
            colors = (_np(vertex_colors).clip(0, 1) * 255).round().astype(np.uint8)
        mesh = trimesh.Trimesh(_np(verts), _np(faces), vertex_colors=colors, process=False)
    if path.suffix.lower() == ".glb":
        with atomic_path(path) as tmp:
            mesh.export(tmp, file_type="glb")
        return
    # OBJ: trimesh returns the .obj text plus its material files; write each atomically.
    from trimesh.exchange.obj import export_obj

    text, files = export_obj(mesh, include_color=vertex_colors is not None, return_texture=True, mtl_name=f"{path.stem}.mtl")
    for name, data in files.items():
        with atomic_path(path.parent / name) as tmp:
            tmp.write_bytes(data)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def bake_texture(
    verts: torch.Tensor, faces: torch.Tensor, color_fn: Callable[[torch.Tensor], torch.Tensor], size: int = 1024, padding: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """UV-unwrap with xatlas and bake ``color_fn`` into a texture.

    Args:
        verts: ``(V, 3)``; faces: ``(F, 3)``.
        color_fn: world points ``(N, 3)`` → RGB ``(N, 3)`` in [0, 1] (e.g. a triplane colour MLP).
        size: texture edge in texels.
        padding: texel dilation rounds that fill gutters around charts (hides seams under filtering).

    Returns:
        ``verts (V', 3)``, ``faces (F', 3)``, ``uvs (V', 2)`` (vertices split at seams) and
        ``texture (size, size, 3)``.
    """
    import xatlas

    check_shape(verts, "V 3", "verts")
    check_shape(faces, "F 3", "faces")
    vmap, new_faces, uvs = xatlas.parametrize(_np(verts).astype(np.float32), _np(faces).astype(np.uint32))
    dev = verts.device
    new_verts = verts.detach()[torch.from_numpy(vmap.astype(np.int64)).to(dev)]
    new_faces_t = torch.from_numpy(new_faces.astype(np.int64)).to(dev)
    uvs_t = torch.from_numpy(uvs).float().to(dev)
    # Rasterize the UV layout as a screen: texel row 0 is v = 1 (image top).
    screen = torch.stack([uvs_t[:, 0] * size, (1 - uvs_t[:, 1]) * size, torch.ones_like(uvs_t[:, 0])], -1)[None]
    fid, _ = rasterize_screen(screen, new_faces_t, size, size)
    fid = fid[0]
    covered = fid >= 0
    ys, xs = covered.nonzero(as_tuple=True)
    tri = screen[0, new_faces_t[fid[covered]]]
    cx, cy = xs.float() + 0.5, ys.float() + 0.5

    def edge(a, b):
        return (b[:, 0] - a[:, 0]) * (cy - a[:, 1]) - (b[:, 1] - a[:, 1]) * (cx - a[:, 0])

    area = (tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1]) - (tri[:, 1, 1] - tri[:, 0, 1]) * (tri[:, 2, 0] - tri[:, 0, 0])
    w0, w1 = edge(tri[:, 1], tri[:, 2]) / area, edge(tri[:, 2], tri[:, 0]) / area
    bary = torch.stack([w0, w1, 1 - w0 - w1], -1)
    pts = (new_verts[new_faces_t[fid[covered]]] * bary[..., None]).sum(1)
    with torch.no_grad():
        cols = color_fn(pts).float().clamp(0, 1)
    tex = torch.zeros(size, size, 3, device=dev)
    tex[covered] = cols
    filled = covered.clone()
    for _ in range(padding):  # grow charts into the gutter by copying neighbouring texels
        pad_t = torch.nn.functional.pad(tex.permute(2, 0, 1)[None], (1, 1, 1, 1))[0]
        pad_m = torch.nn.functional.pad(filled[None].float(), (1, 1, 1, 1))[0]
        acc = torch.zeros_like(tex.permute(2, 0, 1))
        cnt = torch.zeros(size, size, device=dev)
        for dy in range(3):
            for dx in range(3):
                m = pad_m[dy : dy + size, dx : dx + size]
                acc += pad_t[:, dy : dy + size, dx : dx + size] * m
                cnt += m
        grow = ~filled & (cnt > 0)
        tex[grow] = (acc / cnt.clamp_min(1)).permute(1, 2, 0)[grow]
        filled |= grow
    return new_verts, new_faces_t, uvs_t, tex


def to_uint8_frames(frames: torch.Tensor) -> np.ndarray:
    """``(T, 3, H, W)`` or ``(T, H, W, 3)`` floats in [0, 1] → ``(T, H, W, 3)`` uint8."""
    if frames.ndim != 4 or 3 not in (frames.shape[1], frames.shape[-1]):
        raise ShapeError(f"frames: expected (T, 3, H, W) or (T, H, W, 3), got {list(frames.shape)}")
    if frames.shape[1] == 3 and frames.shape[-1] != 3:
        frames = frames.permute(0, 2, 3, 1)
    return (_np(frames).clip(0, 1) * 255).round().astype(np.uint8)


def save_video(path: str | os.PathLike, frames: torch.Tensor, fps: int = 24) -> None:
    """Write frames to ``.gif`` (Pillow) or ``.mp4`` (imageio + imageio-ffmpeg)."""
    path = Path(path)
    arr = to_uint8_frames(frames)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        from PIL import Image

        imgs = [Image.fromarray(f) for f in arr]
        with atomic_path(path) as tmp:
            imgs[0].save(tmp, save_all=True, append_images=imgs[1:], duration=max(1, round(1000 / fps)), loop=0)
    elif suffix == ".mp4":
        try:
            import imageio.v2 as imageio
            import imageio_ffmpeg  # noqa: F401
        except ImportError as err:
            raise BackendUnavailableError(f"save_video: .mp4 needs imageio-ffmpeg ({err}); write a .gif or `pip install imageio-ffmpeg`") from err
        with atomic_path(path) as tmp:
            imageio.mimwrite(tmp, list(arr), fps=fps, macro_block_size=1)
    else:
        raise ConfigError(f"save_video: expected a .gif or .mp4 path, got {str(path)!r}")


def save_image_grid(path: str | os.PathLike, images: torch.Tensor, nrow: int = 4, pad: int = 2) -> None:
    """Tile ``images (N, C, H, W)`` (C = 1 or 3, [0, 1]) into one PNG, ``nrow`` per row."""
    from PIL import Image

    check_shape(images, "N C H W", "images")
    if images.shape[1] not in (1, 3):
        raise ShapeError(f"images: expected 1 or 3 channels, got {images.shape[1]}")
    x = images.detach().float().cpu().clamp(0, 1).expand(-1, 3, -1, -1)
    N, _, H, W = x.shape
    rows = (N + nrow - 1) // nrow
    grid = torch.ones(3, rows * (H + pad) + pad, nrow * (W + pad) + pad)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = x[i]
    img = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def turntable_cameras(n_frames: int = 36, elevation_deg: float = 20.0, radius: float = 2.5, fov_y_deg: float = 40.0, size: int = 256, up_axis: str = "z") -> Cameras:
    """``(1, n_frames)`` cameras circling the origin, for turntable renders."""
    az = torch.linspace(0, 360, n_frames + 1)[:-1]
    return orbit_cameras(az, torch.full_like(az, elevation_deg), radius, fov_y_deg, size, size, up_axis).reshape(1, n_frames)
