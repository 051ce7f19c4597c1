"""recon3d's VGGT network: aggregator + camera, depth and point-map heads (no track head).

:class:`VGGTNetwork` ``(images [B, S, 3, H, W] in [0, 1])`` returns a dict:

- ``pose_enc [B, S, 9]``: last camera iteration; ``pose_enc_list``: all iterations.
- ``depth [B, S, H, W, 1]`` (exp), ``depth_conf [B, S, H, W]`` (1 + exp).
- ``world_points [B, S, H, W, 3]`` (inv-log, in frame 0's camera frame), ``world_points_conf``.
- ``tokens``: the aggregator's ``depth`` outputs ``[B, S, P, 2C]`` (ReconViaGen's condition nets
  read layers 4, 11, 17, 23 at paper size); ``patch_start_idx``.
- ``image_size (H, W)`` the outputs are at, with ``resize=True`` (sides not multiples of 14 are
  resized to the nearest valid size with one warning per input size instead of refused).

:meth:`VGGTNetwork.cameras` turns ``pose_enc`` into :class:`~recon3d.data.cameras.Cameras`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from recon3d.data.cameras import Cameras
from recon3d.errors import ConfigError
from recon3d.models.vggt.aggregator import Aggregator, resize_to_patch_multiple
from recon3d.models.vggt.cameras import pose_encoding_to_cameras
from recon3d.models.vggt.config import VGGTConfig, vggt_config
from recon3d.models.vggt.heads import CameraHead, DPTHead

__all__ = ["VGGTNetwork"]


class VGGTNetwork(nn.Module):
    """VGGT with the official module names (``aggregator``, ``camera_head``, ``depth_head``, ``point_head``).

    Args:
        config: a preset name (``"paper"``, ``"tiny"``) or a :class:`VGGTConfig`; ``overrides``
            replace fields (e.g. ``max_tokens``).
        heads: which of ``"camera"``, ``"depth"``, ``"point"`` to build (a missing head is not
            in the state dict and not in the output).
        resize: images whose sides are not multiples of the patch size are resized (bilinear,
            antialiased) to the nearest valid size, with one warning per input size, instead of
            refused with a :class:`~recon3d.errors.ShapeError`. The dense outputs are then at the
            resized size, given as ``out["image_size"] = (H, W)`` (present with ``resize``); the cameras
            can still be built for the original size (``cameras(pose_enc, H0, W0)``: the encoding
            holds FoVs, which do not depend on the pixel count).
    """

    def __init__(self, config: str | VGGTConfig = "paper", heads=("camera", "depth", "point"), resize: bool = False, **overrides):
        super().__init__()
        if not isinstance(resize, bool):
            raise ConfigError(f"resize: expected True or False, got {resize!r}")
        cfg = vggt_config(config, **overrides)
        self.cfg = cfg
        self.resize = resize
        self._warned_sizes: set[tuple[int, int]] = set()
        self.heads = tuple(heads)
        self.aggregator = Aggregator(cfg)
        d = 2 * cfg.embed_dim
        dpt = dict(patch_size=cfg.patch_size, features=cfg.dpt_features, out_channels=cfg.dpt_out_channels,
                   layers=cfg.dpt_layers, hidden=cfg.dpt_head_hidden)
        self.camera_head = CameraHead(d, cfg.camera_trunk_depth, cfg.camera_heads, cfg.mlp_ratio, cfg.init_values) \
            if "camera" in heads else None
        self.point_head = DPTHead(d, 4, "inv_log", **dpt) if "point" in heads else None
        self.depth_head = DPTHead(d, 2, "exp", **dpt) if "depth" in heads else None

    def forward(self, images: torch.Tensor) -> dict:
        if self.resize:
            images = self._resized(images)
        tokens = self.aggregator(images)
        H, W = images.shape[-2:]
        ps, out = self.aggregator.patch_start_idx, {"tokens": tokens, "patch_start_idx": self.aggregator.patch_start_idx}
        if self.resize:
            out["image_size"] = (int(H), int(W))
        if self.camera_head is not None:
            out["pose_enc_list"] = self.camera_head(tokens, self.cfg.camera_iterations)
            out["pose_enc"] = out["pose_enc_list"][-1]
        if self.depth_head is not None:
            out["depth"], out["depth_conf"] = self.depth_head(tokens, (H, W), ps, self.cfg.frames_chunk_size)
        if self.point_head is not None:
            out["world_points"], out["world_points_conf"] = self.point_head(tokens, (H, W), ps, self.cfg.frames_chunk_size)
        return out

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        out = resize_to_patch_multiple(images, self.cfg.patch_size)
        if out is not images:
            size = tuple(int(v) for v in images.shape[-2:])
            if size not in self._warned_sizes:  # one warning per input size, not one per batch
                self._warned_sizes.add(size)
                warnings.warn(f"images: {size[0]}x{size[1]} is not a multiple of the patch size {self.cfg.patch_size}; "
                              f"resized to {out.shape[-2]}x{out.shape[-1]} (dense outputs are at that size)", stacklevel=3)
        return out

    @staticmethod
    def cameras(pose_enc: torch.Tensor, height: int, width: int) -> Cameras:
        """``pose_enc [B, S, 9]`` → :class:`Cameras` ``[B, S]`` (world = frame 0's camera, VGGT's scale)."""
        return pose_encoding_to_cameras(pose_enc, height, width)
