"""LGM's network: posed multi-view images → one dense set of 3D Gaussians per object.

``LGMNetwork(images (B, V, 3, H, W) in [0, 1], cameras: Cameras (B, V)) → Gaussians`` (dense,
``B × V·h·w`` Gaussians, ``h, w = H / stride, W / stride``). Facts checked against the official
code (``3DTopia/LGM`` @ fe8d12c: ``core/models.py``, ``core/options.py``, ``core/utils.py``,
``core/provider_objaverse.py``, ``core/gs.py``):

**Input, 9 channels per pixel.** ImageNet-normalised RGB ‖ ``o × d`` ‖ ``d``, with ``o, d`` the
world-space ray origin and unit direction through the pixel centre (``+0.5``). LGM computes its
rays in OpenGL camera axes; recon3d's OpenCV cameras give the same world-space rays
(``c2w_cv = c2w_gl · diag(1, -1, -1, 1)`` flips both the camera axes and the pixel-to-direction
signs), so :func:`recon3d.data.rays.plucker_embedding` (``"oxd"``, ``"md"``) is LGM's embedding.
Cameras of another resolution than the images are rescaled to it (:meth:`Cameras.resized`).

**Frame.** The official weights were trained with every object's poses normalised so that input
view 0 sits at ``[0, 0, 1.5]`` with the identity rotation in OpenGL axes (looking down ``-z``,
``y`` up), and predict Gaussians in that frame, inside ``[-1, 1]^3``. :func:`normalize_cameras`
does this for recon3d cameras: it re-expresses the **whole world** (cameras, and so the scene the
Gaussians describe) in that canonical frame and returns the world→canonical transform, so
Gaussians predicted from the normalised cameras render correctly, through recon3d's renderer
(:func:`recon3d.render.render`, pure-torch or gsplat rasteriser), from any other camera normalised
with the same transform; :func:`transform_gaussians` with the inverse transform brings them back
to the dataset's world (``Reconstruction.to_world``). ``LGMNetwork.forward`` itself does not
normalise: it uses the cameras it is given.

**Output, 14 channels per pixel** (after the U-Net's ``conv_out`` and the extra 1x1 ``conv``),
packed ``[pos 3, opacity 1, scale 3, rot 4, rgb 3]`` (:data:`LGM_CHANNELS`), activated as LGM
does: ``pos.clamp(-1, 1)``, ``sigmoid(opacity)``, ``0.1 · softplus(scale)``,
``normalize(rot)`` (``w, x, y, z``: the official rasteriser reads the first component as the real
part, as :class:`~recon3d.representations.Gaussians` stores it), ``0.5 · tanh(rgb) + 0.5``.
Gaussians are ordered view, row, column (LGM's ``[B, V, h, w]`` flattening).

**Rendering defaults** (:data:`LGM_FOVY_DEG`, :data:`LGM_NEAR`, :data:`LGM_FAR`,
:data:`LGM_BACKGROUND`, :data:`LGM_CAM_RADIUS`): white background, vertical field of view 49.1°,
near 0.5, far 2.5 (LGM's projection matrix), cameras at distance 1.5 from the origin.

**Presets** (:data:`LGM_PRESETS`): ``big`` = the official ``big`` options and the released
``model_fp16_fixrot.safetensors`` (256² input, 4 × 128² = 65,536 Gaussians); ``small`` = the
official ``small`` options (256² input, 4 × 64²); ``tiny`` = a CPU-test size of recon3d's own
(32² input, widths (32, 64, 96), 4 × 16² Gaussians), with every width a multiple of 32 so the
official class builds it too (the weight-layout manifest test does); ``groups`` stays 32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recon3d.data.cameras import OPENGL_TO_OPENCV, Cameras, intrinsics_from_fov, look_at
from recon3d.data.rays import plucker_embedding
from recon3d.errors import ConfigError, ShapeError
from recon3d.models.lgm.unet import SKIP_SCALE, LGMUNet
from recon3d.representations.gaussians import Gaussians

__all__ = [
    "LGMNetwork", "LGM_PRESETS", "LGM_CHANNELS", "GAUSSIAN_CHANNELS", "IMAGENET_MEAN", "IMAGENET_STD",
    "LGM_FOVY_DEG", "LGM_NEAR", "LGM_FAR", "LGM_BACKGROUND", "LGM_CAM_RADIUS",
    "lgm_input_features", "activate_gaussians", "normalize_cameras", "transform_gaussians", "lgm_orbit_cameras",
]

#: Vertical field of view of LGM's training renders and of its renderer, degrees.
LGM_FOVY_DEG = 49.1
#: Near / far planes of LGM's projection matrix.
LGM_NEAR, LGM_FAR = 0.5, 2.5
#: LGM renders and supervises on a white background.
LGM_BACKGROUND = "white"
#: Distance of the (normalised) input view 0 from the origin.
LGM_CAM_RADIUS = 1.5

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Channels per pixel of the output and what they hold (pre-activation in :meth:`LGMNetwork.raw`).
GAUSSIAN_CHANNELS = 14
LGM_CHANNELS = {"pos": slice(0, 3), "opacity": slice(3, 4), "scale": slice(4, 7), "rot": slice(7, 11), "rgb": slice(11, 14)}

#: Architecture presets (``core/options.py``'s ``big`` / ``small``; ``tiny`` is recon3d's CPU size).
LGM_PRESETS: dict[str, dict] = {
    "big": dict(
        down_channels=(64, 128, 256, 512, 1024, 1024), down_attention=(False, False, False, True, True, True),
        mid_attention=True, up_channels=(1024, 1024, 512, 256, 128), up_attention=(True, True, True, False, False),
        input_size=256,
    ),
    "small": dict(
        down_channels=(64, 128, 256, 512, 1024, 1024), down_attention=(False, False, False, True, True, True),
        mid_attention=True, up_channels=(1024, 1024, 512, 256), up_attention=(True, True, True, False),
        input_size=256,
    ),
    "tiny": dict(
        down_channels=(32, 64, 96), down_attention=(False, True, True),
        mid_attention=True, up_channels=(96, 64), up_attention=(True, False),
        input_size=32,
    ),
}


def lgm_input_features(images: torch.Tensor, cameras: Cameras) -> torch.Tensor:
    """LGM's per-pixel input ``(B, V, 9, H, W)``: ImageNet-normalised RGB ‖ ``o × d`` ‖ ``d``.

    Args:
        images: ``(B, V, 3, H, W)`` RGB in [0, 1] (composited on LGM's white background).
        cameras: ``(B, V)``; rescaled to ``W x H`` when their size differs.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 5 or images.shape[2] != 3:
        got = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ShapeError(f"images: expected (B, V, 3, H, W) RGB in [0, 1], got {got}")
    B, V, _, H, W = images.shape
    if not isinstance(cameras, Cameras):
        raise ShapeError(f"cameras: expected recon3d Cameras of batch shape (B={B}, V={V}), got {type(cameras).__name__}")
    if tuple(cameras.batch_shape) != (B, V):
        raise ShapeError(f"cameras: expected batch shape (B={B}, V={V}) to match images, got {list(cameras.batch_shape)}")
    if (cameras.width, cameras.height) != (W, H):
        cameras = cameras.resized(W, H)
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
    # Rays in float32 whatever the autocast state: under bf16 autocast the ray matmul would give
    # bf16 directions beside float32 origins, and the cross product refuses mixed dtypes.
    with torch.autocast(device_type=images.device.type, enabled=False):
        rays = plucker_embedding(cameras.to(images.device), convention="oxd", order="md")
    rays = rays.to(images.dtype)
    return torch.cat([(images - mean) / std, rays], dim=2)


def activate_gaussians(raw: torch.Tensor) -> Gaussians:
    """LGM's activations on raw outputs ``(B, V, 14, h, w)`` or ``(B, N, 14)`` → dense :class:`Gaussians` ``(B, N)``.

    ``N = V·h·w``, ordered view, row, column. Channels as :data:`LGM_CHANNELS`.
    """
    if raw.ndim == 5 and raw.shape[2] == GAUSSIAN_CHANNELS:
        raw = raw.permute(0, 1, 3, 4, 2).reshape(raw.shape[0], -1, GAUSSIAN_CHANNELS)
    elif not (raw.ndim == 3 and raw.shape[2] == GAUSSIAN_CHANNELS):
        raise ShapeError(f"raw: expected (B, V, {GAUSSIAN_CHANNELS}, h, w) or (B, N, {GAUSSIAN_CHANNELS}), got {list(raw.shape)}")
    c = LGM_CHANNELS
    return Gaussians(
        means=raw[..., c["pos"]].clamp(-1, 1),
        quats=F.normalize(raw[..., c["rot"]], dim=-1),
        scales=0.1 * F.softplus(raw[..., c["scale"]]),
        opacities=torch.sigmoid(raw[..., c["opacity"]]).squeeze(-1),
        colors=0.5 * torch.tanh(raw[..., c["rgb"]]) + 0.5,
    )


class LGMNetwork(nn.Module):
    """LGM: U-Net over posed views → dense Gaussians (module docstring).

    Args:
        preset: ``"big"`` (official weights), ``"small"``, ``"tiny"`` (CPU), or None to give every
            size explicitly. Explicit arguments override the preset's.
        down_channels, down_attention, mid_attention, up_channels, up_attention: U-Net layout
            (:class:`~recon3d.models.lgm.unet.LGMUNet`).
        num_views: views per object ``V`` the network accepts (LGM: 4); the attention is over all
            of them jointly.
        input_size: nominal input resolution (the preset's; any multiple of :attr:`size_divisor`
            runs), used by :attr:`num_gaussians`.
        layers_per_block, attention_heads, groups, eps, skip_scale: see ``LGMUNet`` (LGM: 2, 16,
            32, 1e-5, √0.5).

    Submodules ``unet`` and ``conv`` (1x1, 14 → 14) carry the official state-dict names.
    """

    def __init__(
        self,
        preset: str | None = "big",
        *,
        down_channels: Sequence[int] | None = None,
        down_attention: Sequence[bool] | None = None,
        mid_attention: bool | None = None,
        up_channels: Sequence[int] | None = None,
        up_attention: Sequence[bool] | None = None,
        num_views: int = 4,
        input_size: int | None = None,
        layers_per_block: int = 2,
        attention_heads: int = 16,
        groups: int = 32,
        eps: float = 1e-5,
        skip_scale: float = SKIP_SCALE,
    ):
        super().__init__()
        if preset is not None and preset not in LGM_PRESETS:
            raise ConfigError(f"preset: expected one of {sorted(LGM_PRESETS)} or None, got {preset!r}")
        cfg = dict(LGM_PRESETS[preset]) if preset is not None else {}
        given = dict(down_channels=down_channels, down_attention=down_attention, mid_attention=mid_attention,
                     up_channels=up_channels, up_attention=up_attention, input_size=input_size)
        cfg.update({k: v for k, v in given.items() if v is not None})
        need = [k for k in ("down_channels", "down_attention", "mid_attention", "up_channels", "up_attention") if k not in cfg]
        if need:
            raise ConfigError(f"LGMNetwork: preset=None needs {need}")
        if int(num_views) < 1:
            raise ConfigError(f"num_views: expected >= 1, got {num_views}")
        self.preset = preset
        self.num_views = int(num_views)
        self.config = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.items()}
        self.unet = LGMUNet(
            9, GAUSSIAN_CHANNELS,
            down_channels=cfg["down_channels"], down_attention=cfg["down_attention"], mid_attention=cfg["mid_attention"],
            up_channels=cfg["up_channels"], up_attention=cfg["up_attention"], layers_per_block=layers_per_block,
            attention_heads=attention_heads, num_views=self.num_views, groups=groups, eps=eps, skip_scale=skip_scale,
        )
        self.conv = nn.Conv2d(GAUSSIAN_CHANNELS, GAUSSIAN_CHANNELS, kernel_size=1)
        self.input_size = cfg.get("input_size")

    # ------------------------------------------------------------------ sizes
    @property
    def size_divisor(self) -> int:
        """Input H and W must be multiples of this (``2 ** number of downsamples``)."""
        return self.unet.size_divisor

    @property
    def output_stride(self) -> int:
        """Input size / Gaussian-grid size per view (big: 2, small: 4)."""
        return self.unet.output_stride

    def splat_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of the per-view Gaussian grid for ``height x width`` inputs."""
        return height // self.output_stride, width // self.output_stride

    @property
    def num_gaussians(self) -> int | None:
        """Gaussians per object at the nominal :attr:`input_size` (big: 65,536)."""
        if self.input_size is None:
            return None
        h, w = self.splat_size(self.input_size, self.input_size)
        return self.num_views * h * w

    # ------------------------------------------------------------------ forward
    def _check_features(self, features: torch.Tensor, name: str) -> None:
        if features.ndim != 5:
            raise ShapeError(f"{name}: expected (B, V={self.num_views}, C, H, W), got {list(features.shape)}")
        B, V, C, H, W = features.shape
        if V != self.num_views:
            raise ShapeError(f"{name}: expected V={self.num_views} views (the network's num_views), got {V} in shape {list(features.shape)}")
        d = self.size_divisor
        if H % d or W % d:
            raise ShapeError(f"{name}: expected H and W divisible by {d} (2**{int(math.log2(d))} downsamples), got {H}x{W}")

    def raw_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Input features ``(B, V, 9, H, W)`` → raw (pre-activation) outputs ``(B, V, 14, h, w)``."""
        self._check_features(features, "features")
        if features.shape[2] != 9:
            raise ShapeError(f"features: expected 9 channels (RGB, o x d, d), got {features.shape[2]}")
        B, V, C, H, W = features.shape
        x = self.conv(self.unet(features.reshape(B * V, C, H, W), num_views=V))
        return x.reshape(B, V, GAUSSIAN_CHANNELS, *x.shape[-2:])

    def raw(self, images: torch.Tensor, cameras: Cameras) -> torch.Tensor:
        """Raw (pre-activation) outputs ``(B, V, 14, h, w)`` for ``images (B, V, 3, H, W)``, ``cameras (B, V)``."""
        if isinstance(images, torch.Tensor) and images.ndim == 5:
            self._check_features(images, "images")
        return self.raw_from_features(lgm_input_features(images, cameras))

    def forward(self, images: torch.Tensor, cameras: Cameras) -> Gaussians:
        """``images (B, V, 3, H, W)`` in [0, 1], ``cameras (B, V)`` → dense :class:`Gaussians` ``(B, V·h·w)``."""
        return activate_gaussians(self.raw(images, cameras))


