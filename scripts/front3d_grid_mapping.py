"""3D-FRONT ``grid_mapping``: where SSR's and the exact voxel mapping put a bed, and M3D's stage-2 losses.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/front3d_grid_mapping.py [--small] [--rays N] [--draws K]

The sample is ``tests/data/front3d_box.py``'s bed-sized box in SSR's layout at 3D-FRONT's camera
(484 x 648, f = 584; ``--small``: 1/8 of it). Printed:

1. closed form: silhouette IoU and median z-offset of the grid's surface against the true mask and
   depth under each mapping (``exact`` is the true box; ``ssr`` the box stretched by ``R / (R - 1)``);
2. M3D's training terms (``M3DModule.training_losses``, ``configs/m3d_cpu.yaml``) with the decoder
   replaced by the ground-truth grid under the same mapping as the SDF targets: the stage-2 floor
   that a perfect fit of stage 1 leaves, per VolSDF beta (0.1 is the initial value; it shrinks with
   training), and the rendered view's IoU / median depth offset.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    import logging
    import warnings

    import numpy as np
    from tests.data.front3d_box import m3d_stage2_losses, render_box, ssr_box, write_front3d_box

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="1/8 of 3D-FRONT's image size (fast)")
    ap.add_argument("--rays", type=int, default=1024, help="rays per draw (M3D's num_render_rays; paper config 1024)")
    ap.add_argument("--draws", type=int, default=8, help="random ray sets averaged per figure")
    ap.add_argument("--eval-side", type=int, default=324, help="longest side of the evaluation render (IoU, depth offset)")
    ap.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.01, 0.001])
    a = ap.parse_args(argv)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    size = dict(H=60, W=80, focal=73.0) if a.small else dict(H=484, W=648, focal=584.0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = write_front3d_box(root, **size)
        true_depth, true_mask = cfg["depth"], cfg["hit"]
        print(f"bed-sized box, {size['W']}x{size['H']}, f={size['focal']}, {int(true_mask.sum())} object pixels")
        print("\n1. grid surface vs the true mask/depth (closed form)")
        print(f"{'mapping':8s} {'IoU':>7s} {'median dz [cm]':>15s} {'max |dz| [cm]':>14s}")
        for mapping, (lo, hi) in (("exact", (-0.95, 0.95)), ("ssr", ssr_box())):
            z, hit = render_box(cfg, lo, hi)
            both = hit & true_mask
            dz = z[both] - true_depth[both]
            iou = (hit & true_mask).sum() / (hit | true_mask).sum()
            print(f"{mapping:8s} {iou:7.4f} {100 * np.median(dz):15.2f} {100 * np.abs(dz).max():14.2f}")
        print(f"\n2. M3D training terms with the grid oracle ({a.rays} rays x {a.draws} draws; Ld in m^2)")
        print(f"{'mapping':8s} {'beta':>6s} {'L3D':>8s} {'Lrgb':>8s} {'Ld':>10s} {'0.1Lrgb+0.1Ld':>14s} {'IoU':>7s} {'median dz [cm]':>15s}")
        for mapping in ("ssr", "exact"):
            rows = m3d_stage2_losses(root, mapping, betas=a.betas, num_rays=a.rays, draws=a.draws, eval_max_side=a.eval_side)
            for beta, r in rows.items():
                print(f"{mapping:8s} {beta:6.3g} {r['sdf']:8.2g} {r['rgb']:8.4f} {r['depth']:10.3e} {r['stage2']:14.3e} "
                      f"{r['iou']:7.4f} {100 * r['depth_offset']:15.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
