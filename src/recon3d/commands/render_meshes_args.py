"""Arguments of ``recon3d data render-meshes`` (:mod:`recon3d.commands.render_meshes`), apart from
the renderer so that ``recon3d data --help`` imports neither torch nor Lightning."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments"]


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _range(text: str) -> tuple[float, float]:
    v = _floats(text)
    if len(v) != 2 or v[0] > v[1]:
        raise argparse.ArgumentTypeError(f"expected LO,HI with LO <= HI, got {text!r}")
    return v[0], v[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mesh_dir", help="folder of meshes (recursive: .obj + .mtl + textures, .glb, .gltf, .ply, .off)")
    p.add_argument("--out", required=True, help="output folder, one Blender-layout folder per object; the same folder resumes")
    p.add_argument("--resolution", type=int, default=512, help="square image size (default 512)")
    p.add_argument("--fov", type=float, default=40.0, help="vertical field of view in degrees (default 40)")
    p.add_argument("--radius", type=float, default=None,
                   help="camera distance to the origin (default: the [-1, 1]^3 cube's bounding sphere just fits the view)")
    p.add_argument("--normalize", choices=("bbox", "sphere"), default="bbox",
                   help="bbox (default, the protocol's): box centre to the origin, longest half-side 1; "
                        "sphere: centroid to the origin, farthest vertex at radius 1")
    p.add_argument("--mesh-up", choices=("auto", "y", "z"), default="auto",
                   help="the meshes' up axis; output worlds are +Z up (Blender). auto: y for .glb/.gltf (the glTF spec), z otherwise")
    p.add_argument("--orbit-views", type=int, default=40, help="orbit views per orbit elevation (default 40; 0: none)")
    p.add_argument("--orbit-elevations", type=_floats, default=[20.0], help="orbit elevations in degrees, comma-separated (default 20)")
    p.add_argument("--input-azimuths", type=_floats, default=[0.0, 90.0, 180.0, 270.0],
                   help="input-view azimuths in degrees, comma-separated (default 0,90,180,270; '' for none)")
    p.add_argument("--input-elevation", type=float, default=0.0, help="input-view elevation in degrees (default 0)")
    p.add_argument("--random-views", type=int, default=0, help="random views per object (default 0)")
    p.add_argument("--random-elevations", type=_range, default=(-10.0, 60.0), help="random-view elevation range LO,HI (default -10,60)")
    p.add_argument("--random-radius", type=_range, default=None, help="random-view distance range LO,HI (default: --radius)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random views (per object: seed + object id)")
    p.add_argument("--supersample", type=int, default=3,
                   help="rasterize at this factor and box-filter (anti-aliased edges; default 3: odd, so alpha >= 0.5 is the pixel-centre silhouette)")
    p.add_argument("--view-batch", type=int, default=8, help="views rasterized at once (default 8)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "nvdiffrast"), help="mesh rasterizer backend (default auto)")
    p.add_argument("--device", default=None, help="torch device (default cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--rank", type=int, default=None, help="this process's rank (default RANK, LOCAL_RANK or SLURM_PROCID, else 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of processes (default WORLD_SIZE or SLURM_NTASKS, else 1)")
    p.add_argument("--overwrite", action="store_true", help="re-render objects already rendered (also with other settings)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
