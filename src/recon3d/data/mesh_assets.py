"""Textured mesh assets (OBJ + MTL + textures, GLB/glTF, PLY/OFF with colours) read with trimesh.

:func:`load_textured_mesh` flattens a file (a scene of several meshes and materials, with node
transforms applied) into one :class:`TexturedMesh`: one vertex array, one face array and, per
face corner, a UV and an RGBA colour factor, plus one entry per *part* (a run of faces that
shares a material) naming its base-colour texture. A renderer then rasterizes the whole object
once and looks up each pixel's part by face id.

Conventions: UVs are OBJ/OpenGL (``(0, 0)`` at the image's bottom-left, ``v`` up); trimesh
already flips glTF's top-left UVs to this on load. Colours are straight RGB(A) in [0, 1]; the
colour of a pixel is ``corner colour x texture`` (the material's base-colour factor and any
vertex/face colours go into the corner colour). Texture alpha and material transparency are
ignored (the surface is opaque), so the object's silhouette is its geometry.

:func:`find_meshes` lists the mesh files of a folder with stable object ids (see there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from recon3d.errors import DataError

__all__ = ["TexturedMesh", "MeshPart", "load_textured_mesh", "find_meshes", "MESH_SUFFIXES"]

#: File suffixes :func:`find_meshes` picks up (lower case).
MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".off")


@dataclass
class MeshPart:
    """Faces ``[start, stop)`` of a :class:`TexturedMesh` drawn with one base-colour ``texture``
    ``(3, Ht, Wt)`` in [0, 1] (row 0 at the top), or None (colour from the corners alone)."""

    start: int
    stop: int
    texture: torch.Tensor | None = None


@dataclass
class TexturedMesh:
    """One object as a single triangle soup with per-corner attributes.

    Attributes:
        verts: ``(N, 3)`` float32 positions.
        faces: ``(F, 3)`` int64 vertex indices.
        corner_uv: ``(F, 3, 2)`` float32 UVs per face corner (0 where a part has none).
        corner_rgb: ``(F, 3, 3)`` float32 colour factor per face corner in [0, 1].
        vertex_normals: ``(N, 3)`` float32 unit normals (area-weighted, per part).
        parts: the material runs; together they cover ``[0, F)``.
    """

    verts: torch.Tensor
    faces: torch.Tensor
    corner_uv: torch.Tensor
    corner_rgb: torch.Tensor
    vertex_normals: torch.Tensor
    parts: list[MeshPart] = field(default_factory=list)

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    def transformed(self, matrix: torch.Tensor) -> TexturedMesh:
        """A copy with ``verts' = s R verts + t`` for a ``(4, 4)`` similarity ``matrix`` (normals rotated)."""
        m = matrix.to(torch.float64)
        v = self.verts.double() @ m[:3, :3].T + m[:3, 3]
        n = torch.nn.functional.normalize(self.vertex_normals.double() @ m[:3, :3].T, dim=-1)
        return TexturedMesh(v.float(), self.faces, self.corner_uv, self.corner_rgb, n.float(), list(self.parts))


def _image_tensor(img) -> torch.Tensor | None:
    """A PIL image (any mode) → ``(3, H, W)`` float in [0, 1], or None."""
    if img is None:
        return None
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def _material_colour(material) -> tuple[np.ndarray, torch.Tensor | None]:
    """``(rgb factor (3,), texture or None)`` of a trimesh material (Simple or PBR)."""
    factor = np.ones(3, np.float32)
    texture = None
    if material is None:
        return factor, texture
    base_tex = getattr(material, "baseColorTexture", None)
    if base_tex is not None or hasattr(material, "baseColorFactor"):  # PBRMaterial
        f = getattr(material, "baseColorFactor", None)
        if f is not None:
            f = np.asarray(f, dtype=np.float32).reshape(-1)
            factor = f[:3] / (255.0 if f.max() > 1.0 else 1.0)
        texture = _image_tensor(base_tex)
    else:  # SimpleMaterial: `image` is the diffuse map (map_Kd); `diffuse` (Kd) multiplies it only when there is no map
        texture = _image_tensor(getattr(material, "image", None))
        d = getattr(material, "diffuse", None)
        if texture is None and d is not None:
            d = np.asarray(d, dtype=np.float32).reshape(-1)
            factor = d[:3] / (255.0 if d.max() > 1.0 else 1.0)
    return factor, texture


