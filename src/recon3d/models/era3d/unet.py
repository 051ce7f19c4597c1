"""Era3D's multi-view UNet (``UNetMV2DConditionModel``), written for recon3d on current diffusers blocks.

Era3D (Li et al. 2024, pengHTYX/Era3D) fine-tunes the Stable-Diffusion-2.1-unCLIP UNet to denoise
six views of an object jointly, normals and colours together. recon3d cannot import upstream's
class (it needs diffusers 0.26, and its code is AGPL-3.0), so this module re-implements the
architecture from its description, on diffusers' ``ResnetBlock2D``, ``Downsample2D``/``Upsample2D``,
``DownBlock2D``/``UpBlock2D``, ``Attention``, ``FeedForward``, ``Timesteps``/``TimestepEmbedding``,
with **upstream's module names**, so the released ``unet`` weights load strictly
(:mod:`recon3d.models.era3d.pretrained`; the layout is checked against a manifest generated from
upstream's own classes, ``scripts/make_era3d_manifest.py``).

Layout (SD-2.1-unCLIP; paper sizes in brackets):

- input ``(N, 8, h, w)`` = noisy latent (4) ‖ VAE latent of the input view (4); ``h = w = 64``.
- time: sinusoidal ``Timesteps(C0)`` → ``time_embedding`` (``TimestepEmbedding(C0, 4 C0)``);
  ``class_labels (N, 2048)`` = CLIP image embedding (1024) ‖ sinusoidal noise-level embedding (1024)
  → ``class_embedding`` (``TimestepEmbedding(2048, 4 C0)``), added to the time embedding.
- ``down_blocks``: cross-attention blocks at every level but the last (resnet, then a multi-view
  transformer, per layer), a plain ``DownBlock2D`` last; ``mid_block``; ``up_blocks`` mirrored.
- each multi-view transformer block (``transformer_blocks.0``) runs, each pre-normed and residual:
  ``attn1`` **cross-domain joint self-attention** (view ``i``'s normal tokens and colour tokens attend
  over both: ``(2M, L, C) → (M, 2L, C)``), ``attn_mv`` **row-wise multi-view attention** (row ``r`` of
  every view attends over row ``r`` of all ``V`` views: ``(b v)(h w)c → (b h)(v w)c``; Era3D's
  canonical orthographic views at elevation 0 share epipolar lines along image rows), ``attn2``
  cross-attention to the per-view prompt embedding, ``ff`` GEGLU feed-forward.
- with ``regress_elevation`` / ``regress_focal_length`` (the default ``-6view`` release): after
  the mid block, the pooled features of each normal/colour pair (``(N/2, 2 C)``) regress the input
  view's elevation and focal length (``elevation_regressor``, ``focal_regressor``: residual MLPs,
  hidden 1280), averaged over the views; ``camera_embedding(sin ‖ cos)`` is added to the
  up-blocks' time embedding. The ``-ortho`` release has neither.

Batch layout (required by the two attentions): ``N = 2 · b · V`` rows, the first half normals and
the second half colours, each half ``(b, V)`` row-major (object-major, then view). The pipeline's
classifier-free-guidance batch ``[uncond normals, normals, uncond colours, colours]`` fits it with
``b = 2 B``: the joint attention pairs row ``i`` of the first half with row ``i`` of the second,
i.e. an unconditional normal with its unconditional colour.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (the same
``softmax(q kᵀ / √d) v`` as upstream's xFormers path, which is what Era3D runs at inference;
upstream's non-xFormers joint processor is broken, see the manifest script). ``upcast_attention``
computes attention in float32 for half-precision inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.unets.unet_2d_blocks import DownBlock2D, UpBlock2D
from torch import nn

from recon3d.errors import ConfigError, ShapeError

__all__ = ["Era3DUNetConfig", "ERA3D_PRESETS", "Era3DUNet", "rowwise_attention", "joint_domain_attention"]


@dataclass(frozen=True)
class Era3DUNetConfig:
    """Sizes and switches of :class:`Era3DUNet` (defaults: the released ``MacLab-Era3D-512-6view`` UNet).

    ``num_heads`` is what diffusers' SD configs call ``attention_head_dim`` (heads per level; the
    head width is ``channels / heads`` = 64 at paper size), the naming quirk upstream keeps.
    """

    in_channels: int = 8
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    num_heads: tuple[int, ...] = (5, 10, 20, 20)
    cross_attention_dim: int = 1024
    class_embed_input_dim: int = 2048
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = True
    upcast_attention: bool = True
    num_views: int = 6
    sample_size: int = 64
    multiview_attention: bool = True
    mvcd_attention: bool = True
    regress_elevation: bool = True
    regress_focal_length: bool = True
    num_regress_blocks: int = 3
    regress_hidden_dim: int = 1280
    camera_embed_input_dim: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if n < 2:
            raise ConfigError(f"block_out_channels: expected at least 2 levels, got {list(self.block_out_channels)}")
        if len(self.num_heads) != n:
            raise ConfigError(f"num_heads: expected one entry per level ({n}), got {list(self.num_heads)}")
        for c, h in zip(self.block_out_channels, self.num_heads):
            if c % h or c % self.norm_num_groups:
                raise ConfigError(f"block_out_channels {c}: expected a multiple of its heads ({h}) and of norm_num_groups "
                                  f"({self.norm_num_groups})")
        if self.regress_elevation or self.regress_focal_length:
            want = 2 * (int(self.regress_elevation) + int(self.regress_focal_length))
            if self.camera_embed_input_dim != want:
                raise ConfigError(f"camera_embed_input_dim: expected {want} (sin and cos of each regressed quantity), "
                                  f"got {self.camera_embed_input_dim}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any], source: str = "unet/config.json") -> Era3DUNetConfig:
        """The config of a released Era3D ``unet/config.json`` (upstream's ``UNetMV2DConditionModel`` keys).

        Options recon3d does not implement (another attention variant, DINO features, ...) are one
        :class:`ConfigError` line naming ``source`` and the key.
        """
        fixed = {  # key: the value every Era3D release uses (anything else is another architecture)
            "selfattn_block": "self_rowwise", "cd_attention_mid": False, "cd_attention_last": False, "use_dino": False,
            "addition_downsample": False, "act_fn": "silu", "resnet_time_scale_shift": "default", "class_embed_type": "projection",
            "time_embedding_type": "positional", "class_embeddings_concat": False, "addition_embed_type": None,
            "encoder_hid_dim": None, "encoder_hid_dim_type": None, "transformer_layers_per_block": 1, "only_cross_attention": False,
            "dual_cross_attention": False, "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
            "conv_in_kernel": 3, "conv_out_kernel": 3, "center_input_sample": False, "num_attention_heads": None,
            "num_class_embeds": None, "mid_block_type": "UNetMidBlockMV2DCrossAttn", "resnet_out_scale_factor": 1.0,
        }
        for key, want in fixed.items():
            if key in cfg and cfg[key] != want and not (isinstance(want, (int, float)) and cfg[key] == want):
                raise ConfigError(f"{source}: {key}={cfg[key]!r} is not supported by recon3d's Era3DUNet (expected {want!r})")
        n = len(cfg.get("block_out_channels", cls.block_out_channels))
        down = ["CrossAttnDownBlockMV2D"] * (n - 1) + ["DownBlock2D"]
        up = ["UpBlock2D"] + ["CrossAttnUpBlockMV2D"] * (n - 1)
        if list(cfg.get("down_block_types", down)) != down or list(cfg.get("up_block_types", up)) != up:
            raise ConfigError(f"{source}: expected down_block_types {down} and up_block_types {up}, got "
                              f"{cfg.get('down_block_types')} / {cfg.get('up_block_types')}")

        def per_level(key: str, default):
            v = cfg.get(key, default)
            return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n

        cross = cfg.get("cross_attention_dim", cls.cross_attention_dim)
        if isinstance(cross, (list, tuple)):
            if len(set(cross)) != 1:
                raise ConfigError(f"{source}: cross_attention_dim: expected one width for all levels, got {cross}")
            cross = cross[0]
        layers = cfg.get("layers_per_block", cls.layers_per_block)
        if isinstance(layers, (list, tuple)):
            if len(set(layers)) != 1:
                raise ConfigError(f"{source}: layers_per_block: expected one value for all levels, got {layers}")
            layers = layers[0]
        defaults = cls()
        pick = lambda key, ours: cfg.get(key, getattr(defaults, ours))  # noqa: E731
        return cls(
            in_channels=pick("in_channels", "in_channels"), out_channels=pick("out_channels", "out_channels"),
            block_out_channels=tuple(cfg.get("block_out_channels", defaults.block_out_channels)), layers_per_block=int(layers),
            num_heads=per_level("attention_head_dim", defaults.num_heads), cross_attention_dim=int(cross),
            class_embed_input_dim=pick("projection_class_embeddings_input_dim", "class_embed_input_dim"),
            norm_num_groups=pick("norm_num_groups", "norm_num_groups"), norm_eps=pick("norm_eps", "norm_eps"),
            use_linear_projection=pick("use_linear_projection", "use_linear_projection"),
            upcast_attention=pick("upcast_attention", "upcast_attention"), num_views=pick("num_views", "num_views"),
            sample_size=pick("sample_size", "sample_size"), multiview_attention=pick("multiview_attention", "multiview_attention"),
            mvcd_attention=pick("mvcd_attention", "mvcd_attention"), regress_elevation=pick("regress_elevation", "regress_elevation"),
            regress_focal_length=pick("regress_focal_length", "regress_focal_length"),
            num_regress_blocks=pick("num_regress_blocks", "num_regress_blocks"),
            camera_embed_input_dim=pick("projection_camera_embeddings_input_dim", "camera_embed_input_dim"),
            flip_sin_to_cos=pick("flip_sin_to_cos", "flip_sin_to_cos"), freq_shift=pick("freq_shift", "freq_shift"),
            downsample_padding=pick("downsample_padding", "downsample_padding"),
            mid_block_scale_factor=pick("mid_block_scale_factor", "mid_block_scale_factor"),
        )

    def to_dict(self) -> dict:
        return asdict(self)


#: ``paper``: the ``-6view`` release; ``paper_ortho``: the ``-ortho`` release; ``tiny``: CPU tests
#: (two levels, 32/64 channels, head width 16, 6 views, 8x8 latents; the regressors keep
#: upstream's hard-coded hidden width 1280 so the tiny layout is upstream's too).
ERA3D_PRESETS: dict[str, Era3DUNetConfig] = {
    "paper": Era3DUNetConfig(),
    "paper_ortho": Era3DUNetConfig(regress_elevation=False, regress_focal_length=False),
    "tiny": Era3DUNetConfig(block_out_channels=(32, 64), layers_per_block=1, num_heads=(2, 4), cross_attention_dim=16,
                            class_embed_input_dim=32, norm_num_groups=8, upcast_attention=False, sample_size=8, num_regress_blocks=1),
}


# ----------------------------------------------------------------------------------- attention
def _sdpa(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head ``softmax(q kᵀ / √d) v`` on projected ``(B, L, C)`` tensors, then ``to_out``."""
    b, lq, c = q.shape
    h = attn.heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], h, c // h).transpose(1, 2)  # noqa: E731
    dtype = q.dtype
    if attn.upcast_attention and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()  # SD-2.1's overflow guard: scores in float32
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=attn.scale)
    out = out.transpose(1, 2).reshape(b, lq, c).to(dtype)
    return attn.to_out[1](attn.to_out[0](out))


