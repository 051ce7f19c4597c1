"""A bed-sized box in SSR's 3D-FRONT layout with closed-form renders, and M3D's stage-2 losses on it.

The SDF grid is the box's exact SDF sampled where SSR's generator puts voxel ``j`` (cube
``-1 + j * 2 / (R - 1)``); the image, amodal mask and z-depth come from float64 numpy ray/box slabs
built from the annotation's OpenGL pose and K (nothing from recon3d). Used by
``tests/data/test_front3d_grid_mapping.py`` and ``scripts/front3d_grid_mapping.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from recon3d.data.formats.front3d import MASK_PADDING
from tests.data.test_front3d import _gz

R = 64
SPACING = 2.0 / (R - 1)  # SSR's generator: the grid spans the cube end to end
PADDING = 0.1
HALF = 1.0 - PADDING / 2  # SSR: none_equal_scale = (2 - padding) / extents -> the box is [-0.95, 0.95]^3 in the cube
IMGID = "test/rgb/000123_rgb_004567.jpeg"
JID = "bed-box-jid"
COLOUR = np.array([0.7, 0.4, 0.2])
BACKGROUND = np.array([0.3, 0.5, 0.6])


def _rot(axis: int, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def ssr_box(half: float = HALF, r: int = R) -> tuple[float, float]:
    """Cube-frame bounds of the box ``[-half, half]^3`` as SSR's lookup shows it: ``q -> -1 + (q + 1) R / (R - 1)``."""
    k = r / (r - 1)
    return -1 + (1 - half) * k, -1 + (1 + half) * k


def box_sdf(q: np.ndarray, lo, hi) -> np.ndarray:
    """Exact signed distance ``(N,)`` to the axis-aligned box ``[lo, hi]`` (scalars or ``(3,)``) of points ``(N, 3)``."""
    c, h = (np.asarray(hi) + np.asarray(lo)) / 2, (np.asarray(hi) - np.asarray(lo)) / 2
    d = np.abs(q - c) - h
    return np.linalg.norm(np.maximum(d, 0), axis=-1) + np.minimum(d.max(-1), 0)


