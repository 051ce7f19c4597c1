"""GTR (Zhuang et al. 2024) networks: triplane generator, triplane field, whole network, weight import."""

from recon3d.models.gtr.field import FieldMLP, TriplaneField
from recon3d.models.gtr.generator import (
    DeconvUpsampler,
    GEGLUFeedForward,
    PixelShuffleUpsampler,
    SelfAttention,
    SelfAttentionBlock,
    TriplaneGenerator,
)
from recon3d.models.gtr.lifting import ProjectedFeatureLifting, plane_line_points, sample_views
from recon3d.models.gtr.network import GTRNetwork, gtr_official, gtr_paper, gtr_tiny
from recon3d.models.gtr.pixel_field import PixelAlignedTriplaneField
from recon3d.models.gtr.pretrained import convert_official_state_dict, load_official_gtr, official_key_table

__all__ = [
    "FieldMLP",
    "TriplaneField",
    "PixelAlignedTriplaneField",
    "DeconvUpsampler",
    "GEGLUFeedForward",
    "PixelShuffleUpsampler",
    "SelfAttention",
    "SelfAttentionBlock",
    "TriplaneGenerator",
    "ProjectedFeatureLifting",
    "plane_line_points",
    "sample_views",
    "GTRNetwork",
    "gtr_official",
    "gtr_paper",
    "gtr_tiny",
    "convert_official_state_dict",
    "load_official_gtr",
    "official_key_table",
]