def _self_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    return _sdpa(attn, attn.to_q(x), attn.to_k(x), attn.to_v(x))


def rowwise_attention(attn: Attention, x: torch.Tensor, num_views: int, height: int) -> torch.Tensor:
    """Era3D's row-wise multi-view self-attention.

    Args:
        attn: the ``attn_mv`` projections.
        x: ``((b V), (height width), C)`` tokens of ``b`` view sets, row-major pixels.
        num_views: ``V``; ``height``: the latent rows.

    Returns:
        ``((b V), (height width), C)``: row ``r`` of each view attended over row ``r`` of all ``V``
        views of its set (``(b v)(h w)c → (b h)(v w)c``).
    """
    n, length, c = x.shape
    if n % num_views or length % height:
        raise ShapeError(f"rowwise_attention: expected ((b {num_views}), ({height} w), C) tokens, got {list(x.shape)}")
    b, w = n // num_views, length // height
    to_rows = lambda t: t.reshape(b, num_views, height, w, c).permute(0, 2, 1, 3, 4).reshape(b * height, num_views * w, c)  # noqa: E731
    out = _sdpa(attn, to_rows(attn.to_q(x)), to_rows(attn.to_k(x)), to_rows(attn.to_v(x)))
    return out.reshape(b, height, num_views, w, c).permute(0, 2, 1, 3, 4).reshape(n, length, c)