def _part_attributes(mesh) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None]:
    """``(corner uv (F, 3, 2), corner rgb (F, 3, 3), texture or None)`` of one trimesh mesh."""
    faces = np.asarray(mesh.faces, dtype=np.int64)
    F = faces.shape[0]
    uv_c = np.zeros((F, 3, 2), np.float32)
    rgb_c = np.ones((F, 3, 3), np.float32)
    texture = None
    visual = mesh.visual
    kind = getattr(visual, "kind", None)
    if kind == "texture":
        factor, texture = _material_colour(getattr(visual, "material", None))
        rgb_c = rgb_c * factor
        uv = getattr(visual, "uv", None)
        if uv is not None and len(uv) == len(mesh.vertices):
            uv_c = np.asarray(uv, dtype=np.float32)[faces]
        elif texture is not None:
            texture = None  # a texture without UVs cannot be placed; its factor's colour stays
    elif kind == "vertex":
        vc = np.asarray(visual.vertex_colors, dtype=np.float32)[:, :3] / 255.0
        rgb_c = vc[faces]
    elif kind == "face":
        fc = np.asarray(visual.face_colors, dtype=np.float32)[:, :3] / 255.0
        rgb_c = np.repeat(fc[:, None], 3, 1)
    return uv_c, rgb_c, texture


def load_textured_mesh(path: str | Path) -> TexturedMesh:
    """Read a mesh file (any trimesh format) into a :class:`TexturedMesh` (module docstring).

    The file's coordinates are kept (no normalisation, no axis change). Raises
    :class:`DataError` naming the file when it cannot be read or holds no triangles.
    """
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "mesh file not found")
    textures = _obj_textures(path) if path.suffix.lower() == ".obj" else {}
    try:
        scene = trimesh.load(str(path), force="scene", process=False)
        meshes = [g for g in scene.dump() if isinstance(g, trimesh.Trimesh)]
    except Exception as e:  # noqa: BLE001 - trimesh raises many types for garbled files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(path, f"cannot read mesh ({type(e).__name__}: {msg[:200]}); expected an OBJ/GLB/glTF/PLY/OFF mesh") from None
    meshes = [m for m in meshes if len(m.faces) and len(m.vertices)]
    if textures:
        try:
            _fill_textures(meshes, textures)
        except Exception as e:  # noqa: BLE001 - an unreadable image
            raise DataError(path, f"cannot read its texture ({type(e).__name__}: {str(e)[:200]})") from None
    if not meshes:
        raise DataError(path, "no triangles in this mesh file; expected at least one face")
    verts, faces, uvs, rgbs, normals, parts = [], [], [], [], [], []
    nv = nf = 0
    for m in meshes:
        v = np.asarray(m.vertices, dtype=np.float64)
        f = np.asarray(m.faces, dtype=np.int64)
        if not np.isfinite(v).all():
            raise DataError(path, "mesh vertices contain NaN or inf values")
        try:
            uv_c, rgb_c, tex = _part_attributes(m)
        except Exception as e:  # noqa: BLE001 - a broken texture image or material
            raise DataError(path, f"cannot read its material or texture ({type(e).__name__}: {str(e)[:200]})") from None
        verts.append(v)
        faces.append(f + nv)
        uvs.append(uv_c)
        rgbs.append(rgb_c)
        normals.append(np.asarray(m.vertex_normals, dtype=np.float64))
        parts.append(MeshPart(nf, nf + len(f), tex))
        nv += len(v)
        nf += len(f)
    n = torch.from_numpy(np.concatenate(normals)).float()
    return TexturedMesh(
        verts=torch.from_numpy(np.concatenate(verts)).float(),
        faces=torch.from_numpy(np.concatenate(faces)),
        corner_uv=torch.from_numpy(np.concatenate(uvs)).float(),
        corner_rgb=torch.from_numpy(np.concatenate(rgbs)).float().clamp(0, 1),
        vertex_normals=torch.nn.functional.normalize(n, dim=-1),
        parts=parts,
    )


