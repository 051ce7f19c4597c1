"""M3D image encoders: shallow RGB features, deep ROI features, the depth stream and their fusion.

Every class takes plain typed constructor arguments, so any of them can be named by
``class_path`` in a YAML and swapped without code changes (the ablations of paper §V):

==============================  ==========================================================
class                           role
==============================  ==========================================================
:class:`ResNetShallowEncoder`   pixel-aligned shallow features (pixelNeRF-style multi-scale
                                concat); ``block="basic"`` = SSR's ResNet-34,
                                ``block="enhanced"`` = M3D's enhanced residual conv blocks
:class:`ResNet18DeepEncoder`    SSR baseline deep (ROI/global) encoder
:class:`SelectiveAttentionDeepEncoder`  M3D deep encoder (Selective Attention Module)
:class:`DepthEncoder`           depth stream CNN on the monocular depth prior
:class:`GeneralizedAddition`    eq. 3's ``F_dep (+) F_highD``
==============================  ==========================================================

The ResNet parts use torchvision's parameter names (``conv1``, ``bn1``, ``layer1.0.conv1`` ...),
so an ImageNet ResNet-34 ``state_dict`` saved by torchvision loads with
:func:`load_torchvision_resnet` (``torch.load(weights_only=True)``; torchvision is never imported).

Pixel convention: boxes and ROI grids are continuous pixel coordinates (pixel ``u`` covers
``[u, u+1)``), sampled with ``align_corners=False``. SSR builds its 64x64 ROI grid with
``(x - W/2) / W * 2`` and ``align_corners=True``, half a feature-pixel apart from this.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.errors import CheckpointError, ConfigError
from recon3d.models.m3d.selective_attention import SelectiveAttentionModule
from recon3d.utils.checkpoint import compare_state_dicts, key_mismatch_report
from recon3d.utils.checks import check_shape

__all__ = [
    "BasicBlock",
    "ResNetShallowEncoder",
    "ResNet18DeepEncoder",
    "SelectiveAttentionDeepEncoder",
    "DepthEncoder",
    "GeneralizedAddition",
    "roi_grid",
    "sample_roi",
    "load_torchvision_resnet",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BasicBlock(nn.Module):
    """ResNet basic block with torchvision names (``conv1 bn1 conv2 bn2 downsample.{0,1}``).

    ``enhanced=False``: torchvision's block (ReLU, ReLU after the residual sum).
    ``enhanced=True``: the enhanced residual conv block of M3D/MambaVision (GELU inside, no
    activation after the sum, optional layer scale ``gamma``); same convolution weights, so
    ImageNet ResNet weights initialise it.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, enhanced: bool = False, layer_scale: float | None = None):
        super().__init__()
        self.enhanced = enhanced
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.gamma = nn.Parameter(torch.full((planes,), float(layer_scale))) if layer_scale is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.gelu if self.enhanced else F.relu
        out = self.bn2(self.conv2(act(self.bn1(self.conv1(x)))))
        if self.gamma is not None:
            out = out * self.gamma[None, :, None, None]
        idt = x if self.downsample is None else self.downsample(x)
        out = out + idt
        return out if self.enhanced else F.relu(out)


