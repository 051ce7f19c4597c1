"""``render(representation, cameras, background)``: one call that draws any representation.

A method that returns a representation gets rendering for free:

=========================================  ===================================================
representation                             renderer
=========================================  ===================================================
:class:`~recon3d.representations.Gaussians`   :class:`~recon3d.render.gaussians.GaussianRasterizer`
                                           (dense or packed/ragged)
:class:`~recon3d.representations.Meshes`      :class:`~recon3d.render.mesh.MeshRasterizer` + shading
                                           (texture, else vertex colours, else grey)
:class:`~recon3d.representations.Triplanes`,  :class:`~recon3d.render.volume.VolumeRenderer` in
:class:`~recon3d.representations.NeuralField`  the field's box
a list / tuple of the above                consecutive objects, each with its own cameras slice
=========================================  ===================================================

``opts`` build the renderer (``backend``, ``n_samples``, ``sdf_to_alpha``, ``sigma`` …, the
renderer's own arguments); ``renderer=`` reuses a method's configured one instead, whose
``background`` (and, for fields, ``aabb``) are set to this call's for the call only. Every route
returns one :class:`~recon3d.representations.RenderOutput`. New types plug in with
:func:`register_renderer`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from recon3d.data.cameras import Cameras
from recon3d.errors import ConfigError, ShapeError
from recon3d.render.volume import make_background
from recon3d.representations import Gaussians, Meshes, NeuralField, RenderOutput, Triplanes

__all__ = ["render", "register_renderer", "renderable_types", "render_mesh", "MESH_GREY"]

#: Colour of a mesh with neither a texture nor vertex colours.
MESH_GREY = 0.7

_RENDERERS: dict[type, Callable[..., RenderOutput]] = {}


def register_renderer(kind: type, fn: Callable[..., RenderOutput]) -> None:
    """Route representations of type ``kind`` (and subclasses) to ``fn(rep, cameras, background, renderer=None, **opts)``."""
    _RENDERERS[kind] = fn


def renderable_types() -> list[str]:
    """Names of the representation types :func:`render` draws."""
    return [k.__name__ for k in _RENDERERS]


def _check_cameras(cameras: Cameras, batch_size: int, what: str) -> None:
    if not isinstance(cameras, Cameras) or len(cameras.batch_shape) != 2 or cameras.batch_shape[0] != batch_size:
        shape = list(cameras.batch_shape) if isinstance(cameras, Cameras) else type(cameras).__name__
        raise ShapeError(f"cameras: expected Cameras of batch shape (B={batch_size}, V) for the {what}, got {shape}")


@contextmanager
def _overridden(obj: Any, **values):
    """Set attributes of ``obj`` for the duration of the block (those given as None are left)."""
    old = {k: getattr(obj, k) for k, v in values.items() if v is not None}
    try:
        for k in old:
            setattr(obj, k, values[k])
        yield obj
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


def render(representation, cameras: Cameras, background: str | float | torch.Tensor | None = "white", *,
           renderer: torch.nn.Module | None = None, **opts) -> RenderOutput:
    """Render ``representation`` (``B`` objects) into ``cameras (B, V)`` (module docstring).

    Args:
        representation: a representation of :func:`renderable_types`, or a list of them.
        cameras: ``(B, V)`` cameras, ``B`` the representation's number of objects.
        background: ``"white" | "black" | "random"``, a float or an RGB tensor; None keeps a given
            ``renderer``'s own.
        renderer: a built renderer to reuse (``GaussianRasterizer``, ``MeshRasterizer``,
            ``VolumeRenderer``); None builds the default one from ``opts``.
        **opts: arguments of the renderer built when ``renderer`` is None.

    Returns:
        :class:`RenderOutput` with ``rgb (B, V, 3, H, W)``, ``alpha`` and ``depth``
        ``(B, V, 1, H, W)``, and ``normal`` where the route gives one.
    """
    if isinstance(representation, (list, tuple)):
        if not representation:
            raise ShapeError("representation: expected at least one object to render")
        sizes = [_batch_size(r) for r in representation]
        _check_cameras(cameras, sum(sizes), f"{len(representation)} representations")
        parts, b = [], 0
        for r, n in zip(representation, sizes):
            parts.append(render(r, cameras[b : b + n], background, renderer=renderer, **dict(opts)))
            b += n
        return RenderOutput.cat(parts)
    for kind in type(representation).__mro__:
        if kind in _RENDERERS:
            return _RENDERERS[kind](representation, cameras, background, renderer=renderer, **opts)
    raise ConfigError(f"render: cannot render a {type(representation).__name__}; supported: {', '.join(renderable_types())} (or a list of them)")


def _batch_size(rep) -> int:
    n = getattr(rep, "batch_size", None)
    if not isinstance(n, int):
        raise ConfigError(f"render: cannot render a {type(rep).__name__}; supported: {', '.join(renderable_types())} (or a list of them)")
    return n


# ---------------------------------------------------------------------- Gaussians
def _render_gaussians(g: Gaussians, cameras: Cameras, background, renderer=None, **opts) -> RenderOutput:
    from recon3d.render.gaussians import GaussianRasterizer

    _check_cameras(cameras, g.batch_size, "Gaussians")
    if renderer is None:
        renderer = GaussianRasterizer(opts.pop("backend", "auto"), device=g.means.device, background="white" if background is None else background, **opts)
        return renderer(g, cameras)
    holder = renderer.impl if hasattr(renderer, "impl") else renderer
    with _overridden(holder, background=background):
        return renderer(g, cameras)


# ---------------------------------------------------------------------- meshes
def render_mesh(meshes: Meshes, cameras: Cameras, background="white", renderer=None, **opts) -> RenderOutput:
    """Rasterize and shade each mesh into its cameras.

    Colour: the texture at the interpolated UVs, else the interpolated vertex colours, else
    :data:`MESH_GREY`; composited over ``background`` with the hard coverage, then (where the
    rasterizer gives one) the soft silhouette, which is then ``alpha`` (else the hard mask).
    ``normal``: the interpolated area-weighted vertex normals, renormalised, 0 where empty.
    An object with no faces renders the background with alpha and depth 0.
    """
    from recon3d.render.gaussians.rasterizer import empty_render
    from recon3d.render.mesh import MeshRasterizer, sample_texture

    _check_cameras(cameras, meshes.batch_size, "Meshes")
    bg_kind = "white" if background is None else background
    if renderer is None:
        dev = meshes.verts[0].device if meshes.batch_size else cameras.c2w.device
        renderer = MeshRasterizer(opts.pop("backend", "auto"), device=dev, **opts)
    normals = meshes.vertex_normals()
    outs = []
    for b in range(meshes.batch_size):
        verts, faces, cams = meshes.verts[b], meshes.faces[b], cameras[b : b + 1]
        if faces.shape[0] == 0:
            outs.append(empty_render(cams, bg_kind, verts.device, verts.dtype))
            continue
        frags = renderer(verts[None], faces, cams)
        if meshes.uvs is not None:
            uv = frags.interpolate(meshes.uvs[b][None].to(verts))
            col = sample_texture(meshes.textures[b].to(verts).permute(2, 0, 1)[None], uv)
        elif meshes.vertex_colors is not None:
            col = frags.interpolate(meshes.vertex_colors[b][None].to(verts))
        else:
            col = torch.full_like(frags.depth.expand(-1, -1, 3, -1, -1), MESH_GREY)
        V = cams.batch_shape[1]
        bg = make_background(bg_kind, (1, V), verts.device, verts.dtype)[..., None, None]
        hard = frags.mask.to(verts.dtype)
        rgb = col * hard + (1 - hard) * bg
        alpha = hard
        if frags.soft_mask is not None:
            alpha = frags.soft_mask.to(verts.dtype)
            rgb = rgb * alpha + (1 - alpha) * bg
        nrm = torch.nn.functional.normalize(frags.interpolate(normals[b][None]), dim=2, eps=1e-12) * hard
        outs.append(RenderOutput(rgb, alpha, frags.depth, nrm, extras={"hard_mask": hard}))
    return RenderOutput.cat(outs)


# ---------------------------------------------------------------------- fields
def _render_field(field: NeuralField | Triplanes, cameras: Cameras, background, renderer=None, **opts) -> RenderOutput:
    from recon3d.render.volume import VolumeRenderer

    _check_cameras(cameras, field.batch_size, type(field).__name__)
    if renderer is None:
        renderer = VolumeRenderer(aabb=field.aabb, background="white" if background is None else background, **opts).to(cameras.c2w.device)
        return renderer(field, cameras)
    with _overridden(renderer, background=background, aabb=field.aabb.to(renderer.aabb)):
        return renderer(field, cameras)


register_renderer(Gaussians, _render_gaussians)
register_renderer(Meshes, render_mesh)
register_renderer(Triplanes, _render_field)
register_renderer(NeuralField, _render_field)
