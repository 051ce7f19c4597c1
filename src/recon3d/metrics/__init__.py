"""Metrics and the shared evaluation protocol.

- Image (:mod:`.image`, :mod:`.lpips`): :class:`PSNR`, :class:`SSIM`, :class:`LPIPS` Metric classes,
  :class:`LPIPSLoss` for training; images ``(*B, 3, H, W)`` in ``[0, 1]``, optional masks.
- Geometry (:mod:`.geometry`): :class:`ChamferDistance`, :class:`FScore`,
  :class:`NormalConsistency`, :class:`VolumeIoU`, surface sampling, winding-number occupancy (fast on grids) and
  the paper presets :data:`PRESETS` (``gtr``, ``ssr``/``m3d``, ``mvboost``, ``reconviagen``).
- Alignment (:mod:`.alignment`): unit-cube normalisation, ICP (rigid / similarity), rotation search.
- Pose (:mod:`.pose`): :class:`PoseError` (RRE, TE, Acc@15/30).
- :class:`EvaluationProtocol` (:mod:`.protocol`): what every method's validation/test loop feeds.

All Metric states reduce across processes through torchmetrics (``dist_reduce_fx``).
"""

from recon3d.metrics.alignment import align_points, icp, normalize_to_cube, principal_frame, rotation_grid, umeyama
from recon3d.metrics.geometry import (
    PRESETS,
    ChamferDistance,
    FScore,
    GeometryProtocol,
    NormalConsistency,
    VolumeIoU,
    chamfer_fscore,
    get_preset,
    grid_points,
    mesh_occupancy,
    mesh_occupancy_grid,
    nearest_neighbors,
    normal_consistency,
    occupancy_iou,
    sample_surface,
    winding_number,
    winding_number_grid,
)
from recon3d.metrics.image import PSNR, SSIM, psnr, ssim
from recon3d.metrics.lpips import (
    LPIPS,
    AlexNetFeatures,
    LPIPSLoss,
    LPIPSNet,
    LPIPSWeightsNotFoundError,
    VGG16Features,
    find_lpips_weights,
)
from recon3d.metrics.pose import PoseError, relative_rotation_errors, translation_errors
from recon3d.metrics.protocol import METRIC_NAMES, EvaluationProtocol, PerObjectTable

__all__ = [
    "EvaluationProtocol", "PerObjectTable", "METRIC_NAMES",
    "PSNR", "SSIM", "LPIPS", "LPIPSLoss", "LPIPSNet", "AlexNetFeatures", "VGG16Features",
    "LPIPSWeightsNotFoundError", "find_lpips_weights", "psnr", "ssim",
    "ChamferDistance", "FScore", "NormalConsistency", "VolumeIoU", "GeometryProtocol", "PRESETS",
    "get_preset", "chamfer_fscore", "nearest_neighbors", "normal_consistency", "sample_surface",
    "winding_number", "winding_number_grid", "mesh_occupancy", "mesh_occupancy_grid", "grid_points", "occupancy_iou",
    "align_points", "icp", "normalize_to_cube", "rotation_grid", "principal_frame", "umeyama",
    "PoseError", "relative_rotation_errors", "translation_errors",
]  # fmt: skip
