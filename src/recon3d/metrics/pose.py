"""Camera pose metrics: relative rotation error (RRE), translation error (TE), Acc@k.

Cameras are ``c2w`` ``(V, 4, 4)`` in the package convention (OpenCV). The metrics are invariant
to the (arbitrary) world frame and, for TE, to the global scale:

- **RRE** (degrees), per ordered view pair ``i < j``: the geodesic angle between the predicted and
  true relative rotations ``R_j^T R_i``, i.e. ``arccos((tr(Rp^T Rg) - 1) / 2)``.
- **TE**, per view ``k >= 1``: camera centres are expressed in the first camera's frame, each set
  divided by its mean centre norm (scale normalisation), and TE is the Euclidean distance between
  the predicted and true normalised centres (unitless; 0 for identical rigs up to similarity).
- **Acc@k**: fraction of view pairs whose RRE is below ``k`` degrees (strictly; 15 and 30 by default).

This is ReconViaGen's Table 4 protocol ("relative translations between views, normalised" for the
scale ambiguity). With two views TE is the chord ``2 sin(phi / 2)`` of the angle ``phi`` between
the predicted and true translation directions. Feed-forward predictors such as VGGT give cameras
in frame 0's camera frame at a scene-normalised scale: both are factored out here (first-camera
frame, mean-norm scale), so their cameras are scored as predicted, without an alignment step; RRE
and TE do not change under a similarity (rotation, translation, scale) of either camera set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from recon3d.utils.checks import check_shape

__all__ = ["rotation_angle", "relative_rotation_errors", "translation_errors", "PoseError"]


def rotation_angle(r: Tensor) -> Tensor:
    """Angle in degrees of rotation matrices ``(*B, 3, 3) -> (*B,)``."""
    cos = ((r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos))


def relative_rotation_errors(pred_c2w: Tensor, gt_c2w: Tensor) -> Tensor:
    """RRE in degrees for every view pair ``i < j``: ``(V, 4, 4), (V, 4, 4) -> (V (V - 1) / 2,)``."""
    dims: dict = {}
    check_shape(pred_c2w, "V 4 4", "pred_c2w", dims)
    check_shape(gt_c2w, "V 4 4", "gt_c2w", dims)
    rp, rg = pred_c2w[:, :3, :3].double(), gt_c2w[:, :3, :3].double()
    i, j = torch.triu_indices(rp.shape[0], rp.shape[0], offset=1, device=rp.device)
    rel_p = rp[j].transpose(-1, -2) @ rp[i]
    rel_g = rg[j].transpose(-1, -2) @ rg[i]
    return rotation_angle(rel_p.transpose(-1, -2) @ rel_g)


def _normalised_centres(c2w: Tensor) -> Tensor:
    first = torch.linalg.inv(c2w[0])
    rel = first @ c2w  # cameras in the first camera's frame
    centres = rel[1:, :3, 3]
    scale = centres.norm(dim=-1).mean().clamp_min(1e-12)
    return centres / scale


def translation_errors(pred_c2w: Tensor, gt_c2w: Tensor) -> Tensor:
    """TE per view ``k >= 1`` after scale normalisation: ``(V, 4, 4), (V, 4, 4) -> (V - 1,)``."""
    dims: dict = {}
    check_shape(pred_c2w, "V 4 4", "pred_c2w", dims)
    check_shape(gt_c2w, "V 4 4", "gt_c2w", dims)
    return (_normalised_centres(pred_c2w.double()) - _normalised_centres(gt_c2w.double())).norm(dim=-1)


class PoseError(Metric):
    """Mean RRE (degrees), mean TE and Acc@k over all view pairs / views of all objects.

    ``update(pred_c2w, gt_c2w)`` with ``(B, V, 4, 4)`` or ``(V, 4, 4)`` camera-to-world matrices.
    ``compute() -> {"rre", "te", "acc@15", "acc@30"}`` (keys follow ``thresholds``).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, thresholds: Sequence[float] = (15.0, 30.0), **kwargs) -> None:
        super().__init__(**kwargs)
        self.thresholds = tuple(float(t) for t in thresholds)
        for name in ("sum_rre", "n_pairs", "sum_te", "n_views"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hits", default=torch.zeros(len(self.thresholds), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred_c2w: Tensor, gt_c2w: Tensor) -> None:
        dims: dict = {}
        check_shape(pred_c2w, "*B V 4 4", "pred_c2w", dims)
        check_shape(gt_c2w, "*B V 4 4", "gt_c2w", dims)
        for p, g in zip(pred_c2w.reshape(-1, *pred_c2w.shape[-3:]), gt_c2w.reshape(-1, *gt_c2w.shape[-3:])):
            rre = relative_rotation_errors(p, g).to(self.device)
            te = translation_errors(p, g).to(self.device)
            self.sum_rre += rre.sum()
            self.n_pairs += rre.numel()
            self.sum_te += te.sum()
            self.n_views += te.numel()
            self.hits += torch.stack([(rre < t).double().sum() for t in self.thresholds])

    def compute(self) -> dict[str, Tensor]:
        out = {"rre": (self.sum_rre / self.n_pairs).float(), "te": (self.sum_te / self.n_views).float()}
        for t, h in zip(self.thresholds, self.hits):
            out[f"acc@{t:g}"] = (h / self.n_pairs).float()
        return out
