"""M3D (paper: Mamba + depth dual-stream single-view reconstruction): networks, no Lightning."""

from recon3d.models.m3d.decoder import ImplicitDecoder, PositionalEncoding, sample_pixel_features
from recon3d.models.m3d.encoders import (
    BasicBlock,
    DepthEncoder,
    GeneralizedAddition,
    ResNet18DeepEncoder,
    ResNetShallowEncoder,
    SelectiveAttentionDeepEncoder,
    load_torchvision_resnet,
    roi_grid,
    sample_roi,
)
from recon3d.models.m3d.network import PRESETS, M3DNetwork
from recon3d.models.m3d.selective_attention import AttentionBlock, MixerBlock, SelectiveAttentionModule, SelectiveSSM2d

__all__ = [
    "M3DNetwork", "PRESETS", "ImplicitDecoder", "PositionalEncoding", "sample_pixel_features",
    "ResNetShallowEncoder", "ResNet18DeepEncoder", "SelectiveAttentionDeepEncoder", "DepthEncoder",
    "GeneralizedAddition", "BasicBlock", "load_torchvision_resnet", "roi_grid", "sample_roi",
    "SelectiveAttentionModule", "MixerBlock", "AttentionBlock", "SelectiveSSM2d",
]