def joint_domain_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Era3D's colour↔normal self-attention (``attn1`` with ``mvcd_attention``).

    Args:
        x: ``(2M, L, C)``: the first ``M`` rows normals, the last ``M`` their colours.

    Returns:
        ``(2M, L, C)``: row ``i`` and row ``M + i`` attended jointly over their ``2L`` tokens.
    """
    if x.shape[0] % 2:
        raise ShapeError(f"joint_domain_attention: expected an even batch (normals, then colours), got {x.shape[0]} rows")
    m, length = x.shape[0] // 2, x.shape[1]
    pair = lambda t: torch.cat([t[:m], t[m:]], dim=1)  # noqa: E731
    out = _sdpa(attn, pair(attn.to_q(x)), pair(attn.to_k(x)), pair(attn.to_v(x)))
    return torch.cat([out[:, :length], out[:, length:]], dim=0)


class MVTransformerBlock(nn.Module):
    """One Era3D transformer block (upstream ``BasicMVTransformerBlock``; module docstring)."""

    def __init__(self, dim: int, heads: int, cross_attention_dim: int, cfg: Era3DUNetConfig):
        super().__init__()
        self.num_views, self.joint, self.multiview = cfg.num_views, cfg.mvcd_attention, cfg.multiview_attention
        head_dim = dim // heads
        attention = lambda cross=None: Attention(dim, cross_attention_dim=cross, heads=heads, dim_head=head_dim,  # noqa: E731
                                                 upcast_attention=cfg.upcast_attention)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = attention()
        if self.multiview:
            self.norm_mv = nn.LayerNorm(dim)
            self.attn_mv = attention()
            nn.init.zeros_(self.attn_mv.to_out[0].weight)  # upstream starts the new branch at zero
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = attention(cross_attention_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")

    def forward(self, x: torch.Tensor, context: torch.Tensor, height: int) -> torch.Tensor:
        """``x (N, L, C)``, ``context (N, T, D)`` → ``(N, L, C)``."""
        h = self.norm1(x)
        x = x + (joint_domain_attention(self.attn1, h) if self.joint else _self_attention(self.attn1, h))
        if self.multiview:
            x = x + rowwise_attention(self.attn_mv, self.norm_mv(x), self.num_views, height)
        h = self.norm2(x)
        x = x + _sdpa(self.attn2, self.attn2.to_q(h), self.attn2.to_k(context), self.attn2.to_v(context))
        return x + self.ff(self.norm3(x))


class MVTransformer2D(nn.Module):
    """GroupNorm → projection → one :class:`MVTransformerBlock` → projection, residual (upstream ``TransformerMV2DModel``)."""

    def __init__(self, channels: int, heads: int, cross_attention_dim: int, cfg: Era3DUNetConfig):
        super().__init__()
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)
        make = (lambda: nn.Linear(channels, channels)) if self.linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = make()
        self.transformer_blocks = nn.ModuleList([MVTransformerBlock(channels, heads, cross_attention_dim, cfg)])
        self.proj_out = make()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x (N, C, H, W)`` → ``(N, C, H, W)``."""
        n, c, hh, ww = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(n, hh * ww, c)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, hh)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(n, hh, ww, c).permute(0, 3, 1, 2)
        if not self.linear:
            h = self.proj_out(h)
        return h + x


