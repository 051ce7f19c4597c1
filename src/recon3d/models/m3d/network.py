"""M3DNetwork: encoders + implicit decoder of M3D (paper §III), with the §V ablations as presets.

Data flow for ``B`` objects and ``N`` query points::

    image (B,3,H,W) -> shallow -> F_highD (B,Cs,H/2,W/2) ---------------------> sample at uv -> F_vis
    depth (B,1,H,W) -> depth   -> F_dep  (B,Cd,H/2,W/2) -> F_dep (+) F_highD -> sample at uv -> F_dge
    F_highD, roi box -> deep -> global (B,G) [+ class code] and ROI context map -> sample -> F_roi
    points (B,N,3) --cameras.project--> uv (B,N,2)
    decoder(gamma(x_canonical), F_vis, F_dge, F_roi, global) -> sdf (B,N), feature, rgb (B,N,3)

Ablations (paper §V-A) by swapping modules, see :meth:`M3DNetwork.preset`:

==========  ===================  ==================================  ===========
name        shallow blocks       deep encoder                        depth stream
==========  ===================  ==================================  ===========
baseline    ResNet-34 (basic)    ResNet-18 (SSR)                     no
exp1        enhanced             ResNet-18                           no
exp2        enhanced             ResNet-18                           yes
m3d         enhanced             Selective Attention Module          yes
==========  ===================  ==================================  ===========

Paper vs official code: the paper concatenates RGB-derived ``F_vis`` and the fused ``F_dge``
(``pixel_features="rgb+fused"``, the default with a depth stream); the official Dual-S3D code
samples pixel features from the depth stream only (``pixel_features="depth"``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.data.cameras import Cameras
from recon3d.errors import ConfigError, ShapeError
from recon3d.models.m3d.decoder import ImplicitDecoder, sample_pixel_features
from recon3d.models.m3d.encoders import (
    DepthEncoder,
    GeneralizedAddition,
    ResNet18DeepEncoder,
    ResNetShallowEncoder,
    SelectiveAttentionDeepEncoder,
)
from recon3d.utils.checks import check_option, check_shape

__all__ = ["M3DNetwork", "PRESETS"]

PRESETS = ("baseline", "exp1", "exp2", "m3d")


class M3DNetwork(nn.Module):
    """Dual-stream encoders + implicit SDF/colour decoder.

    Args:
        shallow: pixel-aligned RGB encoder with ``out_channels`` (e.g. :class:`ResNetShallowEncoder`).
        deep: ROI/global encoder with ``out_dim`` and ``roi_channels`` (0 when it returns no map).
        depth: depth-stream encoder with ``out_channels``, or None (single RGB stream).
        fusion: eq. 3's generalised addition; built as ``GeneralizedAddition(Cd, Cs, Cs)`` when a
            depth stream is given and this is None.
        pixel_features: ``"auto"`` (``"rgb"`` without depth, ``"rgb+fused"`` with it; paper),
            ``"rgb"``, ``"rgb+fused"``, ``"fused"``, or ``"depth"`` (official code: depth stream only).
        num_classes: length of the one-hot class code appended to the global feature (0: none).
        multires, hidden, num_layers, feature_size, sphere_radius: decoder sizes (SSR: 6, 256, 8, 256, 0.6).
    """

    def __init__(
        self,
        shallow: nn.Module,
        deep: nn.Module,
        depth: nn.Module | None = None,
        fusion: nn.Module | None = None,
        pixel_features: Literal["auto", "rgb", "rgb+fused", "fused", "depth"] = "auto",
        num_classes: int = 9,
        multires: int = 6,
        hidden: int = 256,
        num_layers: int = 8,
        feature_size: int = 256,
        sphere_radius: float = 0.6,
    ):
        super().__init__()
        self.shallow, self.deep, self.depth = shallow, deep, depth
        if pixel_features == "auto":
            pixel_features = "rgb" if depth is None else "rgb+fused"
        if depth is None and pixel_features != "rgb":
            raise ConfigError(f"M3DNetwork: pixel_features={pixel_features!r} needs a depth encoder; got depth=None")
        if pixel_features not in ("rgb", "rgb+fused", "fused", "depth"):
            raise ConfigError(f"M3DNetwork: unknown pixel_features {pixel_features!r}")
        self.pixel_features = pixel_features
        for name, value in (("num_classes", num_classes), ("multires", multires), ("num_layers", num_layers)):
            check_option(f"M3DNetwork {name}", value, 0, integer=True)
        cs = int(shallow.out_channels)
        if depth is not None and fusion is None and "fused" in pixel_features:
            fusion = GeneralizedAddition(int(depth.out_channels), cs, cs)
        self.fusion = fusion
        c_point = 0
        if "rgb" in pixel_features:
            c_point += cs
        if "fused" in pixel_features:
            c_point += int(fusion.out_channels)
        if pixel_features == "depth":
            c_point += int(depth.out_channels)
        c_point += int(getattr(deep, "roi_channels", 0))
        self.num_classes = num_classes
        self.decoder = ImplicitDecoder(c_point, int(deep.out_dim) + num_classes, multires, hidden, num_layers,
                                       feature_size=feature_size, sphere_radius=sphere_radius)

    @classmethod
    def preset(
        cls,
        name: Literal["baseline", "exp1", "exp2", "m3d"] = "m3d",
        shallow_layers: int = 3,
        roi_size: int = 64,
        sam_dim: int = 256,
        sam_depths: tuple[int, ...] = (8, 4),
        sam_heads: int = 8,
        deep_width: int = 64,
        global_dim: int = 256,
        **decoder_kwargs,
    ) -> M3DNetwork:
        """Build one of the paper's ablation configurations (see module docstring)."""
        if name not in PRESETS:
            raise ConfigError(f"M3DNetwork.preset: expected one of {PRESETS}, got {name!r}")
        shallow = ResNetShallowEncoder("basic" if name == "baseline" else "enhanced", num_layers=shallow_layers)
        cs = shallow.out_channels
        if name == "m3d":
            deep: nn.Module = SelectiveAttentionDeepEncoder(cs, sam_dim, global_dim, roi_size, depths=sam_depths, num_heads=sam_heads)
        else:
            deep = ResNet18DeepEncoder(cs, global_dim, roi_size, width=deep_width)
        depth = DepthEncoder(cs) if name in ("exp2", "m3d") else None
        return cls(shallow, deep, depth, **decoder_kwargs)

    def encode(self, image: torch.Tensor, depth: torch.Tensor | None, roi_boxes: torch.Tensor | None = None,
               class_codes: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """Image-level features (computed once per object, reusable for many point batches).

        Returns dict ``rgb (B,Cs,h,w)``, ``fused``/``depth`` maps or None, ``roi`` map or None,
        ``roi_boxes (B,4)``, ``global (B, G + num_classes)``.
        """
        dims: dict = {}
        check_shape(image, "B 3 H W", "image", dims)
        b, _, h, w = image.shape
        if self.depth is not None:
            if depth is None:
                raise ShapeError("depth: this network has a depth stream and needs depth (B, 1, H, W); got None")
            check_shape(depth, "B 1 H W", "depth", dims)
        if roi_boxes is None:
            roi_boxes = image.new_tensor([0.0, 0.0, w, h]).expand(b, 4)
        check_shape(roi_boxes, "B 4", "roi_boxes", dims)
        f_rgb = self.shallow(image)
        f_dep = self.depth(depth) if self.depth is not None else None
        f_fused = self.fusion(f_dep, f_rgb) if self.fusion is not None and f_dep is not None else None
        deep = self.deep(f_rgb, roi_boxes, w, h)
        g = deep["global"]
        if self.num_classes:
            if class_codes is None:
                class_codes = g.new_zeros(b, self.num_classes)
            check_shape(class_codes, f"B {self.num_classes}", "class_codes", dims)
            g = torch.cat([g, class_codes.to(g)], -1)
        return {"rgb": f_rgb, "depth": f_dep, "fused": f_fused, "roi": deep.get("roi_features"), "roi_boxes": roi_boxes,
                "global": g, "width": w, "height": h}

    def decode(self, enc: dict, cameras: Cameras, points: torch.Tensor, points_canonical: torch.Tensor | None = None,
               view_dirs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-point outputs from :meth:`encode`'s features; shapes as :meth:`forward`."""
        dims: dict = {}
        check_shape(points, "B N 3", "points", dims)
        if tuple(cameras.batch_shape) != (points.shape[0],):
            raise ShapeError(f"cameras: expected batch shape [{points.shape[0]}] (one camera per object), got {list(cameras.batch_shape)}")
        if points_canonical is None:
            points_canonical = points
        check_shape(points_canonical, "B N 3", "points_canonical", dims)
        w, h = enc["width"], enc["height"]
        if (cameras.width, cameras.height) != (w, h):
            cameras = cameras.resized(w, h)
        uv, z = cameras.project(points)
        feats = []
        if "rgb" in self.pixel_features:
            feats.append(sample_pixel_features(enc["rgb"], uv, w, h))
        if "fused" in self.pixel_features:
            feats.append(sample_pixel_features(enc["fused"], uv, w, h))
        if self.pixel_features == "depth":
            feats.append(sample_pixel_features(enc["depth"], uv, w, h))
        if enc["roi"] is not None:
            box = enc["roi_boxes"].to(uv)
            size = (box[:, 2:] - box[:, :2]).clamp_min(1e-6)[:, None]
            rel = (uv - box[:, None, :2]) / size * 2 - 1  # [-1, 1] over the box
            grid = rel[:, :, None].to(enc["roi"].dtype)
            feats.append(F.grid_sample(enc["roi"], grid, mode="bilinear", padding_mode="border", align_corners=False)[..., 0].transpose(1, 2))
        out = self.decoder(points_canonical, torch.cat(feats, -1), enc["global"], view_dirs)
        out.update(uv=uv, z=z)
        return out

    def forward(
        self,
        image: torch.Tensor,
        depth: torch.Tensor | None,
        cameras: Cameras,
        points: torch.Tensor,
        roi_boxes: torch.Tensor | None = None,
        class_codes: torch.Tensor | None = None,
        points_canonical: torch.Tensor | None = None,
        view_dirs: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """SDF and colour at query points.

        Args:
            image: ``(B, 3, H, W)`` in [0, 1].
            depth: ``(B, 1, H, W)`` monocular depth prior (None without a depth stream).
            cameras: ``Cameras`` of batch shape ``(B,)`` for this image (OpenCV c2w, pixel K).
            points: ``(B, N, 3)`` query points in the cameras' world frame (projected).
            roi_boxes: ``(B, 4)`` object boxes ``x0, y0, x1, y1`` in pixels (default: whole image).
            class_codes: ``(B, num_classes)`` one-hot classes (default zeros).
            points_canonical: ``(B, N, 3)`` the same points in the decoder's canonical frame
                (positionally encoded; default ``points``).
            view_dirs: ``(B, N, 3)`` optional viewing directions for the colour head.

        Returns:
            dict ``sdf (B, N)``, ``rgb (B, N, 3)``, ``feature (B, N, F)``, ``uv (B, N, 2)``,
            ``z (B, N)``, ``global (B, G)``.
        """
        enc = self.encode(image, depth, roi_boxes, class_codes)
        out = self.decode(enc, cameras, points, points_canonical, view_dirs)
        out["global"] = enc["global"]
        return out