def _obj_textures(path: Path) -> dict[str, Path]:
    """``{material name: texture file}`` of an OBJ's material libraries (``map_Kd``), each found on
    disk, else a :class:`DataError` (trimesh would silently drop a missing texture and the object
    would render in its flat ``Kd`` colour).

    A texture is looked up next to its ``.mtl``, then (Google Scanned Objects: ``meshes/model.mtl``
    names ``texture.png``, which lives in ``materials/textures/``) in ``../materials/textures/``.
    """
    libs = []
    with open(path, "rb") as f:
        for raw in f:
            if raw.startswith(b"mtllib"):
                libs += raw[6:].decode("utf-8", "replace").split()
    found: dict[str, Path] = {}
    for name in libs:
        mtl = path.parent / name
        if not mtl.is_file():
            raise DataError(path, f"material library {name} not found next to it; expected {mtl}")
        material = ""
        for line in mtl.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split()
            if parts and parts[0] == "newmtl":
                material = " ".join(parts[1:])
            elif parts and parts[0].lower() == "map_kd" and len(parts) > 1:
                named = parts[-1].replace("\\", "/")  # the last token: options (-s, -o ...) come first
                tries = [mtl.parent / named, mtl.parent / Path(named).name,
                         mtl.parent.parent / "materials" / "textures" / Path(named).name]
                tex = next((t for t in tries if t.is_file()), None)
                if tex is None:
                    raise DataError(path, f"texture {named} named by {name} not found; expected {tries[0]} "
                                          f"(or {tries[2]}, the Google Scanned Objects layout)")
                found[material] = tex
    return found


def _fill_textures(meshes: list, textures: dict[str, Path]) -> None:
    """Give each textured part whose image trimesh did not find (it looks only next to the
    ``.mtl``) the file :func:`_obj_textures` found, by material name (or the only one)."""
    from PIL import Image

    for m in meshes:
        visual = m.visual
        material = getattr(visual, "material", None)
        if getattr(visual, "kind", None) != "texture" or material is None or getattr(material, "image", None) is not None:
            continue
        name = getattr(material, "name", None)
        tex = textures.get(name) if name in textures else (next(iter(textures.values())) if len(textures) == 1 else None)
        if tex is not None:
            with Image.open(tex) as im:
                material.image = im.convert("RGB")


def find_meshes(root: str | Path) -> list[tuple[str, Path]]:
    """``[(object id, mesh file)]`` under ``root`` (recursive), sorted by id.

    An id is the shortest prefix of the file's relative path (suffix dropped, parts joined with
    ``__``) that no other file shares: GSO's ``<name>/meshes/model.obj`` gives ``<name>``,
    OmniObject3D's ``<class>/<class>_001/Scan/Scan.obj`` gives ``<class>__<class>_001``, a flat
    folder of ``a.obj, b.glb`` gives ``a, b``. Hidden files and folders are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "mesh folder not found")
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in MESH_SUFFIXES and not any(s.startswith(".") for s in p.relative_to(root).parts)
    )
    if not files:
        raise DataError(root, f"no mesh files ({', '.join(MESH_SUFFIXES)}) in this folder")
    parts = [tuple(p.relative_to(root).with_suffix("").parts) for p in files]
    prefixes: dict[tuple, int] = {}
    for x in parts:
        for k in range(1, len(x) + 1):
            prefixes[x[:k]] = prefixes.get(x[:k], 0) + 1
    same = {x: parts.count(x) for x in set(parts)} if len(set(parts)) < len(parts) else {}
    ids = []
    for p, x in zip(files, parts):
        k = next((k for k in range(1, len(x) + 1) if prefixes[x[:k]] == 1), None)
        if k is None and same.get(x, 1) > 1:  # the same path with two suffixes (a.obj, a.glb): keep the suffix
            ids.append("__".join(p.relative_to(root).parts).replace(".", "_"))
        else:  # its own shortest unique prefix (or its whole path, when that is a prefix of another's)
            ids.append("__".join(x[:k] if k is not None else x))
    return sorted(zip(ids, files))