def render_box(cfg: dict, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form z-depth ``(H, W)`` (inf where the ray misses) and hit mask of the cube-frame box
    ``[lo, hi]`` through the annotation's camera (pixel centres ``u + 0.5``), float64.

    The world -> cube map is affine, so a camera ray stays a ray there with the same parameter;
    the camera-frame direction has unit z, so that parameter is the z-depth."""
    H, W, K = cfg["H"], cfg["W"], np.asarray(cfg["K"])
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    d_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    c2w_cv = np.asarray(cfg["pose_rot"]) @ np.diag([1.0, -1.0, -1.0])  # OpenGL -> OpenCV camera axes
    d_w = d_cam @ c2w_cv.T
    o_w = np.asarray(cfg["pose_tran"])
    rot, tran, scale = np.asarray(cfg["obj_rot"]), np.asarray(cfg["obj_tran"]), np.asarray(cfg["obj_scale"])
    nes, cen = np.asarray(cfg["nes"]), np.asarray(cfg["centroid"])
    q0 = (((o_w - tran) @ rot) / scale - cen) * nes
    qd = ((d_w @ rot) / scale) * nes
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (np.asarray(lo) - q0) / qd, (np.asarray(hi) - q0) / qd
    t_near = np.minimum(t1, t2).max(-1)
    t_far = np.maximum(t1, t2).min(-1)
    hit = (t_near <= t_far) & (t_far > 0)
    return np.where(hit, t_near, np.inf), hit


def write_front3d_box(root: Path, H: int = 60, W: int = 80, focal: float = 73.0) -> dict:
    """One bed (a box 1.9 x 0.56 x 2.1 model units) seen from eye height, in SSR's layout.

    Defaults are 3D-FRONT's camera (484 x 648, f = 584) at 1/8 scale. Returns the closed-form
    parameters (``render_box``'s ``cfg``) plus the true depth and mask."""
    half_ext = np.array([0.95, 0.28, 1.05])  # model units
    cfg = {
        "H": H, "W": W, "K": [[focal, 0, W / 2], [0, focal, H / 2], [0, 0, 1]],
        "pose_rot": _rot(0, -12.0), "pose_tran": np.array([0.1, 0.0, 0.2]),
        "obj_rot": _rot(1, 35.0), "obj_tran": np.array([0.3, -1.0, -3.6]), "obj_scale": np.array([1.05, 0.95, 1.0]),
        "centroid": np.array([0.02, 0.28, -0.01]), "nes": (2 - PADDING) / (2 * half_ext),
    }  # fmt: skip
    depth, hit = render_box(cfg, -HALF, HALF)
    assert hit.any() and not (hit[0].any() or hit[-1].any() or hit[:, 0].any() or hit[:, -1].any()), "box must sit inside the image"
    rgb = np.where(hit[..., None], COLOUR, BACKGROUND)
    (root / "test/rgb").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(root / IMGID, quality=100)
    anno = {
        "camera_pose_rot": cfg["pose_rot"].tolist(), "camera_pose_tran": cfg["pose_tran"].tolist(),
        "camera_intrinsics": cfg["K"],
        "obj_dict": {"5": {"model_file_name": [JID], "obj_id": [9], "obj_rot": cfg["obj_rot"].tolist(),
                           "obj_tran": cfg["obj_tran"].tolist(), "obj_scale": cfg["obj_scale"].tolist()}},
    }  # fmt: skip
    (root / "test/annotation").mkdir(parents=True, exist_ok=True)
    (root / "test/annotation/000123_annotation_004567.json").write_text(json.dumps(anno))
    mask = np.zeros((H + 2 * MASK_PADDING, W + 2 * MASK_PADDING), dtype=np.uint16)
    mask[MASK_PADDING : MASK_PADDING + H, MASK_PADDING : MASK_PADDING + W][hit] = 9
    _gz(root / "test/mask/000123_mask_004567.npy.gz", mask)
    _gz(root / "test/depth/000123_depth_004567.npy.gz", np.where(hit, depth, 1e10).astype(np.float32))
    j = -1 + np.arange(R) * SPACING
    grid = np.stack(np.meshgrid(j, j, j, indexing="ij"), -1).reshape(-1, 3)
    _gz(root / f"gt-sdf/bed/{JID}/voxels.npy.gz", box_sdf(grid, -HALF, HALF).reshape(R, R, R).astype(np.float32))
    meta = {"spacing": SPACING, "padding": PADDING, "centroid": cfg["centroid"].tolist(), "none_equal_scale": cfg["nes"].tolist()}
    (root / f"gt-sdf/bed/{JID}/spacing_centroid.json").write_text(json.dumps(meta))
    (root / "split.json").write_text(json.dumps([[IMGID, "5", "bed"]]))
    return {**cfg, "depth": depth, "hit": hit}


def load_grid(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixture's stored ``voxels (R, R, R)`` and ``spacing ()``, read back from the files."""
    import gzip
    import io

    folder = root / f"gt-sdf/bed/{JID}"
    voxels = np.load(io.BytesIO(gzip.decompress((folder / "voxels.npy.gz").read_bytes())))
    spacing = json.loads((folder / "spacing_centroid.json").read_text())["spacing"]
    return torch.from_numpy(voxels), torch.tensor(float(spacing))


def build_m3d(root: Path, mapping: str, num_rays: int = 1024, n_samples: int = 64, n_importance: int = 32,
              eval_max_side: int | None = 162, workdir: Path | None = None):
    """``configs/m3d_cpu.yaml``'s M3D module (stage 2 on) and one training batch of the fixture read
    with ``grid_mapping=mapping``; the depth stream reads the rendered depth (no Depth Anything here)."""
    import tempfile
    import warnings

    from recon3d.cli import run_lightning_cli

    repo = Path(__file__).resolve().parents[2]
    cfg = {
        "model": {"init_args": {"num_classes": 9, "depth_source": "ground_truth", "num_surface_rays": 0, "stage": "full",
                                "num_render_rays": num_rays, "n_samples": n_samples, "n_importance": n_importance,
                                "num_sdf_samples": 4096, "eval_max_side": eval_max_side}},
        "data": {"dataset": {"class_path": "recon3d.data.formats.front3d.Front3DDataset",
                             "init_args": {"root": str(root), "split": "split.json", "num_sdf_points": 4096,
                                           "require_depth": False, "grid_mapping": mapping}},
                 "num_val_objects": 0, "num_test_objects": 0, "batch_size": 1},
        "trainer": {"logger": False},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "front3d_box.yaml"
        path.write_text(json.dumps(cfg))
        cli = run_lightning_cli(["-c", str(repo / "configs/m3d_cpu.yaml"), "-c", str(path)], run=False)
        batch = next(iter(cli.datamodule.train_dataloader()))
    return cli.model, batch


def install_oracle(model, root: Path, mapping: str) -> None:
    """Replace the M3D network's decoder by the ground-truth grid read with ``mapping`` (SDF in cube
    units, the box's colour): what a perfect fit of that mapping's stage-1 targets converges to."""
    voxels, spacing = load_grid(root)
    from recon3d.data.formats.front3d import sample_sdf_grid

    colour = torch.tensor(COLOUR, dtype=torch.float32)

    def decode(enc, cameras, points, points_canonical=None, view_dirs=None):
        q = points if points_canonical is None else points_canonical
        sdf = sample_sdf_grid(voxels, q.reshape(-1, 3).float(), spacing, mapping).reshape(q.shape[:-1])
        return {"sdf": sdf.to(q.dtype), "rgb": colour.to(q).expand(*q.shape[:-1], 3)}

    model.net.decode = decode


def m3d_stage2_losses(root: Path, mapping: str, betas=(0.1, 0.01, 0.001), num_rays: int = 1024, draws: int = 4,
                      eval_max_side: int | None = 162, **kw) -> dict[float, dict[str, float]]:
    """M3D's training terms (``M3DModule.training_losses``: L3D, Lrgb, Ld) with the grid oracle of
    ``mapping`` against that mapping's SDF targets and the sample's image/depth, per VolSDF ``beta``
    (mean over ``draws`` random ray sets), plus the rendered view's silhouette IoU against the
    amodal mask (opacity > 0.5) and the median rendered-minus-true depth on the object's pixels."""
    model, batch = build_m3d(root, mapping, num_rays=num_rays, eval_max_side=eval_max_side, **kw)
    install_oracle(model, root, mapping)
    out: dict[float, dict[str, float]] = {}
    for beta in betas:
        with torch.no_grad():
            model.density.raw_beta.fill_(float(beta) - model.density.beta_min)
        torch.manual_seed(0)
        terms = [model.training_losses(batch) for _ in range(draws)]
        row = {k: sum(float(t[k].detach()) for t in terms) / draws for k in ("sdf", "rgb", "depth")}
        row["stage2"] = model.loss_weights["rgb"] * row["rgb"] + model.loss_weights["depth"] * row["depth"]
        view = model.render_views(batch, batch.targets.cameras)
        mask = batch.targets.masks[0, 0, 0] > 0.5
        hit = view["alpha"][0, 0, 0] > 0.5
        row["iou"] = float((mask & hit).sum() / (mask | hit).sum())
        both = mask & hit & (batch.targets.depths[0, 0, 0] > 0)
        row["depth_offset"] = float((view["depth"][0, 0, 0] - batch.targets.depths[0, 0, 0])[both].median())
        out[float(beta)] = row
    return out
