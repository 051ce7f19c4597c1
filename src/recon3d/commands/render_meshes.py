"""``recon3d data render-meshes MESH_DIR --out DIR``: an evaluation set from a folder of meshes.

Every mesh file under ``MESH_DIR`` (:func:`recon3d.data.mesh_assets.find_meshes`: OBJ + MTL +
textures, GLB/glTF, PLY/OFF; GSO's ``<name>/meshes/model.obj`` is object ``<name>``) is

1. turned to a +Z-up world (``--mesh-up``; glTF files are +Y up by their spec) and normalised into
   ``[-1, 1]^3`` as the evaluation protocol does (:func:`recon3d.metrics.alignment.normalize_to_cube`,
   ``--normalize bbox``: bounding-box centre to the origin, longest half-side 1);
2. rendered through the renderer layer (:func:`recon3d.render.mesh.textured.render_textured_mesh`:
   unlit albedo from the textures, z-depth, world normals; ``--backend auto`` uses nvdiffrast on
   a GPU) into the protocol's view sets, each a Blender ``transforms_<set>.json`` that
   :class:`recon3d.data.formats.BlenderDataset` reads (``split: <set>``):

   - ``input``: ``--input-azimuths`` at ``--input-elevation`` (default 0/90/180/270 at 0 deg, the
     four input views of LGM / ReconViaGen);
   - ``orbit``: ``--orbit-views`` evenly spaced azimuths from 0 at each of ``--orbit-elevations``
     (default 40 views at 20 deg, ReconViaGen's 40 orbit views);
   - ``random``: ``--random-views`` with azimuth uniform, elevation uniform in
     ``--random-elevations``, distance uniform in ``--random-radius`` (seeded per object, so any
     rank and any rerun draws the same views);

   plus ``transforms.json`` listing every view (input, orbit, random in that order; the split any
   other name falls back to), ``mesh.ply`` (the normalised geometry, for geometry metrics) and
   ``render_meshes.json`` (source file, normalisation, settings, view-set index ranges).

Layout of one object::

    <out>/<id>/transforms_{input,orbit,random}.json, transforms.json
    <out>/<id>/<set>/r_<i>.png           RGBA, straight colour
    <out>/<id>/<set>/r_<i>_depth.png     16-bit z-depth x depth_scale (0 = empty)
    <out>/<id>/<set>/r_<i>_normal.png    world normals as (n + 1) / 2
    <out>/<id>/mesh.ply, render_meshes.json

Cost: on a CPU the torch reference rasterizer takes seconds per view for a scanned mesh (~80k
faces) at 512 px with ``--supersample 3`` (about 9 s on 2 busy cores); on a GPU ``--backend auto``
picks nvdiffrast. ``--supersample 1`` is about 2x cheaper on CPU (hard, aliased edges).

All cameras look at the origin from ``--radius`` (default: the distance at which the cube's
bounding sphere, radius sqrt(3), just fills the vertical field of view, so no object is cut off).

Resumable: an object is rendered into ``<out>/.<id>.partial`` and renamed to ``<out>/<id>`` when
complete, so a finished object (its ``render_meshes.json`` with the same settings) is skipped and
a killed one is redone; an object rendered with other settings stops the run with one line
(``--overwrite`` re-renders). Rank split: object ``k`` (sorted by id) belongs to rank
``k % world_size`` (``--rank/--world-size``, else ``RANK``/``LOCAL_RANK``/``SLURM_PROCID`` and
``WORLD_SIZE``/``SLURM_NTASKS``). A mesh that cannot be read is one ``skipped`` line naming the
file and counted; the run goes on (exit status 2 only when no mesh at all could be read).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from recon3d.data.cameras import Cameras, orbit_cameras
from recon3d.data.formats._common import write_json
from recon3d.data.formats.blender import DEPTH_PNG_MAX, write_blender
from recon3d.data.mesh_assets import TexturedMesh, find_meshes, load_textured_mesh
from recon3d.errors import ConfigError, DataError

__all__ = ["run", "view_set_cameras", "normalise_mesh", "render_settings", "resolve_world", "META_NAME", "VIEW_SETS"]

META_NAME = "render_meshes.json"
FORMAT_NAME, FORMAT_VERSION = "recon3d-render-meshes", 1
VIEW_SETS = ("input", "orbit", "random")
#: Half-diagonal of the [-1, 1]^3 cube: every normalised mesh lies inside this sphere.
CUBE_RADIUS = math.sqrt(3.0)
_Y_UP_TO_Z_UP = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # (x, y, z) -> (x, -z, y)


def resolve_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world)``: the arguments, else ``RANK``/``LOCAL_RANK``/``SLURM_PROCID`` and ``WORLD_SIZE``/``SLURM_NTASKS``, else 0/1."""
    env = os.environ
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or 1)
    if rank is None:
        rank = int(env.get("RANK") or env.get("LOCAL_RANK") or env.get("SLURM_PROCID") or 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"--rank/--world-size: expected 0 <= rank < world size, got rank {rank} of {world_size}")
    return int(rank), int(world_size)