def _make_layer(inplanes: int, planes: int, blocks: int, stride: int, enhanced: bool, layer_scale: float | None) -> nn.Sequential:
    layers = [BasicBlock(inplanes, planes, stride, enhanced, layer_scale)]
    layers += [BasicBlock(planes, planes, 1, enhanced, layer_scale) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNetShallowEncoder(nn.Module):
    """Pixel-aligned shallow features from a ResNet-34-style stem and first stages.

    ``image (B, 3, H, W)`` in [0, 1] (ImageNet-normalised inside) ->
    ``(B, out_channels, ceil(H/2), ceil(W/2))``: the stem output (64 ch) and the outputs of the
    first ``num_layers - 1`` stages, bilinearly upsampled to the stem's resolution and
    concatenated (SSR/pixelNeRF with ``num_layers=3``: 64 + 64 + 128 = 256 channels).

    Args:
        block: ``"basic"`` (SSR baseline, torchvision ResNet-34 blocks) or ``"enhanced"``
            (M3D Exp. 1: enhanced residual conv blocks).
        layers: blocks per stage (ResNet-34: ``(3, 4, 6, 3)``); only the stages used are built.
        num_layers: 1-5 feature levels (stem, layer1, ...), as pixelNeRF's ``num_layers``.
        use_first_pool: apply the stem's max-pool (pixelNeRF default True).
        layer_scale: initial layer scale of enhanced blocks (None: no ``gamma`` parameter, so an
            ImageNet state dict loads strictly).
    """

    def __init__(
        self,
        block: Literal["basic", "enhanced"] = "basic",
        layers: tuple[int, ...] | list[int] = (3, 4, 6, 3),
        num_layers: int = 3,
        use_first_pool: bool = True,
        layer_scale: float | None = None,
    ):
        super().__init__()
        if block not in ("basic", "enhanced"):
            raise ConfigError(f"ResNetShallowEncoder: block must be 'basic' or 'enhanced', got {block!r}")
        if not 1 <= num_layers <= len(layers) + 1:
            raise ConfigError(f"ResNetShallowEncoder: num_layers must be in 1..{len(layers) + 1}, got {num_layers}")
        enhanced = block == "enhanced"
        self.num_layers, self.use_first_pool = num_layers, use_first_pool
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [64, 128, 256, 512]
        inplanes = 64
        for i in range(num_layers - 1):
            self.add_module(f"layer{i + 1}", _make_layer(inplanes, widths[i], layers[i], 1 if i == 0 else 2, enhanced, layer_scale))
            inplanes = widths[i]
        self.out_channels = 64 + sum(widths[: num_layers - 1])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image (B, 3, H, W)`` -> ``(B, out_channels, ceil(H/2), ceil(W/2))``."""
        check_shape(image, "B 3 H W", "image")
        x = self.relu(self.bn1(self.conv1((image - self.mean) / self.std)))
        feats = [x]
        if self.num_layers > 1 and self.use_first_pool:
            x = self.maxpool(x)
        for i in range(1, self.num_layers):
            x = getattr(self, f"layer{i}")(x)
            feats.append(x)
        size = feats[0].shape[-2:]
        return torch.cat([f if f.shape[-2:] == size else F.interpolate(f, size, mode="bilinear", align_corners=False) for f in feats], 1)


def load_torchvision_resnet(module: nn.Module, path: str | os.PathLike, strict: bool = True) -> list[str]:
    """Load a torchvision ResNet ``state_dict`` file (``torch.save``d) into ``module``.

    Keys of the stages the module does not build (``layer{i}.*`` for each ``layer{i}`` it lacks,
    and ``fc.*``) are the explicit partial part: they are skipped and returned. Any other key of
    the file the module lacks, and (with ``strict``) any parameter/buffer of ``module`` the file
    lacks, or another shape, is one :class:`CheckpointError` line naming the file
    (:func:`recon3d.utils.checkpoint.key_mismatch_report`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: ResNet weight file not found; save torchvision's resnet34 state_dict there "
                              "(torch.save(torchvision.models.resnet34(weights='IMAGENET1K_V1').state_dict(), path))")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad file
        raise CheckpointError(f"{path}: cannot read a state dict ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a ResNet state dict, got {type(sd).__name__}")
    own = module.state_dict()
    unbuilt = ["fc.*"] + [f"layer{i}.*" for i in range(1, 5) if not hasattr(module, f"layer{i}")]
    problem = compare_state_dicts(own, sd, ignore=unbuilt, strict=True)
    if problem.shapes or problem.unexpected or (strict and problem.missing):
        report = key_mismatch_report(problem.missing if strict else (), problem.unexpected, problem.shapes,
                                     problem.n_model, problem.n_found)
        raise CheckpointError(f"{path}: weights do not match {type(module).__name__}: {report}")
    module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return sorted(k for k in sd if k not in own)


def roi_grid(boxes: torch.Tensor, width: int, height: int, size: int) -> torch.Tensor:
    """Sampling grid ``(B, S, S, 2)`` in ``[-1, 1]`` (``align_corners=False``) over pixel boxes.

    ``boxes (B, 4)``: ``x0, y0, x1, y1`` continuous pixel coordinates of the input image.
    """
    check_shape(boxes, "B 4", "boxes")
    t = torch.linspace(0, 1, size, device=boxes.device, dtype=boxes.dtype)
    xs = boxes[:, 0:1] + (boxes[:, 2:3] - boxes[:, 0:1]) * t  # (B, S)
    ys = boxes[:, 1:2] + (boxes[:, 3:4] - boxes[:, 1:2]) * t
    gx = (xs / width * 2 - 1)[:, None, :].expand(-1, size, -1)
    gy = (ys / height * 2 - 1)[:, :, None].expand(-1, -1, size)
    return torch.stack([gx, gy], -1)


def sample_roi(features: torch.Tensor, boxes: torch.Tensor, width: int, height: int, size: int) -> torch.Tensor:
    """Bilinear ROI features ``(B, C, S, S)`` from ``features (B, C, h, w)`` of a ``width x height`` image."""
    grid = roi_grid(boxes.to(features.dtype), width, height, size)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ResNet18DeepEncoder(nn.Module):
    """SSR's deep (ROI/global) encoder: conv 3x3 + small-stride ResNet-18 + MLP on a 64x64 ROI.

    ``forward(features (B, C, h, w), boxes (B, 4), width, height)`` -> dict with ``global
    (B, out_dim)`` and ``roi_features`` None (the baseline has no ROI feature map).
    """

    def __init__(self, in_channels: int = 256, out_dim: int = 256, roi_size: int = 64, width: int = 64):
        super().__init__()
        self.in_channels, self.out_dim, self.roi_size = in_channels, out_dim, roi_size
        w = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w[0], 3, padding=1), nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*(_make_layer(w[max(i - 1, 0)], w[i], 2, 1 if i == 0 else 2, False, None) for i in range(4)))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.mlp = nn.Sequential(nn.Linear(4 * w[3], 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, out_dim))
        self.roi_channels = 0

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, width: int, height: int) -> dict[str, torch.Tensor | None]:
        check_shape(features, f"B {self.in_channels} h w", "features")
        roi = sample_roi(features, boxes, width, height, self.roi_size)
        g = self.mlp(self.pool(self.layers(self.stem(roi))).flatten(1))
        return {"global": g, "roi_features": None}