# ---------------------------------------------------------------------- frames
def _rotmat_to_quat(R: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(..., 4)`` ``(w, x, y, z)`` of rotation matrices ``(..., 3, 3)`` (largest-pivot method)."""
    m = R
    tr = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    cands = torch.stack([
        torch.stack([1 + tr, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2], m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
        torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], m[..., 1, 2] + m[..., 2, 1]], -1),
        torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1),
    ], -2)  # (..., 4, 4): row k is 4 q_k q (unnormalised); the row with the largest pivot is the stable one
    pivots = torch.stack([1 + tr, 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                          1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1)
    best = pivots.argmax(-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = F.normalize(q, dim=-1)
    return q * torch.where(q[..., :1] < 0, -1.0, 1.0)


def _quat_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], -1)


def normalize_cameras(cameras: Cameras, radius: float = LGM_CAM_RADIUS, reference: int = 0,
                      rescale: bool = False) -> tuple[Cameras, torch.Tensor]:
    """Re-express the world of each object so that view ``reference`` is LGM's canonical view 0.

    In OpenGL axes the reference camera ends at ``[0, 0, radius]`` with the identity rotation
    (OpenCV: rotation ``diag(1, -1, -1)``), as ``core/provider_objaverse.py`` does. The transform
    applies to the **world** (every camera of the object, and the scene, hence the Gaussians
    predicted from these cameras), not to the cameras alone: render the Gaussians from cameras
    normalised with the same transform (``apply`` it to supervision views too, e.g. normalise
    input and target cameras together in one call), and map them to the dataset's world with
    ``transform_gaussians(g, torch.linalg.inv(world_to_canonical))``.

    Args:
        cameras: ``(B, V)`` cameras of ``B`` objects (all views to be used: inputs and targets).
        radius: distance of the normalised reference camera from the origin (LGM: 1.5).
        reference: which view becomes the canonical one (LGM: the first input view).
        rescale: also scale the world by ``radius / |centre_ref|`` so the world origin lands on
            the canonical origin (a similarity; LGM's data was rendered at distance 1.5, where this
            is the identity scale). Without it the transform is rigid and the world origin lands
            at ``[0, 0, radius - |centre_ref|]`` in the canonical frame.

    Returns:
        ``(normalised cameras (B, V), world_to_canonical (B, 4, 4))`` with
        ``x_canonical = world_to_canonical @ x_world`` (homogeneous points).
    """
    if not isinstance(cameras, Cameras) or len(cameras.batch_shape) != 2:
        got = list(cameras.batch_shape) if isinstance(cameras, Cameras) else type(cameras).__name__
        raise ShapeError(f"cameras: expected Cameras of batch shape (B, V), got {got}")
    B, V = cameras.batch_shape
    if not -V <= reference < V:
        raise ShapeError(f"reference: expected a view index in [0, {V}), got {reference}")
    c2w = cameras.c2w
    R_ref = c2w[:, reference, :3, :3] @ OPENGL_TO_OPENCV[:3, :3].to(c2w)  # OpenGL rotation of the reference (B, 3, 3)
    c_ref = c2w[:, reference, :3, 3]
    scale = radius / c_ref.norm(dim=-1).clamp_min(1e-12) if rescale else torch.ones(B, dtype=c2w.dtype, device=c2w.device)
    Rt = R_ref.transpose(-1, -2)
    offset = torch.zeros(B, 3, dtype=c2w.dtype, device=c2w.device)
    offset[:, 2] = radius
    T = torch.zeros(B, 4, 4, dtype=c2w.dtype, device=c2w.device)
    T[:, :3, :3] = scale[:, None, None] * Rt
    T[:, :3, 3] = -scale[:, None] * (Rt @ c_ref[..., None])[..., 0] + offset
    T[:, 3, 3] = 1
    new = torch.zeros_like(c2w)
    new[..., :3, :3] = Rt[:, None] @ c2w[..., :3, :3]  # rotations stay rotations under the similarity
    new[..., :3, 3] = (T[:, None, :3, :3] @ c2w[..., :3, 3:])[..., 0] + T[:, None, :3, 3]
    new[..., 3, 3] = 1
    return Cameras(new, cameras.K.clone(), cameras.width, cameras.height, cameras.projection), T


def transform_gaussians(gaussians: Gaussians, transform: torch.Tensor) -> Gaussians:
    """Apply a per-object similarity ``transform (B, 4, 4)`` (``s·R | t``) to dense or packed Gaussians.

    Means map as points, rotations compose with ``R``, scales multiply by ``s``; opacities and RGB
    colours are unchanged (SH colours above degree 0 would need rotating and are refused).
    """
    B = gaussians.batch_size
    if tuple(transform.shape) != (B, 4, 4):
        raise ShapeError(f"transform: expected ({B}, 4, 4) for {B} objects, got {list(transform.shape)}")
    if gaussians.sh_degree not in (None, 0):
        raise ShapeError(f"gaussians: SH colours of degree {gaussians.sh_degree} would need rotating; only RGB or degree 0 is supported")
    A = transform[:, :3, :3].to(gaussians.means)
    s = torch.linalg.det(A).abs().clamp_min(1e-30) ** (1.0 / 3.0)
    R = A / s[:, None, None]
    t = transform[:, :3, 3].to(gaussians.means)
    q = _rotmat_to_quat(R)
    if gaussians.is_packed:
        idx = torch.repeat_interleave(torch.arange(B), gaussians.counts).to(gaussians.means.device)
        A_, t_, q_, s_ = A[idx], t[idx], q[idx], s[idx]
        means = (A_ @ gaussians.means[..., None])[..., 0] + t_
        quats = _quat_mul(q_, F.normalize(gaussians.quats, dim=-1))
        scales = gaussians.scales * s_[:, None]
    else:
        means = gaussians.means @ A.transpose(-1, -2) + t[:, None]
        quats = _quat_mul(q[:, None].expand_as(gaussians.quats), F.normalize(gaussians.quats, dim=-1))
        scales = gaussians.scales * s[:, None, None]
    return Gaussians(means, quats, scales, gaussians.opacities, gaussians.colors, gaussians.sh_degree,
                     gaussians.counts if gaussians.is_packed else None)


def lgm_orbit_cameras(azimuth_deg: Sequence[float] | torch.Tensor = (0.0, 90.0, 180.0, 270.0), elevation_deg: float = 0.0,
                      radius: float = LGM_CAM_RADIUS, size: int = 256, fov_y_deg: float = LGM_FOVY_DEG) -> Cameras:
    """LGM's default input cameras (``prepare_default_rays``, kiui's ``orbit_camera``) as recon3d cameras ``(N,)``.

    World +y up; azimuth 0 is the camera at ``[0, 0, radius]`` (LGM's canonical view 0), azimuth 90
    at ``[radius, 0, 0]``; kiui's elevation sign: **negative** elevation looks from above
    (``y = -radius · sin(elevation)``). ``size x size`` images. Add a batch axis with ``[None]``.
    """
    az = torch.deg2rad(torch.as_tensor(azimuth_deg, dtype=torch.float32)).reshape(-1)
    el = torch.deg2rad(torch.as_tensor(float(elevation_deg), dtype=torch.float32)).expand_as(az)
    eye = torch.stack([radius * torch.cos(el) * torch.sin(az), -radius * torch.sin(el), radius * torch.cos(el) * torch.cos(az)], -1)
    c2w = look_at(eye, None, torch.tensor([0.0, 1.0, 0.0]))
    K = intrinsics_from_fov(fov_y_deg, size, size).expand(len(az), 3, 3).clone()
    return Cameras(c2w, K, size, size)
