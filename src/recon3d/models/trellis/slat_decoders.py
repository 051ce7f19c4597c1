"""TRELLIS's SLAT decoders: structured latents -> 3-D Gaussians and -> a mesh.

Upstream (microsoft/TRELLIS @ 6b0d647, MIT): ``trellis/models/structured_latent_vae/{decoder_gs,decoder_mesh}.py``,
``trellis/representations/gaussian/gaussian_model.py`` (the activations) and
``trellis/representations/mesh/{cube2mesh,utils_cube}.py`` (the mesh features' layout). Both decoders
are a :class:`~recon3d.models.trellis.slat_vae.SparseTransformerBase` torso (swin windows of 8 at
64^3) over the latent ``feats (N, 8)``, named and initialised as upstream.

**Gaussian decoder** (:class:`SLatGaussianDecoder`, released ``slat_dec_gs_swin8_B_64l8gs32_fp16``):
torso -> non-affine LayerNorm -> ``out_layer`` SparseLinear(C, 14 G) with ``G = num_gaussians``
(32) Gaussians per voxel; channel blocks in upstream's order ``_xyz (G, 3)``, ``_features_dc
(G, 1, 3)``, ``_scaling (G, 3)``, ``_rotation (G, 4)``, ``_opacity (G, 1)``, each multiplied by
its ``lr`` of the representation config. TRELLIS's activations, for a voxel at integer ``c`` of
the ``R^3`` grid (``v`` = voxel_size 1.5, ``k`` = 3d_filter_kernel_size 9e-4)::

    xyz      = (c + 0.5) / R + tanh(o_xyz + offset_perturbation) * 0.5 * v / R      in [0, 1]^3 (TRELLIS)
    world    = xyz - 0.5                                                          in [-0.5, 0.5]^3
    scale    = sqrt(softplus(o_s + softplus^-1(scaling_bias))^2 + k^2)            ("exp": exp / log)
    rotation = normalize(o_r + (1, 0, 0, 0))                                      (w, x, y, z)
    opacity  = sigmoid(o_a + logit(opacity_bias))
    colour   = o_dc, the degree-0 SH coefficient (rgb = 0.5 + C0 * o_dc)

``offset_perturbation (G, 3)`` is the persistent buffer ``atanh((2 h_g - 1) / v)`` of the 3-D
Hammersley points ``h_g = (g / G, radical_inverse_2(g), radical_inverse_3(g))`` (added only with
``perturb_offset``). :meth:`SLatGaussianDecoder.to_gaussians` returns recon3d's packed
:class:`~recon3d.representations.Gaussians` with ``means = world * scale`` and ``scales * scale``:
the default ``scale = 2`` maps TRELLIS's ``[-0.5, 0.5]^3`` box onto recon3d's ``[-1, 1]^3``
(axes unchanged, Z up as TRELLIS; a method converts cameras at its edge).

**Mesh decoder** (:class:`SLatMeshDecoder`, released ``slat_dec_mesh_swin8_B_64l8m256c_fp16``): torso
-> two :class:`SparseSubdivideBlock3d` (64^3 -> 128^3 -> 256^3, C -> C/4 -> C/8; GroupNorm(32),
SiLU, 3^3 submanifold convs, 1^3 conv skip with spconv's weight reading, :class:`SpconvSparseConv1x1`) -> ``out_layer`` SparseLinear(C/8, 53 or 101): per
256^3 cube ``sdf (8)`` at its corners, ``deform (8, 3)``, FlexiCubes ``weights (21)`` and with
``use_color`` ``color (8, 6)`` (RGB + normal map). No final LayerNorm (upstream has none here).

*Extraction* (:meth:`SLatMeshDecoder.to_meshes`) follows upstream's ``SparseFeatures2Mesh`` up to
the iso-surface: SDF += ``-1 / 256``; corner values averaged over the cubes that share a grid
vertex; vertices of no cube are outside (SDF 1); vertex positions ``v / 256 - 0.5 +
(1 - 1e-8) / 512 * tanh(deform)``. The surface is then **marching cubes** on that vertex SDF
(recon3d's torch :func:`~recon3d.geometry.marching_cubes`, differentiable), each vertex placed by
interpolating the deformed positions (and colours) along its grid edge — **not FlexiCubes**:
upstream's FlexiCubes is a dual method (one vertex per cube, placed with the 21 learnt
``beta/alpha/gamma`` weights, quads split by ``gamma``); here the weights are unused, vertices sit
on cube edges, and the triangle count and the finest detail differ (the SDF, the deformation and
the colours are the decoder's own). Colours are the first three ``color`` channels clamped to
[0, 1] (upstream renders them unclamped); the normal-map channels are not kept. Upstream's
training-time terms of the extractor (FlexiCubes' ``L_dev``, the L1 of the weights, the
corner-consistency loss) are not computed here. Memory: only the SDF is dense over each object's
bounding box (measured: a 128^3 ball of 180k cubes extracts in 1.2 s on one CPU thread).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.errors import ConfigError, ShapeError
from recon3d.geometry import EmptySurfaceError, marching_cubes
from recon3d.models.sparse import SparseGroupNorm, SparseLinear, SparseSubdivide, SparseSubMConv3d
from recon3d.models.trellis.modules import zero_module
from recon3d.models.trellis.slat_vae import SparseTransformerBase
from recon3d.models.trellis.sparse_blocks import convert_sparse_module_to_f16, convert_sparse_module_to_f32
from recon3d.representations import Gaussians, Meshes, SparseVoxels

__all__ = ["SLatGaussianDecoder", "SLatMeshDecoder", "SparseSubdivideBlock3d", "SpconvSparseConv1x1", "GAUSSIAN_REPRESENTATION_DEFAULTS",
           "hammersley_points", "MESH_LAYOUT"]

#: The released Gaussian decoder's ``representation_config`` (slat_vae_enc_dec_gs_swin8_B_64l8_fp16.json).
GAUSSIAN_REPRESENTATION_DEFAULTS: dict = {
    "lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1},
    "perturb_offset": True, "voxel_size": 1.5, "num_gaussians": 32, "2d_filter_kernel_size": 0.1,
    "3d_filter_kernel_size": 9e-4, "scaling_bias": 4e-3, "opacity_bias": 0.1, "scaling_activation": "softplus",
}

_GS_FIELDS = (("_xyz", (3,)), ("_features_dc", (1, 3)), ("_scaling", (3,)), ("_rotation", (4,)), ("_opacity", (1,)))


def _radical_inverse(base: int, n: int) -> float:
    """The base-``base`` digits of ``n`` mirrored behind the radix point (van der Corput)."""
    value, scale = 0.0, 1.0 / base
    while n > 0:
        n, digit = divmod(n, base)
        value += digit * scale
        scale /= base
    return value


def hammersley_points(num: int) -> torch.Tensor:
    """``(num, 3)`` float64 3-D Hammersley points ``(i / num, radical_inverse_2(i), radical_inverse_3(i))``."""
    return torch.tensor([[i / num, _radical_inverse(2, i), _radical_inverse(3, i)] for i in range(num)], dtype=torch.float64,
                        device="cpu")


def _inverse_softplus(y: float) -> float:
    """``x`` with ``softplus(x) = y``: ``y + log(1 - exp(-y))`` (float64)."""
    return float(y + torch.log(-torch.expm1(-torch.tensor(y, dtype=torch.float64))))


class SLatGaussianDecoder(SparseTransformerBase):
    """SLAT -> ``num_gaussians`` 3-D Gaussians per voxel (module docstring); upstream's args.

    Args (besides :class:`SparseTransformerBase`'s): resolution ``R`` (64), latent_channels (8),
    representation_config (upstream's dict; None: :data:`GAUSSIAN_REPRESENTATION_DEFAULTS`, the
    released one). Defaults ``attn_mode="swin"``, ``window_size=8``; ``out_layer`` starts at zero.

    ``forward(x feats (N, L)) -> SparseVoxels feats (N, 14 G)`` (the raw, lr-unscaled outputs);
    :meth:`activations` gives TRELLIS's activated attributes, :meth:`to_gaussians` recon3d's
    :class:`Gaussians`, :meth:`decode` both steps.
    """

    def __init__(self, resolution: int, model_channels: int, latent_channels: int, num_blocks: int,
                 num_heads: int | None = None, num_head_channels: int | None = 64, mlp_ratio: float = 4,
                 attn_mode: str = "swin", window_size: int = 8, pe_mode: str = "ape", use_fp16: bool = False,
                 use_checkpoint: bool = False, qk_rms_norm: bool = False, representation_config: dict | None = None,
                 attn_backend: str = "auto"):
        super().__init__(latent_channels, model_channels, num_blocks, num_heads, num_head_channels, mlp_ratio, attn_mode,
                         window_size, pe_mode, use_fp16, use_checkpoint, qk_rms_norm, attn_backend)
        cfg = copy.deepcopy(GAUSSIAN_REPRESENTATION_DEFAULTS if representation_config is None else representation_config)
        need = ("lr", "perturb_offset", "voxel_size", "num_gaussians", "3d_filter_kernel_size", "scaling_bias",
                "opacity_bias", "scaling_activation")
        missing = [k for k in need if k not in cfg] + [f"lr.{k}" for k, _ in _GS_FIELDS if k not in cfg.get("lr", {})]
        if missing:
            raise ConfigError(f"representation_config: missing {missing} (upstream's Gaussian decoder config)")
        if cfg["scaling_activation"] not in ("softplus", "exp"):
            raise ConfigError(f"representation_config.scaling_activation: expected 'softplus' or 'exp', got {cfg['scaling_activation']!r}")
        self.resolution, self.latent_channels, self.rep_config = resolution, latent_channels, cfg
        g = int(cfg["num_gaussians"])
        self.num_gaussians = g
        self.layout, start = {}, 0
        for name, shape in _GS_FIELDS:
            size = g * math.prod(shape)
            self.layout[name] = {"shape": (g, *shape), "range": (start, start + size)}
            start += size
        self.out_channels = start
        self.out_layer = SparseLinear(model_channels, self.out_channels)
        # computed on the CPU even inside a meta-device context (a tiny constant; meta math on it is slow)
        pert = torch.atanh((hammersley_points(g) * 2 - 1) / cfg["voxel_size"]).float()
        self.register_buffer("offset_perturbation", pert)
        self.initialize_weights()
        if self.out_layer.weight.device.type != "meta":
            nn.init.zeros_(self.out_layer.weight)
            nn.init.zeros_(self.out_layer.bias)
        if use_fp16:
            self.convert_to_fp16()

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        """``x`` latent voxels ``feats (N, L)`` -> the same voxels with the raw ``feats (N, 14 G)``."""
        h = self.forward_torso(x)
        f = F.layer_norm(h.feats.to(x.feats.dtype), h.feats.shape[-1:])
        return self.out_layer(x.replace(feats=f))

    def _field(self, h: SparseVoxels, name: str) -> torch.Tensor:
        a, b = self.layout[name]["range"]
        return h.feats[:, a:b].reshape(-1, *self.layout[name]["shape"]) * self.rep_config["lr"][name]

    def activations(self, h: SparseVoxels) -> dict[str, torch.Tensor]:
        """TRELLIS's activated attributes of :meth:`forward`'s output, Gaussians voxel-major
        (voxel ``i``'s ``G`` Gaussians at rows ``i G .. i G + G - 1``), ``M = N G``:
        ``xyz (M, 3)`` in [0, 1]^3, ``world (M, 3)`` = xyz - 0.5, ``features_dc (M, 1, 3)``,
        ``scaling (M, 3)``, ``rotation (M, 4)`` unit wxyz, ``opacity (M, 1)``."""
        if h.num_channels != self.out_channels:
            raise ShapeError(f"h.feats: expected the decoder's {self.out_channels} output channels, got {h.num_channels}")
        cfg, res = self.rep_config, self.resolution
        centre = (h.coords[:, 1:].to(h.feats.dtype) + 0.5) / res
        off = self._field(h, "_xyz")
        if cfg["perturb_offset"]:
            off = off + self.offset_perturbation.to(off.dtype)
        xyz = (centre[:, None] + torch.tanh(off) / res * 0.5 * cfg["voxel_size"]).flatten(0, 1)
        if cfg["scaling_activation"] == "softplus":
            s = F.softplus(self._field(h, "_scaling") + _inverse_softplus(cfg["scaling_bias"]))
        else:
            s = torch.exp(self._field(h, "_scaling") + float(torch.log(torch.tensor(cfg["scaling_bias"], dtype=torch.float64))))
        scaling = torch.sqrt(s.square() + cfg["3d_filter_kernel_size"] ** 2).flatten(0, 1)
        rot_bias = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=h.feats.dtype, device=h.feats.device)
        rotation = F.normalize(self._field(h, "_rotation") + rot_bias, dim=-1).flatten(0, 1)
        ob = float(torch.logit(torch.tensor(cfg["opacity_bias"], dtype=torch.float64)))
        opacity = torch.sigmoid(self._field(h, "_opacity") + ob).flatten(0, 1)
        return {"xyz": xyz, "world": xyz - 0.5, "features_dc": self._field(h, "_features_dc").flatten(0, 1),
                "scaling": scaling, "rotation": rotation, "opacity": opacity}

    def to_gaussians(self, h: SparseVoxels, scale: float = 2.0) -> Gaussians:
        """:meth:`forward`'s output -> packed :class:`Gaussians` (``counts = G x`` voxels per object):
        ``means = (xyz - 0.5) * scale``, ``scales * scale``, quats wxyz, opacities ``(M,)``,
        colours the DC SH coefficients ``(M, 1, 3)`` (``sh_degree=0``). ``scale=2``: TRELLIS's
        ``[-0.5, 0.5]^3`` -> recon3d's ``[-1, 1]^3`` (module docstring)."""
        a = self.activations(h)
        return Gaussians(means=a["world"] * scale, quats=a["rotation"], scales=a["scaling"] * scale,
                         opacities=a["opacity"][:, 0], colors=a["features_dc"], sh_degree=0,
                         counts=h.counts * self.num_gaussians)

    def decode(self, x: SparseVoxels, scale: float = 2.0) -> Gaussians:
        """Latent voxels -> recon3d :class:`Gaussians` (``forward`` then ``to_gaussians``)."""
        return self.to_gaussians(self(x), scale)


# ------------------------------------------------------------------------------------- mesh
#: Channel layout of the mesh decoder's output per cube (upstream's ``SparseFeatures2Mesh``):
#: name -> (start, stop, per-cube shape); ``color`` only with ``use_color``.
MESH_LAYOUT = {"sdf": (0, 8, (8, 1)), "deform": (8, 32, (8, 3)), "weights": (32, 53, (21,)), "color": (53, 101, (8, 6))}

#: Cube corner ``j`` = ``(j & 1, (j >> 1) & 1, j >> 2)`` (x fastest), upstream's ``cube_corners``.
_CUBE_CORNERS = torch.tensor([[j & 1, (j >> 1) & 1, j >> 2] for j in range(8)], dtype=torch.int64)


class _SparseSiLU(nn.Module):
    def forward(self, x: SparseVoxels) -> SparseVoxels:
        return x.replace(feats=F.silu(x.feats))


class SpconvSparseConv1x1(SparseSubMConv3d):
    """A 1^3 sparse conv computed as spconv 2.x computes it, which the released mesh decoder was
    trained with (upstream's default sparse backend): spconv's 1x1 path multiplies by
    ``weight.view(Ci, Co)`` — the stored ``(Co, 1, 1, 1, Ci)`` memory read as ``(Ci, Co)``, not
    the transpose of ``(Co, Ci)`` (measured on spconv 2.3.8: upstream's tiny mesh decoder equals
    ``feats @ weight.reshape(Ci, Co) + bias`` exactly, and differs from the mathematical 1x1 conv
    by 190 on an output of 121). Keys and shapes stay spconv's (``conv.weight (Co, 1, 1, 1, Ci)``).

    ``forward(feats (N, Ci)) -> (N, Co)``, same voxels.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias, backend="torch")

    def forward(self, voxels: SparseVoxels) -> SparseVoxels:
        w = self.conv.weight.reshape(self.in_channels, self.out_channels)
        f = voxels.feats @ w.to(voxels.feats.dtype)
        if self.conv.bias is not None:
            f = f + self.conv.bias.to(f.dtype)
        return voxels.replace(feats=f)


class SparseSubdivideBlock3d(nn.Module):
    """Subdivide (each voxel -> 8 children, resolution x2) then a residual conv block, upstream's.

    ``h = out_layers(subdivide(act_layers(x)))``, ``out = h + skip_connection(subdivide(x))``;
    ``act_layers`` = GroupNorm(num_groups, Ci) per object + SiLU; ``out_layers`` = conv 3^3 (Ci->Co),
    GroupNorm, SiLU, zero-init conv 3^3; skip = 1^3 conv when ``Ci != Co`` (:class:`SpconvSparseConv1x1`,
    spconv's arithmetic, which the released weights expect).
    ``forward(x feats (N, Ci)) -> feats (8N, Co)`` on the ``2 resolution`` grid.
    """

    def __init__(self, channels: int, resolution: int, out_channels: int | None = None, num_groups: int = 32,
                 conv_backend: str = "auto"):
        super().__init__()
        self.channels, self.resolution, self.out_resolution = channels, resolution, resolution * 2
        self.out_channels = out_channels or channels
        co = self.out_channels
        for name, c in (("channels", channels), ("out_channels", co)):
            if c % num_groups:
                raise ConfigError(f"{name}: GroupNorm({num_groups}) needs a multiple of {num_groups}, got {c}")
        self.act_layers = nn.Sequential(SparseGroupNorm(num_groups, channels), _SparseSiLU())
        self.sub = SparseSubdivide()
        self.out_layers = nn.Sequential(SparseSubMConv3d(channels, co, 3, backend=conv_backend), SparseGroupNorm(num_groups, co),
                                        _SparseSiLU(), zero_module(SparseSubMConv3d(co, co, 3, backend=conv_backend)))
        self.skip_connection = nn.Identity() if co == channels else SpconvSparseConv1x1(channels, co)

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        if x.num_channels != self.channels:
            raise ShapeError(f"x.feats: expected {self.channels} channels, got {x.num_channels}")
        h = self.out_layers(self.sub(self.act_layers(x)))
        x = self.sub(x)
        return h.replace(feats=h.feats + self.skip_connection(x).feats)


def _edge_interp(table: torch.Tensor, vid: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of per-vertex rows ``table (Nv, F)`` at index-space points ``p (V, 3)``
    of the vertex grid ``vid (X, Y, Z)`` (row of each grid vertex, -1 where none: value 0) ->
    ``(V, F)``. On a grid edge (marching-cubes vertices) it is the linear interpolation between the
    edge's two ends."""
    hi = torch.tensor(vid.shape, device=p.device) - 2
    i0 = torch.minimum(p.detach().floor().long().clamp_min(0), hi)
    f = p - i0.to(p.dtype)
    padded = torch.cat([table, table.new_zeros(1, table.shape[1])])  # row -1 -> the zero row
    out = 0
    for j in range(8):
        o = _CUBE_CORNERS[j].to(p.device)
        w = torch.prod(torch.where(o.bool(), f, 1 - f), dim=-1, keepdim=True)
        i = i0 + o
        out = out + w * padded[vid[i[:, 0], i[:, 1], i[:, 2]]]
    return out


class SLatMeshDecoder(SparseTransformerBase):
    """SLAT -> per-cube FlexiCubes features at ``4 R`` resolution -> marching-cubes mesh (module docstring).

    Args (besides :class:`SparseTransformerBase`'s): resolution ``R`` (64), latent_channels (8),
    representation_config (``{"use_color": bool}``, upstream's; default no colour).
    ``model_channels`` must make ``C/4`` and ``C/8`` multiples of 32 (the subdivide blocks' GroupNorm).

    ``forward(x feats (N, L)) -> SparseVoxels`` on the ``4R`` grid with ``feats (64 N, 53 | 101)``;
    :meth:`to_meshes` extracts recon3d :class:`Meshes`; :meth:`decode` both steps.
    """

    def __init__(self, resolution: int, model_channels: int, latent_channels: int, num_blocks: int,
                 num_heads: int | None = None, num_head_channels: int | None = 64, mlp_ratio: float = 4,
                 attn_mode: str = "swin", window_size: int = 8, pe_mode: str = "ape", use_fp16: bool = False,
                 use_checkpoint: bool = False, qk_rms_norm: bool = False, representation_config: dict | None = None,
                 attn_backend: str = "auto", conv_backend: str = "auto"):
        super().__init__(latent_channels, model_channels, num_blocks, num_heads, num_head_channels, mlp_ratio, attn_mode,
                         window_size, pe_mode, use_fp16, use_checkpoint, qk_rms_norm, attn_backend)
        self.resolution, self.latent_channels = resolution, latent_channels
        self.rep_config = dict(representation_config or {})
        self.use_color = bool(self.rep_config.get("use_color", False))
        self.mesh_resolution = resolution * 4
        self.out_channels = 101 if self.use_color else 53
        self.upsample = nn.ModuleList([
            SparseSubdivideBlock3d(model_channels, resolution, model_channels // 4, conv_backend=conv_backend),
            SparseSubdivideBlock3d(model_channels // 4, resolution * 2, model_channels // 8, conv_backend=conv_backend)])
        self.out_layer = SparseLinear(model_channels // 8, self.out_channels)
        self.initialize_weights()
        if self.out_layer.weight.device.type != "meta":
            nn.init.zeros_(self.out_layer.weight)
            nn.init.zeros_(self.out_layer.bias)
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        super().convert_to_fp16()
        self.upsample.apply(convert_sparse_module_to_f16)

    def convert_to_fp32(self) -> None:
        super().convert_to_fp32()
        self.upsample.apply(convert_sparse_module_to_f32)

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        """Latent voxels ``feats (N, L)`` at ``R^3`` -> cube features ``(64 N, 53 | 101)`` at ``(4R)^3``
        (each voxel's 64 descendants consecutive, in :class:`~recon3d.models.sparse.SparseSubdivide`'s order)."""
        h = self.forward_torso(x)
        for block in self.upsample:
            h = block(h)
        return self.out_layer(h.replace(feats=h.feats.to(x.feats.dtype)))

    def _field(self, feats: torch.Tensor, name: str) -> torch.Tensor:
        a, b, shape = MESH_LAYOUT[name]
        return feats[:, a:b].reshape(-1, *shape)

    def vertex_fields(self, cubes: SparseVoxels, i: int) -> dict:
        """Object ``i`` of :meth:`forward`'s output on its grid vertices (module docstring).

        Returns ``lo (3,)`` int64 (first vertex of the bounding box, one vertex of margin),
        ``sdf (X, Y, Z)`` dense over the box (1 = outside where no cube touches a vertex),
        ``vid (X, Y, Z)`` int64 row of each box vertex in the tables below (-1: none),
        ``offset (Nv, 3)`` = ``(1 - 1e-8) / (2 res) * tanh(deform)`` (TRELLIS units) and
        ``color (Nv, 6)`` or None: the mean over the cubes sharing each vertex, as upstream.
        Only the SDF is dense, so a 256^3 object needs one float and one index per box vertex.
        """
        if cubes.num_channels != self.out_channels:
            raise ShapeError(f"cubes.feats: expected the decoder's {self.out_channels} output channels, got {cubes.num_channels}")
        res = self.mesh_resolution
        obj = cubes[i]
        c = obj.coords[:, 1:].long()
        feats = obj.feats.float()
        attrs = [self._field(feats, "sdf") - 1.0 / res, self._field(feats, "deform")]
        if self.use_color:
            attrs.append(self._field(feats, "color"))
        attrs = torch.cat(attrs, dim=-1)  # (n, 8, 1 + 3 [+ 6])
        if c.numel():
            lo, hi = (c.min(0).values - 1).clamp_min(0), (c.max(0).values + 2).clamp_max(res)
        else:
            lo, hi = torch.zeros(3, dtype=torch.int64, device=c.device), torch.ones(3, dtype=torch.int64, device=c.device)
        dims = (hi - lo + 1).tolist()
        corners = (c[:, None, :] + _CUBE_CORNERS.to(c.device)[None] - lo).reshape(-1, 3)
        flat = (corners * torch.tensor([dims[1] * dims[2], dims[2], 1], device=c.device)).sum(-1)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        # mean over the cubes sharing a vertex (upstream: scatter_reduce mean, include_self=False)
        total = attrs.new_zeros(uniq.numel(), attrs.shape[-1]).index_add_(0, inverse, attrs.reshape(-1, attrs.shape[-1]))
        mean = total / torch.bincount(inverse, minlength=uniq.numel()).to(attrs.dtype)[:, None]
        sdf = attrs.new_ones(dims[0] * dims[1] * dims[2])
        sdf[uniq] = mean[:, 0]
        vid = torch.full((dims[0] * dims[1] * dims[2],), -1, dtype=torch.int64, device=c.device)
        vid[uniq] = torch.arange(uniq.numel(), device=c.device)
        return {"lo": lo, "sdf": sdf.reshape(dims), "vid": vid.reshape(dims),
                "offset": (1 - 1e-8) / (res * 2) * torch.tanh(mean[:, 1:4]),
                "color": mean[:, 4:10] if self.use_color else None}

    def to_meshes(self, cubes: SparseVoxels, scale: float = 2.0) -> Meshes:
        """:meth:`forward`'s output -> one mesh per object by marching cubes (module docstring):
        vertices ``positions * scale`` (``scale=2``: TRELLIS's ``[-0.5, 0.5]^3`` -> recon3d's
        ``[-1, 1]^3``), faces counter-clockwise from outside, vertex colours with ``use_color``.
        An object whose SDF has no zero crossing gets an empty mesh (0 vertices, 0 faces)."""
        res = self.mesh_resolution
        verts, faces, colors = [], [], []
        for i in range(cubes.batch_size):
            fields = self.vertex_fields(cubes, i)
            sdf = fields["sdf"]
            box = torch.stack([torch.zeros(3), torch.tensor(sdf.shape) - 1.0]).to(sdf)
            try:
                p, f = marching_cubes(sdf, aabb=box)  # vertices in the box's vertex-index units
            except EmptySurfaceError:
                verts.append(sdf.new_zeros(0, 3))
                faces.append(torch.zeros(0, 3, dtype=torch.int64, device=sdf.device))
                colors.append(sdf.new_zeros(0, 3))
                continue
            # position is affine in the vertex index plus the interpolated deformation offset
            pos = (p + fields["lo"].to(p)) / res - 0.5 + _edge_interp(fields["offset"], fields["vid"], p)
            verts.append(pos * scale)
            faces.append(f)
            if self.use_color:
                colors.append(_edge_interp(fields["color"][:, :3], fields["vid"], p).clamp(0, 1))
        return Meshes(verts, faces, colors if self.use_color else None)

    def decode(self, x: SparseVoxels, scale: float = 2.0) -> Meshes:
        """Latent voxels -> recon3d :class:`Meshes` (``forward`` then ``to_meshes``)."""
        return self.to_meshes(self(x), scale)