def _resnet(cin: int, cout: int, cfg: Era3DUNetConfig, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=cfg.time_embed_dim, eps=cfg.norm_eps,
                         groups=cfg.norm_num_groups, non_linearity="silu", output_scale_factor=scale)


class CrossAttnDownBlockMV(nn.Module):
    """``layers`` × (resnet, multi-view transformer), then an optional stride-2 conv (``CrossAttnDownBlockMV2D``)."""

    def __init__(self, cin: int, cout: int, heads: int, add_downsample: bool, cfg: Era3DUNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(cin if i == 0 else cout, cout, cfg) for i in range(cfg.layers_per_block)])
        self.attentions = nn.ModuleList([MVTransformer2D(cout, heads, cfg.cross_attention_dim, cfg) for _ in range(cfg.layers_per_block)])
        self.downsamplers = (nn.ModuleList([Downsample2D(cout, use_conv=True, out_channels=cout, padding=cfg.downsample_padding, name="op")])
                             if add_downsample else None)

    def forward(self, x, temb, context):
        skips = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(x, temb), context)
            skips += (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips += (x,)
        return x, skips


class MidBlockMV(nn.Module):
    """resnet, multi-view transformer, resnet (``UNetMidBlockMV2DCrossAttn``)."""

    def __init__(self, channels: int, heads: int, cfg: Era3DUNetConfig):
        super().__init__()
        s = cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList([_resnet(channels, channels, cfg, s), _resnet(channels, channels, cfg, s)])
        self.attentions = nn.ModuleList([MVTransformer2D(channels, heads, cfg.cross_attention_dim, cfg)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class CrossAttnUpBlockMV(nn.Module):
    """``layers + 1`` × (resnet over [x ‖ skip], multi-view transformer), then an optional upsampler (``CrossAttnUpBlockMV2D``)."""

    def __init__(self, cin: int, cout: int, prev: int, heads: int, add_upsample: bool, cfg: Era3DUNetConfig):
        super().__init__()
        n = cfg.layers_per_block + 1
        self.resnets = nn.ModuleList([_resnet((prev if i == 0 else cout) + (cin if i == n - 1 else cout), cout, cfg) for i in range(n)])
        self.attentions = nn.ModuleList([MVTransformer2D(cout, heads, cfg.cross_attention_dim, cfg) for _ in range(n)])
        self.upsamplers = nn.ModuleList([Upsample2D(cout, use_conv=True, out_channels=cout)]) if add_upsample else None

    def forward(self, x, skips, temb, context, upsample_size=None):
        for resnet, attn in zip(self.resnets, self.attentions):
            x, skips = torch.cat([x, skips[-1]], dim=1), skips[:-1]
            x = attn(resnet(x, temb), context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class _ResidualMLPBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return F.silu(x + self.linear2(F.silu(self.linear1(x))))


class PoseRegressor(nn.Module):
    """Linear+SiLU → ``blocks`` residual MLP blocks → linear to one value (upstream ``ResidualLiner``)."""

    def __init__(self, cin: int, hidden: int, num_blocks: int):
        super().__init__()
        self.linear_in = nn.Sequential(nn.Linear(cin, hidden), nn.SiLU())
        self.blocks = nn.ModuleList([_ResidualMLPBlock(hidden) for _ in range(num_blocks)])
        self.linear_out = nn.Linear(hidden, 1)

    def forward(self, x):
        x = self.linear_in(x)
        for block in self.blocks:
            x = block(x)
        return self.linear_out(x)


class Era3DUNet(nn.Module):
    """Era3D's multi-view UNet (module docstring); ``Era3DUNet("tiny")`` or ``Era3DUNet(Era3DUNetConfig(...))``."""

    def __init__(self, config: Era3DUNetConfig | str = "paper"):
        super().__init__()
        if isinstance(config, str):
            if config not in ERA3D_PRESETS:
                raise ConfigError(f"config: expected an Era3DUNetConfig or one of {sorted(ERA3D_PRESETS)}, got {config!r}")
            config = ERA3D_PRESETS[config]
        self.config = cfg = config
        ch = cfg.block_out_channels
        c0, temb = ch[0], cfg.time_embed_dim
        self.conv_in = nn.Conv2d(cfg.in_channels, c0, 3, padding=1)
        self.time_proj = Timesteps(c0, cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(c0, temb)
        self.class_embedding = TimestepEmbedding(cfg.class_embed_input_dim, temb)

        self.down_blocks = nn.ModuleList()
        out = c0
        for i, (c, heads) in enumerate(zip(ch, cfg.num_heads)):
            cin, out = out, c
            last = i == len(ch) - 1
            if last:
                self.down_blocks.append(DownBlock2D(num_layers=cfg.layers_per_block, in_channels=cin, out_channels=c, temb_channels=temb,
                                                    add_downsample=False, resnet_eps=cfg.norm_eps, resnet_act_fn="silu",
                                                    resnet_groups=cfg.norm_num_groups, downsample_padding=cfg.downsample_padding))
            else:
                self.down_blocks.append(CrossAttnDownBlockMV(cin, c, heads, True, cfg))
        self.mid_block = MidBlockMV(ch[-1], cfg.num_heads[-1], cfg)

        self.regress = cfg.regress_elevation or cfg.regress_focal_length
        if self.regress:
            self.camera_embedding = TimestepEmbedding(cfg.camera_embed_input_dim, temb)
            reg_in = ch[-1] * 2 if cfg.mvcd_attention else ch[-1]
            if cfg.regress_elevation:
                self.elevation_regressor = PoseRegressor(reg_in, cfg.regress_hidden_dim, cfg.num_regress_blocks)
            if cfg.regress_focal_length:
                self.focal_regressor = PoseRegressor(reg_in, cfg.regress_hidden_dim, cfg.num_regress_blocks)

        self.up_blocks = nn.ModuleList()
        rev, rheads = list(reversed(ch)), list(reversed(cfg.num_heads))
        out = rev[0]
        for i in range(len(ch)):
            prev, out = out, rev[i]
            cin = rev[min(i + 1, len(ch) - 1)]
            add_up = i < len(ch) - 1
            if i == 0:
                self.up_blocks.append(UpBlock2D(num_layers=cfg.layers_per_block + 1, in_channels=cin, prev_output_channel=prev,
                                                out_channels=out, temb_channels=temb, add_upsample=add_up, resnet_eps=cfg.norm_eps,
                                                resnet_act_fn="silu", resnet_groups=cfg.norm_num_groups))
            else:
                self.up_blocks.append(CrossAttnUpBlockMV(cin, out, prev, rheads[i], add_up, cfg))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, c0, eps=cfg.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(c0, cfg.out_channels, 3, padding=1)

    def _check(self, sample: torch.Tensor, context: torch.Tensor, class_labels: torch.Tensor) -> None:
        cfg = self.config
        rows = cfg.num_views * (2 if cfg.mvcd_attention else 1)
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels or sample.shape[0] % rows:
            raise ShapeError(f"sample: expected (N, {cfg.in_channels}, h, w) with N a multiple of {rows} "
                             f"({'normals and colours x ' if cfg.mvcd_attention else ''}{cfg.num_views} views), got {list(sample.shape)}")
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if sample.shape[-1] % factor or sample.shape[-2] % factor:
            raise ShapeError(f"sample: expected h, w multiples of {factor}, got {list(sample.shape[-2:])}")
        n = sample.shape[0]
        if context.ndim != 3 or context.shape[0] != n or context.shape[2] != cfg.cross_attention_dim:
            raise ShapeError(f"encoder_hidden_states: expected ({n}, T, {cfg.cross_attention_dim}), got {list(context.shape)}")
        if class_labels is None or class_labels.shape != (n, cfg.class_embed_input_dim):
            got = None if class_labels is None else list(class_labels.shape)
            raise ShapeError(f"class_labels: expected ({n}, {cfg.class_embed_input_dim}) (CLIP image embedding ‖ noise-level "
                             f"embedding), got {got}")

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int | float, encoder_hidden_states: torch.Tensor,
                class_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predict the noise of every view.

        Args:
            sample: ``(N, 8, h, w)`` noisy latent ‖ input-view latent; ``N = 2 b V`` (module docstring).
            timestep: scalar or ``(N,)`` diffusion timestep.
            encoder_hidden_states: ``(N, T, D)`` per-view prompt embeddings.
            class_labels: ``(N, class_embed_input_dim)`` CLIP image embedding ‖ noise-level embedding.

        Returns:
            ``(eps (N, 4, h, w), pose_pred)``; ``pose_pred`` is ``(N / V, k)`` (elevation, focal
            length; one row per normal/colour pair of view sets: ``N / (2 V)`` rows with
            ``mvcd_attention``) or None without regressors.
        """
        cfg = self.config
        self._check(sample, encoder_hidden_states, class_labels)
        n = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = (t.reshape(1) if t.ndim == 0 else t).expand(n)
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        emb = emb + self.class_embedding(class_labels.to(sample.dtype)).to(sample.dtype)

        x = self.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (x,)
        for block in self.down_blocks:
            if isinstance(block, CrossAttnDownBlockMV):
                x, res = block(x, emb, encoder_hidden_states)
            else:
                x, res = block(x, emb)
            skips += res
        x = self.mid_block(x, emb, encoder_hidden_states)

        pose_pred = None
        if self.regress:
            pooled = x.detach().mean(dim=(2, 3))  # upstream regresses from detached features
            if cfg.mvcd_attention:
                normal, colour = pooled.chunk(2, dim=0)
                pooled = torch.cat([normal, colour], dim=-1)
            preds = []
            for on, head in ((cfg.regress_elevation, "elevation_regressor"), (cfg.regress_focal_length, "focal_regressor")):
                if on:
                    preds.append(getattr(self, head)(pooled).reshape(-1, cfg.num_views, 1).mean(dim=1))
            pose_pred = torch.cat(preds, dim=-1)
            pose_emb = self.camera_embedding(torch.cat([torch.sin(pose_pred), torch.cos(pose_pred)], dim=-1))
            pose_emb = torch.repeat_interleave(pose_emb, cfg.num_views, dim=0)
            if cfg.mvcd_attention:
                pose_emb = torch.cat([pose_emb, pose_emb], dim=0)
            emb = pose_emb + emb  # the up path sees the predicted input-camera pose

        for block in self.up_blocks:
            k = len(block.resnets)
            res, skips = skips[-k:], skips[:-k]
            # h, w are multiples of 2^levels (checked), so every upsampler doubles exactly
            if isinstance(block, CrossAttnUpBlockMV):
                x = block(x, res, emb, encoder_hidden_states)
            else:
                x = block(x, res, emb)
        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        return x, pose_pred
