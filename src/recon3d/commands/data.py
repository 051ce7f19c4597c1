"""``recon3d data``: dataset preparation commands.

``recon3d data depth``
    Cache Depth Anything depth priors (M3D's depth stream) with
    :func:`recon3d.models.depth_prior.compute_depth_cache`, from a **local** model directory
    (``save_pretrained`` layout; nothing is downloaded). Sources: a 3D-FRONT root in SSR's layout
    (``--front3d-root`` + ``--split``), an image folder (``--image-dir``) or image files. Existing
    entries are kept (an interrupted run resumes) unless ``--overwrite``::

        recon3d data depth --model-dir models/depth-anything-v2-base --out data/3dfront/depth_anything \\
            --front3d-root data/3dfront --split split/train.json --split split/test.json
        recon3d data depth --model-dir models/depth-anything-v2-base --out cache/ --image-dir photos/

``recon3d data synthetic``
    Pre-generate the synthetic set (renders, depth, normals, SDF samples, meshes) into a cache
    folder that ``SyntheticDataset(cache_dir=...)`` then reads; reports the time taken::

        recon3d data synthetic --num-objects 100 --views 16 --resolution 64 --out data/synthetic

``recon3d data convert``
    Write a synthetic set to one of the public layouts (``recon3d.data.formats`` writers)::

        recon3d data convert --format blender|openlrm|instantmesh|gtr_views --num-objects 8 --out data/blender

``recon3d data pseudo-gt``
    MVBoost's pseudo-ground-truth builder (:mod:`recon3d.commands.pseudo_gt`): image folder →
    generated views → reconstruction → renders → SDEdit-refined views, as resumable shards that
    :class:`~recon3d.data.pseudo_gt.PseudoGTDataset` reads::

        recon3d data pseudo-gt --images photos/ --strength 0.95 --out data/pseudo_gt \
            --generator configs/mv_diffusion_cpu.yaml --reconstructor configs/lgm_cpu.yaml

``recon3d data render-meshes``
    An evaluation set from a folder of textured meshes (GSO, OmniObject3D: OBJ + MTL + textures,
    GLB), normalised into [-1, 1]^3 as the protocol does and rendered through the renderer layer
    into Blender-layout folders (RGBA, depth, normals, cameras; input / orbit / random view sets)
    that ``BlenderDataset`` reads; resumable and rank-split (:mod:`recon3d.commands.render_meshes`)::

        recon3d data render-meshes data/gso_meshes --out data/gso_eval --orbit-views 40 --orbit-elevations 20

Exit status 0 on success; bad input raises :class:`recon3d.errors.Recon3DError`, which ``recon3d``
prints as one ``recon3d: error:`` line (exit status 2).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from recon3d.commands import OneLineParser
from recon3d.errors import ConfigError, DataError

__all__ = ["main", "build_parser", "IMAGE_SUFFIXES", "FORMATS"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FORMATS = ("blender", "openlrm", "instantmesh", "gtr_views")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="recon3d data", description="Dataset preparation: depth priors, synthetic set, format conversion, MVBoost pseudo-ground truth.")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("depth", help="cache Depth Anything depth priors (M3D's depth stream)",
                       description="Run a local Depth Anything model on every image and cache float32 (H, W) .npy depth maps.")
    d.add_argument("--model-dir", required=True, help="local Depth Anything directory (transformers save_pretrained layout)")
    d.add_argument("--out", required=True, help="cache directory (Front3DDataset's depth_dir)")
    d.add_argument("--front3d-root", help="3D-FRONT root in SSR's layout; with --split")
    d.add_argument("--split", action="append", default=[], help="SSR split JSON (repeatable), relative to --front3d-root or absolute")
    d.add_argument("--image-dir", help="a folder of images (recursive; cache keys are paths relative to it, without suffix)")
    d.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    d.add_argument("--batch-size", type=int, default=4)
    d.add_argument("--overwrite", action="store_true", help="recompute existing cache entries")
    d.add_argument("images", nargs="*", help="image files (cache keys = file stems)")

    s = sub.add_parser("synthetic", help="pre-generate the synthetic dataset into a cache folder")
    _synthetic_args(s)
    s.add_argument("--out", required=True, help="cache folder (SyntheticDataset's cache_dir)")

    c = sub.add_parser("convert", help="write a synthetic set in a public multi-view layout")
    c.add_argument("--format", required=True, choices=FORMATS)
    c.add_argument("--out", required=True, help="output folder (one sub-folder per object)")
    _synthetic_args(c)
    c.add_argument("--cache-dir", default=None, help="synthetic cache to read/generate (default: $RECON3D_CACHE)")

    from recon3d.commands.pseudo_gt_args import add_arguments

    g = sub.add_parser("pseudo-gt", help="build MVBoost's pseudo-ground-truth set (generated + refined views) from an image folder",
                       description="MVBoost Algorithm 1 over an image folder, written as resumable shards with a manifest.")
    add_arguments(g)

    from recon3d.commands.render_meshes_args import add_arguments as add_render_meshes_arguments

    r = sub.add_parser("render-meshes", help="render a folder of textured meshes (OBJ+MTL, GLB) into an evaluation set",
                       description="Normalise each mesh into [-1, 1]^3 and render RGBA, depth, normals and cameras of the "
                                   "input / orbit / random view sets in the Blender layout (resumable, rank-split).")
    add_render_meshes_arguments(r)
    return ap


def _synthetic_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-objects", type=int, default=100)
    p.add_argument("--views", type=int, default=16, help="views per object")
    p.add_argument("--resolution", type=int, default=64, help="square image size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fov", type=float, default=None, help="vertical field of view in degrees (default 40; instantmesh: 50)")
    p.add_argument("--num-surface-points", type=int, default=4096)
    p.add_argument("--num-sdf-points", type=int, default=4096)
    p.add_argument("--mesh-resolution", type=int, default=64)


def _synthetic(a: argparse.Namespace, cache_dir: str | None, fov: float = 40.0):
    from recon3d.data.synthetic import SyntheticDataset

    return SyntheticDataset(
        num_objects=a.num_objects, views_per_object=a.views, resolution=a.resolution, seed=a.seed,
        fov_deg=a.fov if a.fov is not None else fov, num_surface_points=a.num_surface_points,
        num_sdf_points=a.num_sdf_points, mesh_resolution=a.mesh_resolution, cache_dir=cache_dir,
    )


def _depth(a: argparse.Namespace) -> int:
    import torch

    from recon3d.models.depth_prior import compute_depth_cache

    sources = sum(bool(x) for x in (a.front3d_root, a.image_dir, a.images))
    if sources != 1:
        raise ConfigError("recon3d data depth: give exactly one source: --front3d-root with --split, --image-dir, or image files")
    if a.front3d_root:
        if not a.split:
            raise ConfigError("recon3d data depth: --front3d-root needs at least one --split JSON")
        from recon3d.data.formats.front3d import Front3DDataset

        source = Front3DDataset(a.front3d_root, a.split, depth_dir=a.out, require_depth=False)
    elif a.image_dir:
        root = Path(a.image_dir)
        if not root.is_dir():
            raise DataError(root, "image folder not found")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(root, f"no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        source = _Listed([(p, str(p.relative_to(root).with_suffix(""))) for p in files])
    else:
        source = [Path(p) for p in a.images]
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    paths = compute_depth_cache(source, a.model_dir, a.out, device=device, batch_size=a.batch_size, overwrite=a.overwrite)
    print(f"recon3d data depth: {len(paths)} depth maps in {a.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


class _Listed:
    """``depth_cache_items()`` over explicit ``(image path, key)`` pairs."""

    def __init__(self, items: list[tuple[Path, str]]):
        self.items = items

    def depth_cache_items(self) -> list[tuple[Path, str]]:
        return self.items


def _synthetic_cmd(a: argparse.Namespace) -> int:
    ds = _synthetic(a, a.out)
    t0 = time.perf_counter()
    before = sum(1 for i in range(len(ds)) if ds._path(i).exists())
    ds.prepare(progress=True)
    dt = time.perf_counter() - t0
    made = len(ds) - before
    print(f"recon3d data synthetic: {len(ds)} objects x {a.views} views at {a.resolution}px in {ds.cache_dir} "
          f"({made} generated, {before} already cached) in {dt:.1f} s"
          + (f" ({dt / made:.2f} s/object)" if made else ""))
    return 0


def _convert(a: argparse.Namespace) -> int:
    from recon3d.data import formats

    ds = _synthetic(a, a.cache_dir, fov=50.0 if a.format == "instantmesh" else 40.0)
    writer = getattr(formats, f"write_{a.format}")
    out = Path(a.out)
    t0 = time.perf_counter()
    ids = ds.object_ids()
    for i in range(len(ds)):
        raw = ds.load_views(i, list(range(ds.num_views(i))))
        if a.format == "instantmesh":
            writer(out, ids[i], raw.rgb, raw.alpha, raw.cameras, normals=raw.normals, depths=raw.depths, fov_deg=ds.fov_deg)
        else:
            writer(out, ids[i], raw.rgb, raw.alpha, raw.cameras)
    print(f"recon3d data convert: {len(ds)} objects written as {a.format} to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``recon3d data <depth|synthetic|convert|pseudo-gt|render-meshes> ...``; returns the exit status."""
    a = build_parser().parse_args(None if argv is None else list(argv))
    if a.command == "depth":
        return _depth(a)
    if a.command == "synthetic":
        return _synthetic_cmd(a)
    if a.command == "pseudo-gt":
        from recon3d.commands.pseudo_gt import run

        return run(a)
    if a.command == "render-meshes":
        from recon3d.commands.render_meshes import run as render_meshes

        return render_meshes(a)
    return _convert(a)


if __name__ == "__main__":
    raise SystemExit(main())