def render_settings(a: argparse.Namespace) -> dict:
    """Everything that decides the rendered files (what a resumed run must match)."""
    if a.resolution < 1 or not 0 < a.fov < 180:
        raise ConfigError(f"--resolution / --fov: expected a positive size and 0 < fov < 180, got {a.resolution} / {a.fov}")
    if a.orbit_views < 0 or a.random_views < 0:
        raise ConfigError(f"--orbit-views / --random-views: expected >= 0, got {a.orbit_views} / {a.random_views}")
    radius = a.radius if a.radius is not None else CUBE_RADIUS / math.sin(math.radians(a.fov) / 2)
    if radius <= 0:
        raise ConfigError(f"--radius: expected a positive distance, got {radius}")
    rr = list(a.random_radius) if a.random_radius is not None else [radius, radius]
    if rr[0] <= 0:
        raise ConfigError(f"--random-radius: expected positive distances, got {rr}")
    return {
        "resolution": int(a.resolution), "fov_deg": float(a.fov), "radius": float(radius), "normalize": a.normalize,
        "mesh_up": a.mesh_up, "input_azimuths": [float(x) for x in a.input_azimuths], "input_elevation": float(a.input_elevation),
        "orbit_views": int(a.orbit_views), "orbit_elevations": [float(x) for x in a.orbit_elevations],
        "random_views": int(a.random_views), "random_elevations": [float(x) for x in a.random_elevations], "random_radius": rr,
        "seed": int(a.seed), "supersample": int(a.supersample), "shading": "albedo",
    }


