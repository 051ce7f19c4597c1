"""VGGT's camera encoding (``absT_quaR_FoV``) ↔ recon3d :class:`~recon3d.data.cameras.Cameras`.

VGGT encodes each frame's camera as 9 numbers ``[t (3), q (4, xyzw, w ≥ 0), fov_h, fov_w]`` where
``[R(q) | t]`` is the **OpenCV world-to-camera** matrix and the FoVs (radians) define pixel focal
lengths ``fy = (H/2) / tan(fov_h/2)``, ``fx = (W/2) / tan(fov_w/2)`` with the principal point at
the image centre ``(W/2, H/2)`` — recon3d's convention as well (pixel ``(u, v)`` has its centre at
``u + 0.5``, so ``W/2`` is the geometric centre). recon3d's ``c2w`` is the inverse of ``[R | t]``.

The world of a prediction is frame 0's camera (its encoding is ≈ identity, t ≈ 0) and its scale is
VGGT's scene normalisation (training divides by the mean distance of all frames' valid points to
frame 0's camera centre, :func:`recon3d.models.vggt.loss.vggt_targets`), so predicted cameras
match ground truth only up to a similarity. The pose metrics (:mod:`recon3d.metrics.pose`: RRE,
TE after scale normalisation, Acc@θ, ReconViaGen's protocol) are invariant to it and score the
cameras as predicted; :class:`recon3d.methods.vggt.VGGTModule` maps its outputs into a dataset's
world by camera 0 and the camera-centre scale for the view and geometry metrics.
:func:`relative_to_first` re-expresses ground truth in frame 0's camera frame for training targets.
"""

from __future__ import annotations

import torch

from recon3d.data.cameras import Cameras
from recon3d.errors import ShapeError

__all__ = ["quat_to_matrix", "matrix_to_quat", "pose_encoding_to_cameras", "cameras_to_pose_encoding", "relative_to_first"]


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` of quaternions ``(..., 4)`` in xyzw order (normalised here)."""
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    x, y, z, w = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, -1).reshape(*q.shape[:-1], 3, 3)


def matrix_to_quat(R: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(..., 4)`` xyzw with ``w ≥ 0`` of rotation matrices ``(..., 3, 3)``.

    Each of the four algebraically equivalent formulas (divide by 4w, 4x, 4y or 4z) is formed and
    the one with the largest divisor is kept per matrix, so no branch divides by a small number.
    """
    m = R.reshape(*R.shape[:-2], 9).unbind(-1)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m
    four_sq = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    s = four_sq.clamp_min(0).sqrt()  # 2|w|, 2|x|, 2|y|, 2|z|
    # candidates as (x, y, z, w), each scaled by its own 2·component
    cand = torch.stack([
        torch.stack([m21 - m12, m02 - m20, m10 - m01, four_sq[..., 0]], -1),
        torch.stack([four_sq[..., 1], m10 + m01, m02 + m20, m21 - m12], -1),
        torch.stack([m10 + m01, four_sq[..., 2], m12 + m21, m02 - m20], -1),
        torch.stack([m02 + m20, m12 + m21, four_sq[..., 3], m10 - m01], -1),
    ], -2) / (2 * s.clamp_min(0.1))[..., None]
    best = s.argmax(-1)
    q = torch.gather(cand, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., 3:] < 0, -q, q)


def pose_encoding_to_cameras(enc: torch.Tensor, height: int, width: int) -> Cameras:
    """``enc [..., 9]`` → :class:`Cameras` with batch shape ``enc.shape[:-1]`` (c2w OpenCV, K in pixels)."""
    if not isinstance(enc, torch.Tensor) or enc.ndim < 1 or enc.shape[-1] != 9:
        raise ShapeError(f"enc: expected a [..., 9] VGGT pose encoding, got {tuple(getattr(enc, 'shape', ()))}")
    fov = enc[..., 7:9]
    if fov.numel() and not bool(((fov > 0) & (fov < torch.pi)).all()):
        bad = int((~((fov > 0) & (fov < torch.pi))).sum())
        raise ShapeError(f"enc: fov_h and fov_w (entries 7, 8) must lie in (0, pi) radians, {bad} do not "
                         f"(an untrained or diverged camera head predicts FoV 0 after its ReLU)")
    R = quat_to_matrix(enc[..., 3:7])
    w2c = torch.zeros(*enc.shape[:-1], 4, 4, dtype=enc.dtype, device=enc.device)
    w2c[..., :3, :3], w2c[..., :3, 3], w2c[..., 3, 3] = R, enc[..., :3], 1
    K = torch.zeros(*enc.shape[:-1], 3, 3, dtype=enc.dtype, device=enc.device)
    K[..., 0, 0] = (width / 2) / torch.tan(enc[..., 8] / 2)
    K[..., 1, 1] = (height / 2) / torch.tan(enc[..., 7] / 2)
    K[..., 0, 2], K[..., 1, 2], K[..., 2, 2] = width / 2, height / 2, 1
    return Cameras.from_w2c(w2c, K, width, height)


def cameras_to_pose_encoding(cams: Cameras) -> torch.Tensor:
    """:class:`Cameras` (perspective) → ``[*B, 9]`` VGGT encodings of the same cameras.

    The principal point is not encoded (VGGT assumes the centre); off-centre cameras lose it.
    """
    if cams.projection != "perspective":
        raise ShapeError(f"cams: VGGT encodes perspective cameras only, got {cams.projection!r}")
    w2c = cams.w2c
    fov_h = 2 * torch.atan((cams.height / 2) / cams.K[..., 1, 1])
    fov_w = 2 * torch.atan((cams.width / 2) / cams.K[..., 0, 0])
    return torch.cat([w2c[..., :3, 3], matrix_to_quat(w2c[..., :3, :3]), fov_h[..., None], fov_w[..., None]], -1)


def relative_to_first(cams: Cameras) -> Cameras:
    """Cameras ``[B, S]`` re-expressed in frame 0's camera frame (frame 0 becomes the identity)."""
    if len(cams.batch_shape) != 2:
        raise ShapeError(f"cams: expected a [B, S] batch of cameras, got batch shape {tuple(cams.batch_shape)}")
    c2w = cams.w2c[:, :1] @ cams.c2w
    return Cameras(c2w, cams.K, cams.width, cams.height, cams.projection)
