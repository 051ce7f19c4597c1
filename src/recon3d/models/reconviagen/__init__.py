"""ReconViaGen's generic inference-time parts: rendering-aware velocity compensation
(:mod:`.rvc`, its losses in :mod:`.losses`) and camera estimation / refinement (:mod:`.pose`).

They work with any flow model, decoder and renderer of recon3d; the ReconViaGen method wires
them to TRELLIS's SLAT flow and decoders.
"""

from recon3d.models.reconviagen.losses import TERMS, DreamSimDistance, RenderingLoss
from recon3d.models.reconviagen.pose import NearestRenderStart, OpenCVMatcher, PoseRefinement, PoseRefiner, rotation_angle_deg
from recon3d.models.reconviagen.rvc import MODES, RVCRefiner, VelocityCompensation

__all__ = ["RenderingLoss", "DreamSimDistance", "TERMS", "VelocityCompensation", "RVCRefiner", "MODES",
           "PoseRefiner", "PoseRefinement", "NearestRenderStart", "OpenCVMatcher", "rotation_angle_deg"]

# Condition nets (paper §4.2.2) and the per-view cross-attention they condition the flows through.
from recon3d.models.reconviagen.condition_pretrained import build_condition_net, load_condition_net  # noqa: E402
from recon3d.models.reconviagen.conditions import (  # noqa: E402
    ConditionFusionBlock,
    GlobalGeometryCondition,
    LinearPerViewCondition,
    PerViewCondition,
    condition_dropout,
    null_condition,
)
from recon3d.models.reconviagen.multiview_cross_attention import (  # noqa: E402
    MultiViewCrossAttention,
    install_per_view_conditioning,
    per_view_attentions,
)

__all__ += ["GlobalGeometryCondition", "PerViewCondition", "LinearPerViewCondition", "ConditionFusionBlock",
            "null_condition", "condition_dropout", "MultiViewCrossAttention", "install_per_view_conditioning",
            "per_view_attentions", "build_condition_net", "load_condition_net"]
