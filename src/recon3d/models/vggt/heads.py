"""VGGT's prediction heads: the iterative camera head and the DPT dense heads (depth, point map).

Names follow the official checkpoint (``camera_head.*``, ``depth_head.*``, ``point_head.*``).
The track head (``track_head.*``) is not implemented: recon3d uses VGGT for cameras, depth and
its aggregated features (ReconViaGen reads no tracks); its weights are skipped by name on import.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recon3d.models.vggt.layers import Block, Mlp

__all__ = ["CameraHead", "DPTHead", "inverse_log", "POSE_DIM"]

#: Size of VGGT's ``absT_quaR_FoV`` camera encoding: T (3), quaternion xyzw (4), fov_h, fov_w.
POSE_DIM = 9


def inverse_log(y: torch.Tensor) -> torch.Tensor:
    """``sign(y) (exp|y| − 1)``, the inverse of ``sign(x) log(1 + |x|)``."""
    return torch.sign(y) * torch.expm1(y.abs())


class CameraHead(nn.Module):
    """Camera encodings from the last aggregator layer's camera tokens.

    The camera token of every frame (token 0, ``[B, S, 2C]``) is layer-normed, then refined for
    ``iterations`` steps: the current encoding (a learned empty one at first; detached between
    iterations, so each step learns a correction of a fixed input) is embedded, turned into
    adaLN shift/scale/gate on the tokens, passed through the ``trunk`` (blocks attending across
    the S frames) and a small MLP that adds a delta to the encoding. Translation and quaternion
    are linear; the two FoVs go through ReLU. Returns the list of ``[B, S, 9]`` encodings, one
    per iteration (the last is the prediction).
    """

    def __init__(self, dim: int, trunk_depth: int = 4, num_heads: int = 16, mlp_ratio: float = 4.0, init_values: float = 0.01):
        super().__init__()
        self.trunk = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, init_values) for _ in range(trunk_depth)])
        self.token_norm = nn.LayerNorm(dim)
        self.trunk_norm = nn.LayerNorm(dim)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, POSE_DIM))
        self.embed_pose = nn.Linear(POSE_DIM, dim)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.adaln_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim, dim // 2, POSE_DIM)

    @staticmethod
    def activate(enc: torch.Tensor) -> torch.Tensor:
        """Linear T and quaternion, ReLU on the FoVs; ``[..., 9]`` → ``[..., 9]``."""
        return torch.cat([enc[..., :7], F.relu(enc[..., 7:])], -1)

    def forward(self, tokens: list[torch.Tensor], iterations: int = 4) -> list[torch.Tensor]:
        cam = self.token_norm(tokens[-1][:, :, 0])  # [B, S, 2C]
        B, S, _ = cam.shape
        raw = None
        out = []
        for _ in range(iterations):
            cond = self.embed_pose(self.empty_pose_tokens.expand(B, S, -1) if raw is None else raw.detach())
            shift, scale, gate = self.poseLN_modulation(cond).chunk(3, -1)
            h = cam + gate * (self.adaln_norm(cam) * (1 + scale) + shift)
            delta = self.pose_branch(self.trunk_norm(self.trunk(h)))
            raw = delta if raw is None else raw.detach() + delta
            out.append(self.activate(raw))
        return out


# ----------------------------------------------------------------------------- DPT
def _uv_embedding(h: int, w: int, channels: int, aspect: float, dtype, device) -> torch.Tensor:
    """DPT's additive position code ``(channels, h, w)`` (before the 0.1 factor).

    Grid: ``u`` over the width, ``v`` over the height, centred cell coordinates with the image
    diagonal normalised to 1 (spans ``aspect/√(1+aspect²)`` and ``1/√(1+aspect²)``, shrunk by
    ``(n−1)/n``). Each of u and v becomes ``channels/2`` sinusoids ``[sin(p ω), cos(p ω)]`` with
    ``ω_i = 100^(−i / (channels/4))``, computed in float64; u first.
    """
    diag = math.sqrt(aspect ** 2 + 1.0)
    sx, sy = aspect / diag, 1.0 / diag
    u = torch.linspace(-sx * (w - 1) / w, sx * (w - 1) / w, w, dtype=dtype, device=device)
    v = torch.linspace(-sy * (h - 1) / h, sy * (h - 1) / h, h, dtype=dtype, device=device)
    uu, vv = u[None, :].expand(h, w), v[:, None].expand(h, w)
    q = channels // 4
    omega = 1.0 / 100.0 ** (torch.arange(q, dtype=torch.float64, device=device) / q)

    def code(p: torch.Tensor) -> torch.Tensor:
        a = p.reshape(-1).double()[:, None] * omega
        return torch.cat([a.sin(), a.cos()], -1)

    emb = torch.cat([code(uu), code(vv)], -1).float()  # (h·w, channels)
    return emb.view(h, w, channels).permute(2, 0, 1)


class _ResidualConvUnit(nn.Module):
    """``relu(x) + conv2(relu(conv1(relu(x))))`` (3x3 convs with bias).

    The skip carries ``relu(x)``, not ``x``: upstream applies an in-place ReLU to its input before
    adding it back, so the released weights were trained with this function.
    """

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = F.relu(x)
        return r + self.conv2(F.relu(self.conv1(r)))


class _FusionBlock(nn.Module):
    """``out_conv(up(rcu2(x + rcu1(skip))))``; bilinear (align_corners) to ``size`` or ×2."""

    def __init__(self, c: int, has_residual: bool = True):
        super().__init__()
        self.out_conv = nn.Conv2d(c, c, 1)
        if has_residual:
            self.resConfUnit1 = _ResidualConvUnit(c)
        self.resConfUnit2 = _ResidualConvUnit(c)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size=None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        size = tuple(size) if size is not None else (2 * x.shape[-2], 2 * x.shape[-1])
        return self.out_conv(F.interpolate(x, size=size, mode="bilinear", align_corners=True))


class DPTHead(nn.Module):
    """DPT dense head over four aggregator layers.

    For each of ``layers``: patch tokens ``[B, S, P_img, 2C]`` → LayerNorm → 1x1 conv to
    ``out_channels[i]`` on the ``(H/p, W/p)`` grid → + 0.1·position code → resize (×4 and ×2
    transposed convs, identity, stride-2 conv) → 3x3 conv to ``features`` (``scratch.layer*_rn``);
    fused coarse to fine by ``scratch.refinenet4..1``; ``output_conv1`` (features → features/2);
    bilinear to ``(H, W)``; + 0.1·position code; ``output_conv2`` (3x3 → ``hidden``, ReLU, 1x1 →
    ``out_dim``). The last output channel is the confidence ``1 + exp``; the others go through
    ``activation`` (``"exp"`` for depth, ``"inv_log"`` for points).

    Frames are processed ``frames_chunk_size`` at a time (the head is per frame).
    Returns ``(values [B, S, H, W, out_dim − 1], confidence [B, S, H, W])``.
    """

    def __init__(self, dim: int, out_dim: int, activation: str, patch_size: int = 14, features: int = 256,
                 out_channels=(256, 512, 1024, 1024), layers=(4, 11, 17, 23), hidden: int = 32):
        super().__init__()
        if activation not in ("exp", "inv_log"):
            raise ValueError(f"activation: expected 'exp' or 'inv_log', got {activation!r}")
        self.patch_size, self.activation, self.layers = patch_size, activation, tuple(layers)
        oc = list(out_channels)
        self.norm = nn.LayerNorm(dim)
        self.projects = nn.ModuleList([nn.Conv2d(dim, c, 1) for c in oc])
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(oc[0], oc[0], 4, stride=4), nn.ConvTranspose2d(oc[1], oc[1], 2, stride=2),
            nn.Identity(), nn.Conv2d(oc[3], oc[3], 3, stride=2, padding=1),
        ])
        s = nn.Module()
        for i, c in enumerate(oc, 1):
            setattr(s, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        s.refinenet1, s.refinenet2, s.refinenet3 = _FusionBlock(features), _FusionBlock(features), _FusionBlock(features)
        s.refinenet4 = _FusionBlock(features, has_residual=False)
        s.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        s.output_conv2 = nn.Sequential(nn.Conv2d(features // 2, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, out_dim, 1))
        self.scratch = s

    def _pos(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return x + 0.1 * _uv_embedding(x.shape[-2], x.shape[-1], x.shape[1], W / H, x.dtype, x.device)

    def _frames(self, tokens: list[torch.Tensor], patch_start: int, H: int, W: int, lo: int, hi: int):
        h, w = H // self.patch_size, W // self.patch_size
        feats = []
        for j, li in enumerate(self.layers):
            x = tokens[li][:, lo:hi, patch_start:]
            B, s = x.shape[:2]
            x = self.norm(x.reshape(B * s, h * w, -1)).transpose(1, 2).reshape(B * s, -1, h, w)
            feats.append(self.resize_layers[j](self._pos(self.projects[j](x), H, W)))
        sc = self.scratch
        l1, l2, l3, l4 = (getattr(sc, f"layer{i}_rn")(f) for i, f in enumerate(feats, 1))
        x = sc.refinenet4(l4, size=l3.shape[-2:])
        x = sc.refinenet3(x, l3, size=l2.shape[-2:])
        x = sc.refinenet2(x, l2, size=l1.shape[-2:])
        x = sc.output_conv1(sc.refinenet1(x, l1))
        x = F.interpolate(x, size=(h * self.patch_size, w * self.patch_size), mode="bilinear", align_corners=True)
        x = sc.output_conv2(self._pos(x, H, W)).permute(0, 2, 3, 1)  # (B·s, H, W, out_dim)
        vals, conf = x[..., :-1], 1 + x[..., -1].exp()
        vals = vals.exp() if self.activation == "exp" else inverse_log(vals)
        return vals.reshape(B, s, *vals.shape[1:]), conf.reshape(B, s, *conf.shape[1:])

    def forward(self, tokens: list[torch.Tensor], image_hw: tuple[int, int], patch_start: int,
                frames_chunk_size: int | None = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens``: the aggregator outputs; ``image_hw``: ``(H, W)`` of the input images."""
        H, W = image_hw
        S = tokens[0].shape[1]
        step = S if frames_chunk_size is None else max(1, int(frames_chunk_size))
        parts = [self._frames(tokens, patch_start, H, W, lo, min(lo + step, S)) for lo in range(0, S, step)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
