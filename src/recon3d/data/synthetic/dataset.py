"""``SyntheticDataset``: the embedded default dataset, generated from a seed and cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from recon3d.data.base import ObjectDataset, RawViews
from recon3d.data.batch import Geometry
from recon3d.data.cameras import Cameras, orbit_cameras
from recon3d.data.synthetic.raycast import render_sdf_views
from recon3d.data.synthetic.shapes import FAMILIES, SyntheticObject, sample_object
from recon3d.data.synthetic.textures import TEXTURE_KINDS, TEXTURE_PALETTES
from recon3d.errors import ConfigError, DataError
from recon3d.geometry import grid_points, marching_cubes_fast
from recon3d.utils.io import atomic_path

__all__ = ["SyntheticDataset", "default_cache_dir"]

_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$RECON3D_CACHE`` or ``~/.cache/recon3d``, plus ``/synthetic``."""
    return Path(os.environ.get("RECON3D_CACHE", Path.home() / ".cache" / "recon3d")) / "synthetic"


_DEFAULT_TEXTURE = {"kinds": TEXTURE_KINDS, "palette": "complementary", "frequency": (2.0, 6.0)}


class SyntheticDataset(ObjectDataset):
    """Procedural objects (CSG of sphere/box/torus/capsule/cylinder, solid textures) on orbits.

    Object ``i`` is drawn from ``seed`` and ``i`` alone, so any subset regenerates identically,
    and the same arguments give byte-identical arrays. Each object carries ``views_per_object``
    renders (RGBA, z-depth, world normals) on a random orbit, ``num_surface_points`` exact
    surface points with normals, ``num_sdf_points`` SDF samples (half uniform in the cube, half
    near the surface), and a marching-cubes mesh of its SDF for mesh-based metrics and export.

    Args:
        num_objects: number of objects.
        views_per_object: renders per object.
        resolution: square image size in pixels.
        seed: dataset seed.
        fov_deg: vertical field of view of every camera.
        radius_range: camera distance to the origin, uniform in ``[lo, hi]``.
        elevation_range: camera elevation in degrees, uniform in ``[lo, hi]``.
        families: primitive families to draw from (subset of ``sphere box torus capsule cylinder``).
        max_parts: at most this many primitives per object (1 = single primitives only).
        up_axis: world up axis of the orbits, ``"z"`` or ``"y"``.
        num_surface_points: surface samples with normals per object (0 to skip).
        num_sdf_points: SDF samples per object (0 to skip).
        mesh_resolution: marching-cubes grid for the ground-truth mesh (0 to skip).
        camera_layout: ``"random"`` (default): each object's orbit starts at a random azimuth, with
            random elevations and distances in the ranges; ``"fixed"``: every object has the same
            cameras -- azimuths ``i * 360 / V`` from 0, elevations cycling through the low, middle
            and high end of ``elevation_range``, distance the middle of ``radius_range``. With
            ``"fixed"`` the evenly spaced input views of ``view_sampling: fixed_inputs`` have the
            same poses for every object, as when the inputs come from a multi-view generator with
            fixed output poses (Zero123++, Era3D: GTR's text/image-to-3D use); the objects keep
            their random orientation, so nothing about the shapes is made easier.
        fixed_elevations: with ``camera_layout: fixed``, the elevations (degrees) instead of the
            low/middle/high cycle: view ``i`` gets ``fixed_elevations[i % len]`` (e.g. Zero123++'s
            poses alternate 20 and -10 degrees). The default cycle puts the evenly spaced inputs of
            16 views (0, 4, 8, 12) at -10, 17.5, 45, -10 degrees, so inputs 1 and 3 look at the
            object from almost opposite sides (171 degrees apart) and their silhouettes carve
            nearly the same visual hull.
        texture_kinds: the solid-texture patterns to draw from (subset of ``stripes checker
            gradient noise``).
        texture_palette: ``"complementary"`` (default: the second colour near ``1 - a``, maximal
            contrast, mean colour near grey) or ``"independent"`` (both colours drawn alike).
        texture_frequency: range of the pattern frequency (default ``[2, 6]``; stripes have period
            ``2 / f`` world units). The texture options never change an object's shape.
        cache_dir: where generated objects are cached (default ``$RECON3D_CACHE`` or
            ``~/.cache/recon3d/synthetic``); a sub-folder per argument set.
        memory_cache_objects: keep up to this many decoded objects in memory (least recently used
            dropped first; 0 = read the ``.npz`` every time). Decoding the compressed cache costs
            ~8 ms per object, which at CPU scale is a third of a training step; one object at the
            defaults' 64² x 16 views is ~1 MB. Each dataloader worker / DDP rank holds its own.
    """

    name = "synthetic"

    def __init__(
        self,
        num_objects: int = 100,
        views_per_object: int = 32,
        resolution: int = 128,
        seed: int = 0,
        fov_deg: float = 40.0,
        radius_range: tuple[float, float] = (2.6, 3.2),
        elevation_range: tuple[float, float] = (-10.0, 45.0),
        families: tuple[str, ...] = FAMILIES,
        max_parts: int = 3,
        up_axis: str = "z",
        num_surface_points: int = 4096,
        num_sdf_points: int = 4096,
        mesh_resolution: int = 64,
        camera_layout: str = "random",
        fixed_elevations: tuple[float, ...] | None = None,
        texture_kinds: tuple[str, ...] = TEXTURE_KINDS,
        texture_palette: str = "complementary",
        texture_frequency: tuple[float, float] = (2.0, 6.0),
        cache_dir: str | None = None,
        memory_cache_objects: int = 256,
    ):
        if num_objects < 1 or views_per_object < 1 or resolution < 8:
            raise ConfigError(
                f"SyntheticDataset: expected num_objects>=1, views_per_object>=1, resolution>=8; got "
                f"{num_objects}, {views_per_object}, {resolution}"
            )
        if radius_range[0] <= 1.5 or radius_range[1] < radius_range[0]:
            raise ConfigError(f"radius_range: expected 1.5 < lo <= hi (cameras outside the object), got {tuple(radius_range)}")
        if camera_layout not in ("random", "fixed"):
            raise ConfigError(f"camera_layout: expected 'random' or 'fixed', got {camera_layout!r}")
        if memory_cache_objects < 0:
            raise ConfigError(f"memory_cache_objects: expected >= 0, got {memory_cache_objects}")
        if fixed_elevations is not None:
            if camera_layout != "fixed":
                raise ConfigError(f"fixed_elevations: only used with camera_layout 'fixed', got camera_layout {camera_layout!r}")
            if len(fixed_elevations) == 0 or not all(-90.0 < float(e) < 90.0 for e in fixed_elevations):
                raise ConfigError(f"fixed_elevations: expected a non-empty list of degrees in (-90, 90), got {list(fixed_elevations)}")
        self.camera_layout = camera_layout
        self.fixed_elevations = None if fixed_elevations is None else tuple(float(e) for e in fixed_elevations)
        self.memory_cache_objects = int(memory_cache_objects)
        self._memory: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.num_objects = int(num_objects)
        self.views_per_object = int(views_per_object)
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.fov_deg = float(fov_deg)
        self.radius_range = tuple(float(x) for x in radius_range)
        self.elevation_range = tuple(float(x) for x in elevation_range)
        self.families = tuple(families)
        self.max_parts = int(max_parts)
        self.up_axis = up_axis
        self.num_surface_points = int(num_surface_points)
        self.num_sdf_points = int(num_sdf_points)
        self.mesh_resolution = int(mesh_resolution)
        bad = [k for k in texture_kinds if k not in TEXTURE_KINDS]
        if bad or not texture_kinds:
            raise ConfigError(f"texture_kinds: expected a non-empty subset of {list(TEXTURE_KINDS)}, got {list(texture_kinds)}")
        if texture_palette not in TEXTURE_PALETTES:
            raise ConfigError(f"texture_palette: expected one of {list(TEXTURE_PALETTES)}, got {texture_palette!r}")
        if not (0 < float(texture_frequency[0]) <= float(texture_frequency[1])):
            raise ConfigError(f"texture_frequency: expected 0 < lo <= hi, got {tuple(texture_frequency)}")
        self.texture = {"kinds": tuple(texture_kinds), "palette": texture_palette,
                        "frequency": (float(texture_frequency[0]), float(texture_frequency[1]))}
        sample_object(0, self.families, self.max_parts)  # validates families early
        key = json.dumps(
            [_FORMAT_VERSION, self.views_per_object, self.resolution, self.seed, self.fov_deg, self.radius_range,
             self.elevation_range, self.families, self.max_parts, self.up_axis, self.num_surface_points,
             self.num_sdf_points, self.mesh_resolution] + ([self.camera_layout] if self.camera_layout != "random" else [])
            + ([list(self.fixed_elevations)] if self.fixed_elevations is not None else [])
            # only a non-default texture setting enters the key (caches made before the option stay valid)
            + ([[list(self.texture["kinds"]), texture_palette, list(self.texture["frequency"])]] if self.texture != _DEFAULT_TEXTURE else []),
        )
        self.cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
        self.cache_dir = self.cache_root / hashlib.sha1(key.encode()).hexdigest()[:12]

    # ------------------------------------------------------------------ ObjectDataset API
    def object_ids(self) -> list[str]:
        return [f"synth_{self.seed}_{i:05d}" for i in range(self.num_objects)]

    def num_views(self, index: int) -> int:
        return self.views_per_object

    def load_views(self, index: int, views: list[int]) -> RawViews:
        data = self._load(index)
        v = np.asarray(views, dtype=np.int64)
        if v.size and (v.min() < 0 or v.max() >= self.views_per_object):
            raise DataError(self._path(index), f"view indices {views} out of range 0..{self.views_per_object - 1}")
        res = self.resolution
        cams = Cameras(torch.from_numpy(data["c2w"][v]), torch.from_numpy(data["K"][v]), res, res)
        to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
        return RawViews(
            rgb=to_t(data["rgb"][v]).permute(0, 3, 1, 2).float() / 255.0,
            cameras=cams,
            alpha=to_t(data["alpha"][v])[:, None].float() / 255.0,
            depths=to_t(data["depth"][v])[:, None].float(),
            normals=to_t(data["normals"][v]).permute(0, 3, 1, 2).float(),
        )

    def load_geometry(self, index: int) -> Geometry:
        data = self._load(index)
        opt = lambda k: torch.from_numpy(np.array(data[k])) if k in data and data[k].size else None
        mesh = self._mesh_path(index)
        return Geometry(
            surface_points=opt("surface_points"),
            surface_normals=opt("surface_normals"),
            sdf_points=opt("sdf_points"),
            sdf_values=opt("sdf_values"),
            mesh_paths=[str(mesh)] if mesh.exists() else None,
        )

    # ------------------------------------------------------------------ generation and cache
    def object(self, index: int) -> SyntheticObject:
        """The analytic object ``index`` (exact SDF and texture)."""
        return sample_object(self._object_seed(index), self.families, self.max_parts, self.object_ids()[index], texture=self.texture)

    def cameras(self, index: int) -> Cameras:
        """The ``views_per_object`` orbit cameras of object ``index``."""
        V = self.views_per_object
        lo, hi = self.elevation_range
        rlo, rhi = self.radius_range
        if self.camera_layout == "fixed":
            az = torch.arange(V) / V * 360.0
            cycle = self.fixed_elevations or (lo, 0.5 * (lo + hi), hi)
            el = torch.tensor(cycle, dtype=torch.float32)[torch.arange(V) % len(cycle)]
            return orbit_cameras(az, el, torch.full((V,), 0.5 * (rlo + rhi)), self.fov_deg, self.resolution, self.resolution, self.up_axis)
        g = torch.Generator().manual_seed(self._object_seed(index) + 1)
        az = (torch.arange(V) / V * 360.0 + torch.rand((), generator=g) * 360.0) % 360.0
        el = lo + (hi - lo) * torch.rand(V, generator=g)
        rad = rlo + (rhi - rlo) * torch.rand(V, generator=g)
        return orbit_cameras(az, el, rad, self.fov_deg, self.resolution, self.resolution, self.up_axis)

    def generate(self, index: int) -> dict[str, np.ndarray]:
        """Render and sample object ``index`` (no cache). Deterministic."""
        if not 0 <= index < self.num_objects:
            raise DataError(self.cache_dir, f"object index {index} out of range 0..{self.num_objects - 1}")
        obj = self.object(index)
        cams = self.cameras(index)
        r = render_sdf_views(obj, cams)
        out = {
            "c2w": cams.c2w.numpy().astype(np.float32),
            "K": cams.K.numpy().astype(np.float32),
            "rgb": (r.rgb.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy(),
            "alpha": (r.alpha[:, 0] * 255).round().to(torch.uint8).numpy(),
            "depth": r.depth[:, 0].numpy().astype(np.float32),
            "normals": r.normals.permute(0, 2, 3, 1).numpy().astype(np.float16),
        }
        rng = np.random.default_rng(self._object_seed(index) + 2)
        verts, faces = self._marching_cubes(obj, max(self.mesh_resolution, 48))
        if self.num_surface_points:
            pts, nrm = self._surface_samples(obj, verts, faces, self.num_surface_points, rng)
            out["surface_points"], out["surface_normals"] = pts, nrm
        if self.num_sdf_points:
            n_uni = self.num_sdf_points // 2
            uni = rng.uniform(-1, 1, size=(n_uni, 3)).astype(np.float32)
            near_base, _ = self._surface_samples(obj, verts, faces, self.num_sdf_points - n_uni, rng)
            near = near_base + rng.normal(0, 0.02, size=near_base.shape).astype(np.float32)
            pts = np.concatenate([uni, near]).astype(np.float32)
            out["sdf_points"] = pts
            out["sdf_values"] = obj.sdf(torch.from_numpy(pts)).numpy().astype(np.float32)
        out["_mesh_vertices"], out["_mesh_faces"] = verts, faces
        return out

    def prepare(self, indices: list[int] | None = None, progress: bool = False) -> None:
        """Generate and cache the given objects (all by default) that are not cached yet."""
        todo = [i for i in (range(self.num_objects) if indices is None else indices) if not self._path(i).exists()]
        for n, i in enumerate(todo):
            self._write(i, self.generate(i))
            if progress and (n + 1) % 10 == 0:
                print(f"synthetic: {n + 1}/{len(todo)} objects generated in {self.cache_dir}", flush=True)

    def _object_seed(self, index: int) -> int:
        return self.seed * 1_000_003 + index * 7919

    def _path(self, index: int) -> Path:
        return self.cache_dir / f"{index:05d}.npz"

    def _mesh_path(self, index: int) -> Path:
        return self.cache_dir / f"{index:05d}_mesh.ply"

    def _write(self, index: int, data: dict[str, np.ndarray]) -> None:
        import trimesh

        verts, faces = data.pop("_mesh_vertices"), data.pop("_mesh_faces")
        if self.mesh_resolution:
            with atomic_path(self._mesh_path(index)) as tmp:
                trimesh.Trimesh(verts, faces, process=False).export(tmp, file_type="ply")
        with atomic_path(self._path(index)) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **data)

    def _load(self, index: int) -> dict[str, np.ndarray]:
        if index in self._memory:
            self._memory.move_to_end(index)
            return self._memory[index]
        data = self._read(index)
        if self.memory_cache_objects:
            for a in data.values():
                a.setflags(write=False)  # shared between calls: a caller's in-place edit must fail, not leak
            self._memory[index] = data
            while len(self._memory) > self.memory_cache_objects:
                self._memory.popitem(last=False)
        return data

    def _read(self, index: int) -> dict[str, np.ndarray]:
        path = self._path(index)
        for attempt in range(2):
            if not path.exists():
                self._write(index, self.generate(index))
            try:
                with np.load(path) as z:
                    return {k: z[k] for k in z.files}
            except Exception as e:  # a corrupt cache entry is regenerated once, never trusted
                if attempt:
                    raise DataError(path, f"cannot read the regenerated cache file ({type(e).__name__}: {e})") from None
                path.unlink(missing_ok=True)
        raise AssertionError("unreachable")

    @staticmethod
    def _marching_cubes(obj: SyntheticObject, res: int) -> tuple[np.ndarray, np.ndarray]:
        """The mesh of ``obj``'s SDF on a ``res^3`` grid over ``[-1, 1]^3``: ``verts (V, 3)`` float32, ``faces (F, 3)`` int64."""
        sdf = obj.sdf(grid_points(res).reshape(-1, 3)).reshape(res, res, res)
        verts, faces = marching_cubes_fast(sdf)
        return verts.numpy(), faces.numpy()

    @staticmethod
    def _surface_samples(obj, verts, faces, n, rng) -> tuple[np.ndarray, np.ndarray]:
        """Area-weighted samples on the MC mesh, projected onto the exact zero set by Newton steps."""
        tri = verts[faces]
        area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
        fi = rng.choice(len(faces), size=n, p=area / area.sum())
        u, v = rng.random((2, n))
        flip = u + v > 1
        u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
        p = tri[fi, 0] + u[:, None] * (tri[fi, 1] - tri[fi, 0]) + v[:, None] * (tri[fi, 2] - tri[fi, 0])
        pt = torch.from_numpy(p.astype(np.float32))
        for _ in range(4):
            pt = pt - obj.sdf(pt)[:, None] * obj.normal(pt)
        return pt.numpy().astype(np.float32), obj.normal(pt).numpy().astype(np.float32)
