"""Export by representation: meshes (.glb / .obj / .ply, vertex colours or a baked UV texture),
Gaussians (the 3DGS .ply), sparse voxels (.ply points), turntable videos (.gif / .mp4) of
anything :func:`recon3d.render.render` draws, and PNG grids. Every write is atomic
(:func:`recon3d.utils.io.atomic_path`).

Which formats a representation can be written to is :func:`export_formats` (the registry
:func:`register_exporter` fills); :func:`export_representation` writes one object in the formats
asked for, named ``<stem><suffix>.<ext>`` (``mesh.glb``, ``gaussians.ply``, ``voxels.ply``) and
``turntable<suffix>.<ext>`` for videos.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from recon3d.data.cameras import Cameras, orbit_cameras
from recon3d.errors import BackendUnavailableError, ConfigError, ShapeError
from recon3d.render.gaussians.ply import save_ply, write_vertex_ply
from recon3d.render.mesh.torch_rasterizer import rasterize_screen
from recon3d.representations import Gaussians, Meshes, NeuralField, SparseVoxels, Triplanes
from recon3d.utils.checks import check_shape
from recon3d.utils.io import atomic_path

__all__ = [
    "save_mesh", "save_meshes", "bake_texture", "save_gaussians", "save_voxels", "save_video", "save_image_grid",
    "turntable_cameras", "to_uint8_frames", "export_formats", "check_export_formats", "export_representation",
    "register_exporter", "VIDEO_FORMATS",
]

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
    """Write a mesh to ``.glb``, ``.obj`` or ``.ply`` (format from the suffix).

    Args:
        verts: ``(V, 3)``; faces: ``(F, 3)``.
        vertex_colors: optional ``(V, 3)`` RGB in [0, 1].
        uvs: optional ``(V, 2)`` (OBJ convention, v up) with ``texture`` ``(H, W, 3)`` in [0, 1];
            the OBJ gets a ``.mtl`` and a PNG beside it (written atomically too).
    """
    path = Path(path)
    if path.suffix.lower() not in (".glb", ".obj", ".ply"):
        raise ConfigError(f"save_mesh: expected a .glb, .obj or .ply path, got {str(path)!r}")
    if (uvs is None) != (texture is None):
        raise ConfigError("save_mesh: uvs and texture go together")
    check_shape(verts, "V 3", "verts")
    check_shape(faces, "F 3", "faces")
    save_meshes(path, Meshes.single(verts, faces, vertex_colors, uvs, texture))


def save_meshes(path: str | os.PathLike, meshes: Meshes, index: int = 0) -> None:
    """Write object ``index`` of ``meshes`` to ``.glb`` / ``.obj`` (+ ``.mtl`` and texture PNG) /
    ``.ply`` (format from the suffix), every file atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".glb", ".obj", ".ply"):
        raise ConfigError(f"save_meshes: expected a .glb, .obj or .ply path, got {str(path)!r}")
    mesh = meshes.to_trimesh(index)
    if suffix in (".glb", ".ply"):
        with atomic_path(path) as tmp:
            mesh.export(tmp, file_type=suffix[1:])
        return
    # OBJ: trimesh returns the .obj text plus its material files; write each atomically.
    from trimesh.exchange.obj import export_obj

    text, files = export_obj(mesh, include_color=meshes.vertex_colors is not None, return_texture=True, mtl_name=f"{path.stem}.mtl")
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


def save_voxels(path: str | os.PathLike, voxels: SparseVoxels, index: int = 0, aabb: tuple[float, float] = (-1.0, 1.0)) -> None:
    """Write object ``index`` of ``voxels`` as a ``.ply`` point cloud: one vertex per voxel at its
    centre in the cube ``aabb`` (``x y z``), then its features (``feat_0..feat_{C-1}``), float32."""
    if Path(path).suffix.lower() != ".ply":
        raise ConfigError(f"save_voxels: expected a .ply path, got {str(path)!r}")
    one = voxels[index]
    data = torch.cat([one.centers(aabb).float(), one.feats.detach().float()], 1).cpu().numpy()
    write_vertex_ply(path, ["x", "y", "z"] + [f"feat_{i}" for i in range(one.num_channels)], data)