def view_set_cameras(object_id: str, s: dict) -> dict[str, tuple[Cameras, dict]]:
    """``{set: (cameras (V,), {azimuth_deg, elevation_deg, radius} lists)}`` for the non-empty view sets."""
    R = s["resolution"]
    sets: dict[str, tuple[list, list, list]] = {}
    if s["input_azimuths"]:
        az = s["input_azimuths"]
        sets["input"] = (az, [s["input_elevation"]] * len(az), [s["radius"]] * len(az))
    if s["orbit_views"] and s["orbit_elevations"]:
        n = s["orbit_views"]
        az = [360.0 * i / n for i in range(n)] * len(s["orbit_elevations"])
        el = [e for e in s["orbit_elevations"] for _ in range(n)]
        sets["orbit"] = (az, el, [s["radius"]] * len(az))
    if s["random_views"]:
        seed = int.from_bytes(hashlib.sha256(f"{s['seed']}:{object_id}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
        g = torch.Generator().manual_seed(seed)
        n = s["random_views"]
        u = torch.rand(n, 3, generator=g, dtype=torch.float64)
        lo, hi = s["random_elevations"]
        rlo, rhi = s["random_radius"]
        sets["random"] = ((360.0 * u[:, 0]).tolist(), (lo + (hi - lo) * u[:, 1]).tolist(), (rlo + (rhi - rlo) * u[:, 2]).tolist())
    out = {}
    for name, (az, el, r) in sets.items():
        cams = orbit_cameras(torch.tensor(az), torch.tensor(el), torch.tensor(r), s["fov_deg"], R, R, up_axis="z")
        out[name] = (cams, {"azimuth_deg": [float(x) for x in az], "elevation_deg": [float(x) for x in el], "radius": [float(x) for x in r]})
    return out


def normalise_mesh(mesh: TexturedMesh, up: str, mode: str, source: object = "mesh") -> tuple[TexturedMesh, torch.Tensor]:
    """Rotate a ``up``-axis mesh to +Z up and normalise it (``mode``: ``bbox`` | ``sphere``) into
    ``[-1, 1]^3`` by the protocol's rule (:func:`recon3d.metrics.alignment.normalize_to_cube`,
    computed here on the vertices so the command does not import torchmetrics; a test holds the
    two equal): ``bbox``: box centre to the origin, longest half-side to 1; ``sphere``: vertex
    centroid to the origin, farthest vertex at radius 1.

    Returns ``(normalised mesh, (4, 4) similarity from file to output coordinates)``.
    """
    rot = _Y_UP_TO_Z_UP.double() if up == "y" else torch.eye(3, dtype=torch.float64)
    v = mesh.verts.double() @ rot.T
    if mode == "bbox":
        lo, hi = v.min(0).values, v.max(0).values
        center, half = (lo + hi) / 2, ((hi - lo) / 2).max()
    elif mode == "sphere":
        center = v.mean(0)
        half = (v - center).norm(dim=-1).max()
    else:
        raise ConfigError(f"--normalize: expected 'bbox' or 'sphere', got {mode!r}")
    scale = 1.0 / float(half) if float(half) > 1e-9 else math.inf
    if not math.isfinite(scale):
        raise DataError(source, "degenerate mesh: all vertices at one point; expected a surface with extent")
    m = torch.eye(4, dtype=torch.float64)
    m[:3, :3] = float(scale) * rot
    m[:3, 3] = -float(scale) * center
    return mesh.transformed(m), m


def _mesh_up(setting: str, path: Path) -> str:
    if setting != "auto":
        return setting
    return "y" if path.suffix.lower() in (".glb", ".gltf") else "z"


def _read_meta(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT_NAME else None


def render_object(object_id: str, path: Path, out: Path, s: dict, rasterizer, device: torch.device) -> dict:
    """Render one mesh file into ``out/object_id`` (module docstring); returns its metadata."""
    from recon3d.render.mesh.textured import render_textured_mesh

    t0 = time.perf_counter()
    up = _mesh_up(s["mesh_up"], path)
    mesh, transform = normalise_mesh(load_textured_mesh(path), up, s["normalize"], path)
    tmp_name = f".{object_id}.partial"
    tmp = out / tmp_name
    if tmp.exists():
        shutil.rmtree(tmp)  # a killed earlier attempt
    tmp.mkdir(parents=True)
    sets = view_set_cameras(object_id, s)
    far = max([s["radius"], *s["random_radius"]]) + CUBE_RADIUS
    depth_scale = far / DEPTH_PNG_MAX
    all_frames, ranges, top = [], {}, {}
    for name, (cams, info) in sets.items():
        r = render_textured_mesh(mesh, cams.to(device), rasterizer, supersample=s["supersample"])
        json_path = write_blender(out, tmp_name, r.rgb, r.alpha, cams, split=name, depths=r.depth, normals=r.normals,
                                  depth_scale=depth_scale, extra={"view_set": name, "views": info, "world_up": "+z"})
        data = json.loads(json_path.read_text(encoding="utf-8"))
        ranges[name] = [len(all_frames), len(all_frames) + len(data["frames"])]
        all_frames += data["frames"]
        top = {k: data[k] for k in ("camera_angle_x", "w", "h", "depth_scale")}
    write_json(tmp / "transforms.json", {**top, "frames": all_frames, "view_sets": ranges, "world_up": "+z"})
    _save_ply(tmp / "mesh.ply", mesh)
    meta = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "object_id": object_id, "source": str(path),
        "settings": s, "mesh_up": up, "file_to_output": transform.tolist(),
        "faces": mesh.num_faces, "view_sets": ranges, "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(tmp / META_NAME, meta)  # last: its presence marks the object complete
    final = out / object_id
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return meta


def _save_ply(path: Path, mesh: TexturedMesh) -> None:
    import trimesh

    from recon3d.utils.io import atomic_path

    with atomic_path(path) as p:
        trimesh.Trimesh(mesh.verts.numpy(), mesh.faces.numpy(), process=False).export(str(p))


def _default_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}")
    return torch.device("cpu")


def run(a: argparse.Namespace) -> int:
    """Render this rank's share of ``a.mesh_dir`` into ``a.out``; returns the exit status."""
    from recon3d.render.mesh import MeshRasterizer

    prog = "recon3d data render-meshes"
    s = render_settings(a)
    rank, world = resolve_world(a.rank, a.world_size)
    objects = find_meshes(a.mesh_dir)
    mine = objects[rank::world]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = _default_device(a.device)
    # auto on a CPU device is the torch reference anyway: name it, without resolve_backend's fallback warning
    backend = "torch" if a.backend == "auto" and device.type == "cpu" else a.backend
    rasterizer = MeshRasterizer(backend, device=device)
    bar = None
    if not a.no_progress and getattr(sys.stderr, "isatty", lambda: False)():
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc=f"render-meshes rank {rank}/{world}", unit="obj", leave=False)
    done = rendered = skipped = 0
    t0 = time.perf_counter()
    for k, (oid, path) in enumerate(mine):
        meta = _read_meta(out / oid)
        if meta is not None and not a.overwrite:
            if meta.get("settings") != s:
                diff = sorted(key for key in set(s) | set(meta.get("settings") or {}) if (meta.get("settings") or {}).get(key) != s.get(key))
                raise ConfigError(f"{out / oid}: already rendered with other settings ({', '.join(diff)}); "
                                  "use --overwrite to re-render or another --out")
            done += 1
        else:
            try:
                info = render_object(oid, path, out, s, rasterizer, device)
                rendered += 1
                if bar is None and not a.no_progress:
                    print(f"{prog}: [{k + 1}/{len(mine)}] {oid}: {info['view_sets']} in {info['seconds']:.1f} s", file=sys.stderr, flush=True)
            except DataError as e:
                reason = e.problem if e.path == str(path) else str(e)
                line = f"{prog}: skipped {path}: {reason}"
                if bar is not None:
                    bar.write(line, file=sys.stderr)  # above the bar, not through it
                else:
                    print(line, file=sys.stderr, flush=True)
                skipped += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    print(f"{prog}: rank {rank}/{world}: {len(mine)} objects: {rendered} rendered, {done} already done, {skipped} skipped "
          f"(unreadable) in {time.perf_counter() - t0:.1f} s -> {out}")
    if mine and skipped == len(mine):
        raise DataError(a.mesh_dir, f"none of the {len(mine)} meshes of this rank could be read (see the skipped lines)")
    return 0
