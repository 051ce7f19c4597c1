"""Triangle meshes, one per object, of different sizes (ragged).

Conventions: vertices are world points; faces index the object's own vertices, counter-clockwise
seen from outside (outward normals by the right-hand rule); vertex colours are RGB in [0, 1]; UVs
follow the OBJ / OpenGL convention (``(0, 0)`` the texture's bottom-left corner, ``v`` up, as
trimesh and :func:`recon3d.render.mesh.sample_texture`), textures are ``(H, W, 3)`` in [0, 1]
with row 0 at the top. An object may be empty (no vertices, no faces): an extractor that found no
surface for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recon3d.errors import ShapeError
from recon3d.utils.checks import check_finite, check_shape

__all__ = ["Meshes", "vertex_normals"]


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals ``(B, Nv, 3)`` of ``verts (B, Nv, 3)``, ``faces (F, 3)`` (CCW outward)."""
    a, b, c = verts[:, faces[:, 0]], verts[:, faces[:, 1]], verts[:, faces[:, 2]]
    fn = torch.linalg.cross(b - a, c - a)
    n = torch.zeros_like(verts)
    for i in range(3):
        n = n.index_add(1, faces[:, i], fn)
    return torch.nn.functional.normalize(n, dim=-1, eps=1e-12)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


@dataclass
class Meshes:
    """``B`` triangle meshes of their own sizes.

    Attributes:
        verts: list of ``(V_i, 3)`` float vertex positions.
        faces: list of ``(F_i, 3)`` int64 vertex indices into object ``i``'s vertices.
        vertex_colors: optional list of ``(V_i, 3)`` RGB in [0, 1].
        uvs: optional list of ``(V_i, 2)`` texture coordinates, with ``textures``.
        textures: optional list of ``(Ht_i, Wt_i, 3)`` images in [0, 1], with ``uvs``.

    Checked at construction (one error naming the argument and object): shapes, integer faces in
    range, finite vertices, colours/UVs with one row per vertex, ``uvs`` and ``textures`` together.
    """

    verts: list[torch.Tensor]
    faces: list[torch.Tensor]
    vertex_colors: list[torch.Tensor] | None = None
    uvs: list[torch.Tensor] | None = None
    textures: list[torch.Tensor] | None = None

    def __post_init__(self) -> None:
        for name in ("verts", "faces", "vertex_colors", "uvs", "textures"):
            v = getattr(self, name)
            if isinstance(v, torch.Tensor) or (v is not None and not isinstance(v, (list, tuple))):
                raise ShapeError(f"{name}: expected a list with one tensor per object (Meshes.single for one mesh), got {type(v).__name__}")
            if v is not None:
                setattr(self, name, list(v))
        B = len(self.verts)
        for name in ("faces", "vertex_colors", "uvs", "textures"):
            v = getattr(self, name)
            if v is not None and len(v) != B:
                raise ShapeError(f"{name}: expected one entry per object ({B}), got {len(v)}")
        if (self.uvs is None) != (self.textures is None):
            raise ShapeError("uvs: uvs and textures go together (give both or neither)")
        for i in range(B):
            dims = check_shape(self.verts[i], "V 3", f"verts[{i}]")
            check_shape(self.faces[i], "F 3", f"faces[{i}]")
            f = self.faces[i]
            if f.dtype.is_floating_point or f.dtype == torch.bool:
                raise ShapeError(f"faces[{i}]: expected integer vertex indices, got dtype {f.dtype}")
            self.faces[i] = f.long()
            if f.numel() and (int(f.min()) < 0 or int(f.max()) >= dims["V"]):
                raise ShapeError(f"faces[{i}]: expected vertex indices in [0, {dims['V']}), got [{int(f.min())}, {int(f.max())}]")
            check_finite(self.verts[i].detach(), f"verts[{i}]")
            if self.vertex_colors is not None:
                check_shape(self.vertex_colors[i], "V 3", f"vertex_colors[{i}]", dict(dims))
            if self.uvs is not None:
                check_shape(self.uvs[i], "V 2", f"uvs[{i}]", dict(dims))
                check_shape(self.textures[i], "H W 3", f"textures[{i}]")

    # ------------------------------------------------------------------ construction
    @classmethod
    def single(cls, verts: torch.Tensor, faces: torch.Tensor, vertex_colors: torch.Tensor | None = None,
               uvs: torch.Tensor | None = None, texture: torch.Tensor | None = None) -> Meshes:
        """A batch of one mesh: ``verts (V, 3)``, ``faces (F, 3)``, optional colours / UVs + texture."""
        wrap = lambda x: None if x is None else [x]
        return cls([verts], [faces], wrap(vertex_colors), wrap(uvs), wrap(texture))

    @classmethod
    def from_list(cls, items: Sequence[Meshes]) -> Meshes:
        """Concatenate batches of meshes (colours / textures kept when every item has them)."""
        items = list(items)
        if not items or not all(isinstance(m, Meshes) for m in items):
            raise ShapeError(f"items: expected a non-empty list of Meshes, got {[type(m).__name__ for m in items] or 'an empty list'}")

        def join(name: str):
            parts = [getattr(m, name) for m in items]
            return None if any(p is None for p in parts) else [x for p in parts for x in p]

        uvs, tex = join("uvs"), join("textures")
        if (uvs is None) or (tex is None):
            uvs = tex = None
        return cls(join("verts"), join("faces"), join("vertex_colors"), uvs, tex)

    @classmethod
    def from_trimesh(cls, meshes) -> Meshes:
        """From a ``trimesh.Trimesh`` (or a list of them; a ``Scene`` is concatenated into one mesh).

        Vertex colours come from ``ColorVisuals`` (RGBA uint8 → RGB in [0, 1]); UVs and the
        material's image from ``TextureVisuals``. Vertex order is kept (no merging).
        """
        import trimesh

        items = meshes if isinstance(meshes, (list, tuple)) else [meshes]
        verts, faces, cols, uvs, texs = [], [], [], [], []
        for k, m in enumerate(items):
            if isinstance(m, trimesh.Scene):
                m = m.to_geometry() if hasattr(m, "to_geometry") else m.dump(concatenate=True)
            if not isinstance(m, trimesh.Trimesh):
                raise ShapeError(f"meshes[{k}]: expected a trimesh.Trimesh or Scene, got {type(m).__name__}")
            verts.append(torch.as_tensor(np.asarray(m.vertices), dtype=torch.float32))
            faces.append(torch.as_tensor(np.asarray(m.faces), dtype=torch.int64).reshape(-1, 3))
            vis = m.visual
            col = uv = tex = None
            if vis.kind == "vertex":
                col = torch.as_tensor(np.asarray(vis.vertex_colors)[:, :3], dtype=torch.float32) / 255.0
            elif vis.kind == "texture" and getattr(vis, "uv", None) is not None:
                image = getattr(vis.material, "image", None)
                if image is None and hasattr(vis.material, "baseColorTexture"):
                    image = vis.material.baseColorTexture
                if image is not None:
                    uv = torch.as_tensor(np.asarray(vis.uv), dtype=torch.float32)
                    tex = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.float32)) / 255.0
            cols.append(col)
            uvs.append(uv)
            texs.append(tex)
        some = lambda xs: xs if all(x is not None for x in xs) else None
        uv_list, tex_list = some(uvs), some(texs)
        if uv_list is None or tex_list is None:
            uv_list = tex_list = None
        return cls(verts, faces, some(cols), uv_list, tex_list)

    # ------------------------------------------------------------------ access
    @property
    def batch_size(self) -> int:
        return len(self.verts)

    def __len__(self) -> int:
        return len(self.verts)

    @property
    def num_verts(self) -> list[int]:
        return [v.shape[0] for v in self.verts]

    @property
    def num_faces(self) -> list[int]:
        return [f.shape[0] for f in self.faces]

    def __getitem__(self, idx: int | slice) -> Meshes:
        """Objects ``idx`` as a :class:`Meshes` (an int gives a batch of one)."""
        if isinstance(idx, int):
            if not -len(self) <= idx < len(self):
                raise IndexError(f"Meshes index {idx}: the batch has {len(self)} objects")
            idx = slice(idx % len(self), idx % len(self) + 1)
        pick = lambda xs: None if xs is None else xs[idx]
        return Meshes(self.verts[idx], self.faces[idx], pick(self.vertex_colors), pick(self.uvs), pick(self.textures))

    def split(self) -> list[Meshes]:
        """One batch-of-one per object (``from_list`` inverts it)."""
        return [self[i] for i in range(len(self))]

    def vertex_normals(self) -> list[torch.Tensor]:
        """Area-weighted unit vertex normals, ``(V_i, 3)`` per object (0 for vertices of no face)."""
        return [vertex_normals(v[None], f)[0] for v, f in zip(self.verts, self.faces)]

    def to(self, *args, **kwargs) -> Meshes:
        """Move/cast every tensor (faces keep their int64 dtype)."""
        def move(x: torch.Tensor) -> torch.Tensor:
            if x.dtype.is_floating_point:
                return x.to(*args, **kwargs)
            dev = next((a for a in args if isinstance(a, (str, torch.device))), kwargs.get("device"))
            return x.to(dev) if dev is not None else x

        each = lambda xs: None if xs is None else [move(x) for x in xs]
        return Meshes(each(self.verts), each(self.faces), each(self.vertex_colors), each(self.uvs), each(self.textures))

    def detach(self) -> Meshes:
        each = lambda xs: None if xs is None else [x.detach() for x in xs]
        return Meshes(each(self.verts), each(self.faces), each(self.vertex_colors), each(self.uvs), each(self.textures))

    def to_trimesh(self, index: int = 0):
        """Object ``index`` as a ``trimesh.Trimesh`` (``process=False``: vertex order kept).

        A texture becomes a ``TextureVisuals`` with a ``SimpleMaterial`` image (uint8); vertex
        colours become uint8 RGB ``ColorVisuals``.
        """
        import trimesh

        if not 0 <= index < len(self):
            raise ShapeError(f"index: expected 0 <= index < {len(self)}, got {index}")
        v, f = _np(self.verts[index]), _np(self.faces[index])
        if self.uvs is not None:
            from PIL import Image

            img = Image.fromarray((_np(self.textures[index]).clip(0, 1) * 255).round().astype(np.uint8))
            visual = trimesh.visual.TextureVisuals(uv=_np(self.uvs[index]), material=trimesh.visual.material.SimpleMaterial(image=img))
            return trimesh.Trimesh(v, f, visual=visual, process=False)
        colors = None
        if self.vertex_colors is not None:
            colors = (_np(self.vertex_colors[index]).clip(0, 1) * 255).round().astype(np.uint8)
        return trimesh.Trimesh(v, f, vertex_colors=colors, process=False)
