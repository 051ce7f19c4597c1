"""VGGT's multi-task training loss and its ground-truth targets, written for recon3d.

Behaviour read from facebookresearch/vggt ``training/loss.py`` (``MultitaskLoss``) and
``training/train_utils/normalization.py`` (``normalize_camera_extrinsics_and_points_batch``):

**Targets** (:func:`vggt_targets`). The ground truth is expressed as the network predicts it:
every camera and point relative to frame 0's camera (frame 0 becomes the identity), then divided
by one scale per object, the mean distance to frame 0's camera centre of the valid points of all
frames (``Σ‖p‖·m / (Σm + 1e-3)``, clamped to [1e-6, 1e6]). Translations, depths and points are
divided by it; the pose encoding of the normalised cameras is the camera target.

**Camera** (:func:`camera_loss`). For the ``n`` iterations ``i`` of the camera head, weight
``gamma^(n−1−i)`` (``gamma`` 0.6: the last iteration weighs 1), L1 between predicted and true
encodings, split into T (entries 0-2, each error clamped at 100), R (quaternion, 3-6) and FoV
(7-8); each is the weighted sum over iterations divided by ``n``; the camera term is
``w_T·T + w_R·R + w_FoV·FoV`` (1, 1, 0.5). Only objects whose frame 0 has more than
``min_valid_points`` valid pixels count (upstream's rule; none: a zero that keeps the graph).

**Dense** (:func:`regression_loss`), for depth ``[B, S, H, W, 1]`` and points ``[B, S, H, W, 3]``
with confidence ``c [B, S, H, W]`` over the valid pixels ``m``:

- ``reg = ‖pred − gt‖`` (Euclidean over channels) per valid pixel;
- ``conf = gamma·reg·c − alpha·log c`` (1 and 0.2);
- each filtered by ``valid_range`` (keep values below that quantile, after clamping at 100, when
  more than 1000 remain; skipped for ≤ 1000 values) and averaged;
- ``grad``: ``"grad"`` (depth) — the L1 of horizontal and vertical finite differences of the
  masked residual ``m·(pred − gt)``, on pixel pairs both valid, each clamped at 100, summed and
  divided by the number of valid (pixel, channel) entries; averaged over 4 scales (strides 1, 2,
  4, 8); ``"normal"`` (points) — ``1 − cos`` between the normals of the predicted and true point
  maps (4 cross products of neighbour differences per pixel, each where its 3 pixels are valid),
  averaged over 3 scales; 0 where fewer than 10 normals are valid.

The task term is ``conf + reg + grad`` (upstream adds the plain ``reg`` as well), times the task
weight (camera 5, depth 1, point 1 in upstream's configs). Upstream also zeroes NaN/inf values
and clamps some at ±100 (``check_and_fix_inf_nan``); recon3d's non-finite guard skips such steps
instead (:class:`~recon3d.methods.base.NonFiniteGuard`), so that is not done here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recon3d.data.cameras import Cameras
from recon3d.data.rays import pixel_grid
from recon3d.errors import ConfigError, ShapeError
from recon3d.models.vggt.cameras import cameras_to_pose_encoding

__all__ = ["vggt_targets", "camera_loss", "regression_loss", "gradient_loss", "normal_loss", "quantile_filter"]


def vggt_targets(cameras: Cameras, depths: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Ground truth in VGGT's frame and scale (module docstring).

    Args:
        cameras: ``[B, S]`` perspective cameras (OpenCV c2w, pixel K) of the views.
        depths: ``[B, S, 1, H, W]`` z-depth, 0 where empty (recon3d's ``Views.depths``).
        valid: optional ``[B, S, H, W]`` bool; default ``depths > 0`` (and finite).

    Returns ``pose_enc [B, S, 9]``, ``depth [B, S, H, W, 1]``, ``points [B, S, H, W, 3]`` (in
    frame 0's camera frame), ``valid [B, S, H, W]``, ``scale [B]`` (divided out) and ``cameras``
    (the normalised :class:`Cameras`, frame 0 the identity).
    """
    if len(cameras.batch_shape) != 2:
        raise ShapeError(f"cameras: expected a [B, S] batch of cameras, got batch shape {tuple(cameras.batch_shape)}")
    # float32 also under bf16 autocast: bf16 matmuls would break the rotations' orthonormality
    with torch.autocast(device_type=depths.device.type, enabled=False):
        return _targets(cameras, depths, valid)