class SelectiveAttentionDeepEncoder(nn.Module):
    """M3D's deep encoder: ROI features -> patch embedding -> Selective Attention Module.

    ``forward(features (B, C, h, w), boxes (B, 4), width, height)`` -> dict with
    ``roi_features (B, dim, S/patch, S/patch)`` (context features over the box) and ``global
    (B, out_dim)`` (mean-pooled context, projected).

    Args:
        in_channels: channels ``C`` of the shallow features.
        dim: token width inside the Selective Attention Module.
        out_dim: width of the ``global`` feature.
        roi_size: ROI side ``S`` in feature pixels (a multiple of ``patch``).
        patch: patch-embedding stride.
        **sam: the rest of :class:`SelectiveAttentionModule`'s arguments by name (``depths``,
            ``num_heads``, ``d_state``, ``scan_directions``, ``conv``, ``mlp_ratio``, ``backend``),
            with its defaults; a config lists them beside the others (the parser reads them there).
    """

    def __init__(self, in_channels: int = 256, dim: int = 256, out_dim: int = 256, roi_size: int = 64, patch: int = 4, **sam):
        super().__init__()
        if roi_size % patch:
            raise ConfigError(f"SelectiveAttentionDeepEncoder: roi_size {roi_size} must be a multiple of patch {patch}")
        self.in_channels, self.out_dim, self.roi_size = in_channels, out_dim, roi_size
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.sam = SelectiveAttentionModule(dim, **sam)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, out_dim))
        self.roi_channels = dim

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, width: int, height: int) -> dict[str, torch.Tensor | None]:
        check_shape(features, f"B {self.in_channels} h w", "features")
        roi = sample_roi(features, boxes, width, height, self.roi_size)
        ctx = self.sam(self.embed(roi))
        return {"global": self.head(ctx.mean((2, 3))), "roi_features": ctx}


class DepthEncoder(nn.Module):
    """Depth stream: ``depth (B, 1, H, W)`` -> ``(B, out_channels, ceil(H/2), ceil(W/2))``.

    Conv 3x3 stride 2 + BN + ReLU, conv 3x3 + ReLU, conv 1x1. The official code's
    ``SimpleResizeCNN`` is a stride-2 conv followed by a conv to 256 channels; this adds one
    hidden layer and a normalisation of the prior (``normalize="minmax"`` per image, so relative
    disparity of any scale maps to [0, 1]; ``"none"`` feeds it raw, as the official code does
    with its uint8 maps).
    """

    def __init__(self, out_channels: int = 256, hidden: int = 64, normalize: Literal["minmax", "none"] = "minmax"):
        super().__init__()
        if normalize not in ("minmax", "none"):
            raise ConfigError(f"DepthEncoder: normalize must be 'minmax' or 'none', got {normalize!r}")
        self.out_channels, self.normalize = out_channels, normalize
        self.net = nn.Sequential(
            nn.Conv2d(1, hidden, 3, 2, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
        )

    def forward(self, depth: torch.Tensor) -> torch.Tensor:
        check_shape(depth, "B 1 H W", "depth")
        if self.normalize == "minmax":
            lo = depth.amin((2, 3), keepdim=True)
            hi = depth.amax((2, 3), keepdim=True)
            depth = (depth - lo) / (hi - lo).clamp_min(1e-6)
        return self.net(depth)


class GeneralizedAddition(nn.Module):
    """Eq. 3's generalised addition ``F_dep (+) F_highD`` = ``P_d(F_dep) + P_r(F_highD)``.

    ``P_d``, ``P_r`` are 1x1 convolutions to ``out_channels`` (the "generalisation": channel counts
    need not match); the depth features are resized bilinearly to the RGB features' size.
    """

    def __init__(self, depth_channels: int = 256, rgb_channels: int = 256, out_channels: int = 256):
        super().__init__()
        self.out_channels = out_channels
        self.proj_depth = nn.Conv2d(depth_channels, out_channels, 1)
        self.proj_rgb = nn.Conv2d(rgb_channels, out_channels, 1)

    def forward(self, depth_features: torch.Tensor, rgb_features: torch.Tensor) -> torch.Tensor:
        """``(B, Cd, h', w')``, ``(B, Cr, h, w)`` -> ``(B, out_channels, h, w)``."""
        if depth_features.shape[-2:] != rgb_features.shape[-2:]:
            depth_features = F.interpolate(depth_features, rgb_features.shape[-2:], mode="bilinear", align_corners=False)
        return self.proj_depth(depth_features) + self.proj_rgb(rgb_features)