# ---------------------------------------------------------------------- registry
#: Formats written by rendering a turntable (any representation :func:`recon3d.render.render` draws).
VIDEO_FORMATS = ("gif", "mp4")

#: representation type -> {format: (file stem, writer(path, one_object))}
_EXPORTERS: dict[type, dict[str, tuple[str, Callable | None]]] = {}


def register_exporter(kind: type, fmt: str, stem: str, writer: Callable | None) -> None:
    """Say that ``kind`` exports to ``fmt``: ``writer(path, rep_of_one_object)`` writes
    ``<stem><suffix>.<fmt>``; ``writer=None`` for a turntable video (rendered)."""
    _EXPORTERS.setdefault(kind, {})[fmt] = (stem, writer)


def _table(kind: type) -> dict[str, tuple[str, Callable | None]]:
    for k in kind.__mro__:
        if k in _EXPORTERS:
            return _EXPORTERS[k]
    return {}


def export_formats(representation) -> tuple[str, ...]:
    """The formats a representation (an instance or its type) can be exported to (empty: none)."""
    kind = representation if isinstance(representation, type) else type(representation)
    return tuple(_table(kind))


def check_export_formats(representation, formats, what: str = "format") -> tuple[str, ...]:
    """``formats`` (names, ``.`` and case ignored) if ``representation`` supports all of them, else
    one :class:`ConfigError` line naming the unsupported ones and listing the supported."""
    kind = representation if isinstance(representation, type) else type(representation)
    want = tuple(dict.fromkeys(f.lower().lstrip(".") for f in formats))
    supported = export_formats(kind)
    bad = [f for f in want if f not in supported]
    if bad:
        listed = ", ".join(supported) if supported else "none"
        raise ConfigError(f"{what}: {kind.__name__} cannot be exported as {', '.join(bad)}; supported: {listed}")
    return want


def export_representation(
    representation,
    out_dir: str | os.PathLike,
    formats,
    *,
    index: int = 0,
    suffix: str = "",
    turntable: Cameras | None = None,
    fps: int = 12,
    render_opts: dict | None = None,
) -> dict[str, str]:
    """Write object ``index`` of ``representation`` under ``out_dir`` in each of ``formats``.

    Args:
        formats: names from :func:`export_formats` (others: one ``ConfigError`` line).
        suffix: added to every file stem (``mesh_refined.glb``).
        turntable: ``(1, T)`` cameras for ``gif`` / ``mp4`` (default: :func:`turntable_cameras`).
        render_opts: options of :func:`recon3d.render.render` for the turntable (``backend``, …).

    Returns:
        ``{file name: path}`` of the files written, in the order of ``formats``.
    """
    formats = check_export_formats(representation, formats)
    out_dir = Path(out_dir)
    n = representation.batch_size
    if not 0 <= index < n:
        raise ShapeError(f"index: expected 0 <= index < {n}, got {index}")
    one = representation if n == 1 else representation[index]
    table = _table(type(representation))
    files: dict[str, str] = {}
    for fmt in formats:
        stem, writer = table[fmt]
        path = out_dir / f"{stem}{suffix}.{fmt}"
        if writer is None:
            from recon3d.render.dispatch import render

            cams = turntable if turntable is not None else turntable_cameras()
            with torch.no_grad():
                frames = render(one, cams.to(_device_of(one, cams)), "white", **(render_opts or {})).rgb[0]
            save_video(path, frames, fps=fps)
        else:
            writer(path, one)
        files[path.name] = str(path)
    return files


def _device_of(rep, cams: Cameras) -> torch.device:
    for name in ("means", "planes", "feats"):
        x = getattr(rep, name, None)
        if isinstance(x, torch.Tensor):
            return x.device
    if isinstance(rep, Meshes) and rep.batch_size:
        return rep.verts[0].device
    return cams.c2w.device


for _fmt in ("glb", "obj", "ply"):
    register_exporter(Meshes, _fmt, "mesh", save_meshes)
register_exporter(Gaussians, "ply", "gaussians", save_ply)
register_exporter(SparseVoxels, "ply", "voxels", save_voxels)
for _kind in (Meshes, Gaussians, Triplanes, NeuralField):
    for _fmt in VIDEO_FORMATS:
        register_exporter(_kind, _fmt, "turntable", None)