def _targets(cameras: Cameras, depths: torch.Tensor, valid: torch.Tensor | None) -> dict[str, torch.Tensor]:
    B, S = cameras.batch_shape
    H, W = cameras.height, cameras.width
    if tuple(depths.shape) != (B, S, 1, H, W):
        raise ShapeError(f"depths: expected [B, S, 1, H, W] = {[B, S, 1, H, W]} to match the cameras, got {list(depths.shape)}")
    z = depths[:, :, 0].float()
    ok = (z > 0) & torch.isfinite(z)
    valid = ok if valid is None else (valid.bool() & ok)
    c2w = cameras.c2w.float()
    K = cameras.K.float()
    w2c0 = torch.linalg.inv(c2w[:, 0].double()).float()  # [B, 4, 4]
    rel_c2w = w2c0[:, None] @ c2w  # every camera in frame 0's camera frame
    pix = pixel_grid(W, H, device=z.device).reshape(1, 1, H * W, 2)
    zz = torch.where(valid, z, torch.zeros_like(z)).reshape(B, S, H * W)
    x = (pix[..., 0] - K[..., 0, 2, None]) / K[..., 0, 0, None] * zz
    y = (pix[..., 1] - K[..., 1, 2, None]) / K[..., 1, 1, None] * zz
    cam_pts = torch.stack([x, y, zz], -1)  # [B, S, HW, 3] in each camera's frame
    pts = cam_pts @ rel_c2w[..., :3, :3].transpose(-1, -2) + rel_c2w[..., None, :3, 3]
    m = valid.reshape(B, S, H * W).float()
    dist = pts.norm(dim=-1)
    scale = ((dist * m).sum((1, 2)) / (m.sum((1, 2)) + 1e-3)).clamp(1e-6, 1e6)
    rel_c2w = rel_c2w.clone()
    rel_c2w[..., :3, 3] = rel_c2w[..., :3, 3] / scale[:, None, None]
    norm_cams = Cameras(rel_c2w, K, W, H, cameras.projection)
    return {
        "pose_enc": cameras_to_pose_encoding(norm_cams),
        "depth": (zz / scale[:, None, None]).reshape(B, S, H, W, 1),
        "points": (pts / scale[:, None, None, None]).reshape(B, S, H, W, 3) * valid[..., None],
        "valid": valid,
        "scale": scale,
        "cameras": norm_cams,
    }


def camera_loss(pose_enc_list: list[torch.Tensor], gt: torch.Tensor, valid_objects: torch.Tensor | None = None, gamma: float = 0.6,
                weight_trans: float = 1.0, weight_rot: float = 1.0, weight_fov: float = 0.5) -> dict[str, torch.Tensor]:
    """Iteration-weighted L1 on the 9-d pose encoding (module docstring).

    Args:
        pose_enc_list: the camera head's ``n`` iterations, each ``[B, S, 9]``.
        gt: ``[B, S, 9]`` target encodings (:func:`vggt_targets`).
        valid_objects: ``[B]`` bool, the objects that count (default all).

    Returns ``{"camera", "T", "R", "FoV"}`` scalars (``camera`` = the weighted sum).
    """
    n = len(pose_enc_list)
    if n == 0:
        raise ShapeError("pose_enc_list: expected at least one camera-head iteration")
    keep = torch.ones(gt.shape[0], dtype=torch.bool, device=gt.device) if valid_objects is None else valid_objects.bool()
    total_t = total_r = total_f = 0.0
    for i, pred in enumerate(pose_enc_list):
        w = gamma ** (n - 1 - i)
        if not bool(keep.any()):
            zero = (pred * 0).mean()
            lt = lr = lf = zero
        else:
            p, g = pred[keep], gt[keep]
            lt = (p[..., :3] - g[..., :3]).abs().clamp(max=100).mean()
            lr = (p[..., 3:7] - g[..., 3:7]).abs().mean()
            lf = (p[..., 7:] - g[..., 7:]).abs().mean()
        total_t, total_r, total_f = total_t + w * lt, total_r + w * lr, total_f + w * lf
    t, r, f = total_t / n, total_r / n, total_f / n
    return {"camera": weight_trans * t + weight_rot * r + weight_fov * f, "T": t, "R": r, "FoV": f}


def quantile_filter(values: torch.Tensor, q: float | None, min_elements: int = 1000, hard_max: float = 100.0) -> torch.Tensor:
    """``values`` (1-D) below their ``q`` quantile (nearest rank), after clamping at ``hard_max``;
    unchanged when ``q`` is None / ≤ 0, when there are ≤ ``min_elements`` values, or when fewer
    than ``min_elements`` would remain."""
    if q is None or q <= 0 or values.numel() <= min_elements:
        return values
    values = values.clamp(max=hard_max)
    k = int(round(q * (values.numel() - 1))) + 1
    thresh = min(float(torch.kthvalue(values.detach().flatten(), k).values), hard_max)
    keep = values < thresh
    return values[keep] if int(keep.sum()) > min_elements else values


def gradient_loss(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Finite-difference L1 of the masked residual at one scale: ``pred, gt [N, H, W, C]``,
    ``mask [N, H, W]`` → scalar (0 without valid pixels)."""
    m = mask[..., None].expand_as(pred).to(pred.dtype)
    diff = (pred - gt) * m
    gx = ((diff[:, :, 1:] - diff[:, :, :-1]).abs() * (m[:, :, 1:] * m[:, :, :-1])).clamp(max=100)
    gy = ((diff[:, 1:] - diff[:, :-1]).abs() * (m[:, 1:] * m[:, :-1])).clamp(max=100)
    count = m.sum()
    if float(count) == 0:
        return (pred * 0).sum()
    return (gx.sum() + gy.sum()) / count


def _normals(points: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Four normals per pixel from neighbour differences: ``points [N, H, W, 3]``, ``mask [N, H, W]``
    → ``normals [4, N, H, W, 3]`` (unit), ``valid [4, N, H, W]``. Normal ``k`` is the cross
    product of the differences to two neighbours taken anticlockwise (up×left, left×down,
    down×right, right×up); it is valid where the pixel and both neighbours are."""
    p = F.pad(points.permute(0, 3, 1, 2), (1, 1, 1, 1)).permute(0, 2, 3, 1)
    mk = F.pad(mask.float(), (1, 1, 1, 1)) > 0
    c = p[:, 1:-1, 1:-1]
    nb = {"up": (slice(None, -2), slice(1, -1)), "left": (slice(1, -1), slice(None, -2)),
          "down": (slice(2, None), slice(1, -1)), "right": (slice(1, -1), slice(2, None))}
    d = {k: p[:, r, s] - c for k, (r, s) in nb.items()}
    mv = {k: mk[:, r, s] for k, (r, s) in nb.items()}
    centre = mk[:, 1:-1, 1:-1]
    pairs = (("up", "left"), ("left", "down"), ("down", "right"), ("right", "up"))
    normals = torch.stack([torch.linalg.cross(d[a], d[b], dim=-1) for a, b in pairs])
    valid = torch.stack([mv[a] & centre & mv[b] for a, b in pairs])
    return F.normalize(normals, dim=-1, eps=1e-8), valid


def normal_loss(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``1 − cos`` between predicted and true point-map normals at one scale: ``pred, gt
    [N, H, W, 3]``, ``mask [N, H, W]`` → scalar (0 with fewer than 10 valid normals)."""
    np_, vp = _normals(pred, mask)
    ng, vg = _normals(gt, mask)
    both = vp & vg
    if int(both.sum()) < 10:
        return (pred * 0).sum()
    dot = (np_[both] * ng[both]).sum(-1).clamp(-1 + eps, 1 - eps)
    return (1 - dot).mean()


def regression_loss(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, conf: torch.Tensor, gradient: str | None = "grad",
                    gamma: float = 1.0, alpha: float = 0.2, valid_range: float | None = 0.98) -> dict[str, torch.Tensor]:
    """Confidence-weighted regression with a gradient term (module docstring).

    Args:
        pred, gt: ``[B, S, H, W, C]``; mask: ``[B, S, H, W]`` bool; conf: ``[B, S, H, W]`` (> 0).
        gradient: ``"grad"``, ``"normal"`` (C = 3) or None.

    Returns ``{"conf", "reg", "grad"}`` scalars.
    """
    if pred.shape != gt.shape or pred.shape[:-1] != mask.shape or conf.shape != mask.shape:
        raise ShapeError(f"regression_loss: expected pred/gt [B, S, H, W, C] and mask/conf [B, S, H, W], got "
                         f"{list(pred.shape)}, {list(gt.shape)}, {list(mask.shape)}, {list(conf.shape)}")
    mask = mask.bool()
    reg = (gt[mask] - pred[mask]).norm(dim=-1)
    c = conf[mask]
    conf_term = gamma * reg * c - alpha * torch.log(c)
    zero = (pred * 0).mean()
    out = {
        "conf": quantile_filter(conf_term, valid_range).mean() if conf_term.numel() else zero,
        "reg": quantile_filter(reg, valid_range).mean() if reg.numel() else zero,
    }
    B, S, H, W, C = pred.shape
    p, g, m = pred.reshape(B * S, H, W, C), gt.reshape(B * S, H, W, C), mask.reshape(B * S, H, W)
    if gradient is None:
        out["grad"] = zero
    elif gradient == "grad":
        out["grad"] = sum(gradient_loss(p[:, ::2 ** s, ::2 ** s], g[:, ::2 ** s, ::2 ** s], m[:, ::2 ** s, ::2 ** s]) for s in range(4)) / 4
    elif gradient == "normal":
        out["grad"] = sum(normal_loss(p[:, ::2 ** s, ::2 ** s], g[:, ::2 ** s, ::2 ** s], m[:, ::2 ** s, ::2 ** s]) for s in range(3)) / 3
    else:
        raise ConfigError(f"gradient: expected 'grad', 'normal' or None, got {gradient!r}")
    return out
