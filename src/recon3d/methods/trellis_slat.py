"""TRELLIS's structured-latent (SLAT) stages on recon3d data: per-voxel DINOv2 features, the SLAT
VAE with its Gaussian decoder, and the SLAT flow.

Networks: :mod:`recon3d.models.trellis` (``SLatEncoder``, ``SLatGaussianDecoder``,
``SLatFlowModel``, ``TrellisImageCondition``). Frames and ground-truth surface voxels as
:mod:`recon3d.methods.trellis` (TRELLIS's ``[-0.5, 0.5]^3``, Z up; ``p_recon3d = 2 A p_trellis``).

**SLAT features** (:func:`slat_voxel_features`; upstream ``dataset_toolkits/extract_feature.py``):
each view is premultiplied by its alpha (the object on black), resized whole to the DINOv2 input
side (518, no crop), ImageNet-normalised; the DINOv2 ``x_prenorm`` patch tokens (the last block's
output, **no final LayerNorm**; cls and registers dropped) on their ``G x G`` grid are sampled
bilinearly (``grid_sample``, ``align_corners=False``, zeros outside) at the projection of each
surface voxel's centre ``(c + 0.5) / R - 0.5``, and the samples are **averaged over all views**
(upstream neither tests visibility nor drops views a voxel falls outside of: those add zeros).
Upstream uses all 150 renders of an object; here the views are the batch's (inputs and targets,
``feature_views``), and with ``cache_features`` the first batch that shows an object fixes its
features (upstream's precomputed ``.npz``). Differences: torch's antialiased bilinear resize
instead of PIL's Lanczos.

**SLAT VAE** (:class:`TrellisSLatVAEModule`; upstream ``trainers/vae/structured_latent_vae_gaussian.py``,
``configs/vae/slat_vae_enc_dec_gs_swin8_B_64l8_fp16.json``): features -> ``SLatEncoder`` (posterior
sample) -> ``SLatGaussianDecoder`` -> Gaussians in recon3d's world (x2, axes of ``up_axis``) ->
recon3d's Gaussian rasteriser at the batch's target views, on white. Loss (upstream's weights)::

    L1(render, target) + 0.2 (1 - SSIM) + 0.2 LPIPS-VGG + 1e-6 KL
      + 1e4 mean_g(prod scaling_g) + 1e-3 mean_g (opacity_g - 1)^2

``KL = 0.5 mean(mu^2 + exp(logvar) - logvar - 1)``; the volume and opacity regularisers use
TRELLIS's activated attributes in **TRELLIS's frame** (scales of its unit cube, as upstream's
``get_scaling``), not the x2 recon3d scales. LPIPS needs local weights
(:mod:`recon3d.metrics.lpips`); without them the term is left out with one warning. Differences:
upstream renders on a random background colour (and composites the target on it) with its 2-D
filter kernel 0.1; here both are white and the rasteriser is recon3d's. SSIM is recon3d's
(:func:`recon3d.metrics.image.ssim`: Gaussian window 11 / 1.5 as upstream, border cropped rather
than zero-padded).

**SLAT flow** (:class:`TrellisSLatFlowModule`; upstream ``trainers/flow_matching/sparse_flow_matching.py``,
``configs/generation/slat_flow_img_dit_L_64l8p2_fp16.json``): ``x0 = (mean_enc(features) - mu) / sigma``
from a frozen SLAT encoder (posterior mean, as upstream's ``encode_latent.py``), TRELLIS's rectified
flow (``t = sigmoid(N(1, 1))``, condition dropped to zeros with p 0.1), DINOv2 tokens of one input
view. The fixed ``mu, sigma`` (8 values each) come from ``slat_mean``/``slat_std``, else from
``pipeline`` (a ``pipeline.json``: TRELLIS-image-large's, valid for its released encoder only), else
they are **computed from the training set** before the first step (per-channel mean and std over
every voxel of up to ``normalization_batches`` training batches, as upstream computed its own over
its dataset) and stored in the checkpoint (persistent buffers), so a resumed or sampling run uses
the same values.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.data.batch import Batch, Views
from recon3d.data.cameras import Cameras
from recon3d.errors import ConfigError, DataError, ShapeError
from recon3d.methods.base import NonFiniteGuard, own_instance
from recon3d.methods.trellis import (
    _background,
    _load_frozen_encoder,
    _TrellisBase,
    gaussians_to_world,
    normalize_slat,
    trellis_to_world_points,
)
from recon3d.models.flow import RectifiedFlowObjective
from recon3d.models.trellis.conditioning import TrellisImageCondition
from recon3d.models.trellis.slat_decoders import SLatGaussianDecoder
from recon3d.models.trellis.slat_flow import SLatFlowModel
from recon3d.models.trellis.slat_vae import SLatEncoder
from recon3d.representations import Gaussians, SparseVoxels
from recon3d.representations.reconstruction import Reconstruction
from recon3d.utils.checks import check_option

__all__ = ["slat_voxel_features", "voxel_centers", "TrellisSLatVAEModule", "TrellisSLatFlowModule", "slat_vae_regularizers"]

log = logging.getLogger(__name__)

FEATURE_VIEWS = ("inputs", "targets", "all")


def voxel_centers(coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """``(N, 3)`` integer voxel indices on TRELLIS's ``R^3`` grid -> their centres ``(c + 0.5) / R - 0.5``
    in TRELLIS's ``[-0.5, 0.5]^3`` (float64)."""
    return (coords.double() + 0.5) / resolution - 0.5


def _premultiply(images: torch.Tensor, masks: torch.Tensor | None, background) -> torch.Tensor:
    """Images composited on ``background`` -> ``rgb * alpha`` (the object on black, as upstream's
    ``image[..., :3] * alpha``); unchanged without masks."""
    if masks is None:
        return images
    bg = torch.ones(3) if background is None else torch.as_tensor(background, dtype=torch.float32)
    bg = bg.to(images).reshape(-1, 3)[:, :, None, None]
    a = masks.to(images).clamp(0, 1)
    return (images - bg * (1 - a)).clamp(0, 1) * (a > 0)


@torch.no_grad()
def slat_voxel_features(dinov2: TrellisImageCondition, images: torch.Tensor, cameras: Cameras | None, coords: torch.Tensor,
                        resolution: int, masks: torch.Tensor | None = None, background=None, up_axis: str = "z",
                        chunk: int = 16) -> torch.Tensor:
    """TRELLIS's per-voxel SLAT features of one object (module docstring).

    Args:
        dinov2: the DINOv2 (its :meth:`~TrellisImageCondition.patch_features`: pre-norm patch tokens).
        images: ``(V, 3, H, W)`` views in [0, 1] (composited on ``background`` where ``masks`` < 1).
        cameras: ``(V,)`` recon3d cameras of the views (OpenCV, world ``[-1, 1]^3``).
        coords: ``(N, 3)`` integer voxel indices on TRELLIS's ``resolution^3`` grid (x, y, z).
        resolution: the grid side ``R`` (TRELLIS: 64).
        masks: ``(V, 1, H, W)`` alpha, or None (images used as they are).
        background: the colour the images were composited on (default white).
        up_axis: the dataset's up axis (the TRELLIS -> world map).
        chunk: views per DINOv2 forward (upstream: 16).

    Returns ``(N, C)`` float32 features, ``C`` the DINOv2 width (1024 for ViT-L).
    """
    if cameras is None:
        raise DataError("slat_voxel_features", "cameras: the views need cameras to project the voxel centres; got None")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ShapeError(f"images: expected (V, 3, H, W), got {tuple(images.shape)}")
    V, _, H, W = images.shape
    if tuple(cameras.batch_shape) != (V,):
        raise ShapeError(f"cameras: expected batch shape [{V}] (one per view), got {list(cameras.batch_shape)}")
    if (cameras.height, cameras.width) != (H, W):
        raise ShapeError(f"cameras: image size {cameras.width}x{cameras.height} does not match images {W}x{H}")
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ShapeError(f"coords: expected (N, 3) voxel indices, got {tuple(coords.shape)}")
    check_option("chunk", chunk, 1, integer=True)
    if coords.numel() and (int(coords.min()) < 0 or int(coords.max()) >= resolution):
        raise ShapeError(f"coords: expected indices in [0, {resolution}), got [{int(coords.min())}, {int(coords.max())}]")
    world = trellis_to_world_points(voxel_centers(coords, resolution), up_axis).to(torch.float32).to(images.device)
    pix, _ = cameras.to(torch.float32).project(world.expand(V, -1, -1))  # (V, N, 2), pixel (u, v) covers [u, u+1)
    # Normalised to the image (0..1 across it) then to grid_sample's [-1, 1] with align_corners=False:
    # the same map as upstream's normalised-intrinsics uv * 2 - 1; the resize to 518 keeps it.
    size = torch.tensor([W, H], dtype=pix.dtype, device=pix.device)
    grid = pix / size * 2 - 1
    premult = _premultiply(images.float(), masks, background)
    total = None
    for s in range(0, V, chunk):
        tokens = dinov2.patch_features(premult[s : s + chunk])  # (v, C, G, G), pre-norm
        sampled = F.grid_sample(tokens.float(), grid[s : s + chunk, None], mode="bilinear", align_corners=False)
        part = sampled[:, :, 0].sum(0)  # (C, N)
        total = part if total is None else total + part
    return (total / V).T.contiguous()


def slat_vae_regularizers(scaling: torch.Tensor, opacity: torch.Tensor) -> dict[str, torch.Tensor]:
    """Upstream's ``_get_regularization_loss`` terms: ``reg_vol = mean prod(scaling)`` over the
    Gaussians ``scaling (M, 3)`` (TRELLIS's frame), ``reg_opacity = mean (opacity - 1)^2``."""
    return {"reg_vol": scaling.prod(dim=1).mean(), "reg_opacity": (opacity - 1).square().mean()}


# ---------------------------------------------------------------------------------- shared
class _SLatBase(_TrellisBase):
    """Surface voxels of the ground-truth mesh + their DINOv2 features, per object (module docstring)."""

    def _init_features(self, feature_views: str, cache_features: bool, feature_chunk: int) -> None:
        if feature_views not in FEATURE_VIEWS:
            raise ConfigError(f"model.feature_views: expected one of {list(FEATURE_VIEWS)}, got {feature_views!r}")
        check_option("model.feature_chunk", feature_chunk, 1, integer=True)
        self.feature_views, self.cache_features, self.feature_chunk = feature_views, bool(cache_features), int(feature_chunk)
        self._feat_cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _feature_view_sets(self, batch: Batch) -> list[tuple[str, Views]]:
        names = {"inputs": ["inputs"], "targets": ["targets"], "all": ["inputs", "targets"]}[self.feature_views]
        out = []
        for n in names:
            views = getattr(batch, n)
            if views is None:
                continue
            if views.cameras is None:
                raise DataError(f"batch of {list(batch.object_ids)[:3]}", f"{n}.cameras: TRELLIS's SLAT features project the voxel "
                                "centres into posed views; these views have no cameras (model.feature_views names them)")
            out.append((n, views))
        if not out:
            raise DataError(f"batch of {list(batch.object_ids)[:3]}", f"no {self.feature_views} views to take SLAT features from")
        return out

    def slat_features(self, batch: Batch, dinov2: TrellisImageCondition, resolution: int) -> SparseVoxels:
        """The batch's surface voxels on TRELLIS's ``resolution^3`` grid with their DINOv2 features
        ``feats (N, C)`` (:func:`slat_voxel_features` over the ``feature_views``). An object without
        a surface voxel raises one DataError naming it."""
        occ = self.surface_occupancy(batch, resolution)
        sets = None
        coords, feats = [], []
        for b, oid in enumerate(batch.object_ids):
            key = (oid, resolution)
            hit = self._feat_cache.get(key) if self.cache_features else None
            if hit is None:
                c = torch.nonzero(occ[b, 0] > 0.5)
                if c.shape[0] == 0:
                    raise DataError(oid, f"no surface voxel at resolution {resolution}: the ground-truth surface is empty "
                                    "or outside TRELLIS's [-0.5, 0.5]^3 (recon3d's [-1, 1]^3)")
                sets = sets or self._feature_view_sets(batch)
                images = torch.cat([v.images[b] for _, v in sets])
                cams = Cameras.cat([v.cameras[b] for _, v in sets])
                masks = None
                if all(v.masks is not None for _, v in sets):
                    masks = torch.cat([v.masks[b] for _, v in sets])
                bg = batch.background[b] if batch.background is not None else None
                f = slat_voxel_features(dinov2, images, cams, c, resolution, masks, bg, self.up_axis, self.feature_chunk)
                hit = (c, f)
                if self.cache_features:
                    if len(self._feat_cache) > 4096:
                        self._feat_cache.clear()
                    self._feat_cache[key] = (c.cpu(), f.cpu())
            c, f = hit
            coords.append(torch.cat([torch.full_like(c[:, :1], b), c], 1).to(self.device))
            feats.append(f.to(self.device))
        return SparseVoxels(torch.cat(coords).int(), torch.cat(feats), resolution, len(batch.object_ids))


# ---------------------------------------------------------------------------------- SLAT VAE stage
class TrellisSLatVAEModule(_SLatBase):
    """TRELLIS's SLAT VAE stage with the Gaussian decoder, supervised by rendering (module docstring).

    Args:
        features: the DINOv2 whose pre-norm patch tokens are the per-voxel inputs (frozen;
            TRELLIS: dinov2_vitl14_reg at 518).
        encoder: :class:`SLatEncoder` (``in_channels`` = the DINOv2 width).
        decoder: :class:`SLatGaussianDecoder` (same latent channels and resolution).
        resolution: voxel grid side (None: the encoder's; TRELLIS 64).
        feature_views: views the features average over (``inputs``, ``targets`` or ``all``).
        cache_features: keep each object's features from the first batch that shows it.
        feature_chunk: views per DINOv2 forward.
        loss_type: ``l1`` (TRELLIS) or ``l2``.
        lambda_ssim, lambda_lpips, lambda_kl: TRELLIS 0.2, 0.2, 1e-6.
        lambda_vol, lambda_opacity: TRELLIS's regularisers, 1e4 and 1e-3.
        lpips_weights_dir: folder of the LPIPS-VGG files (:mod:`recon3d.metrics.lpips`).
        lpips_resolution: resize renders and targets to this side for LPIPS (None: as rendered).
        sample_posterior: decode ``mean + std eps`` (TRELLIS) rather than the mean.
        lr, weight_decay, betas: AdamW (TRELLIS: 1e-4, 0).
        up_axis, voxel_spacing: as :class:`~recon3d.methods.trellis.TrellisSSVAEModule`.
        render_backend: Gaussian rasteriser (``auto | torch | gsplat``).

    :meth:`reconstruct` encodes the ground-truth features (posterior mean) and decodes them to
    :class:`Gaussians` (the SLAT in ``extras["slat"]``).
    """

    RECONSTRUCTS_3D = False  # an autoencoder of ground-truth features, not reconstruction from views
    EXPORT_REPRESENTATION = Gaussians
    RUNTIME_OPTIONS = _SLatBase.RUNTIME_OPTIONS | {"render_backend", "lpips_weights_dir"}

    def __init__(self, features: TrellisImageCondition, encoder: SLatEncoder, decoder: SLatGaussianDecoder,
                 resolution: int | None = None, feature_views: Literal["inputs", "targets", "all"] = "all",
                 cache_features: bool = True, feature_chunk: int = 16, loss_type: Literal["l1", "l2"] = "l1",
                 lambda_ssim: float = 0.2, lambda_lpips: float = 0.2, lambda_kl: float = 1e-6, lambda_vol: float = 1e4,
                 lambda_opacity: float = 1e-3, lpips_weights_dir: str | None = None, lpips_resolution: int | None = None,
                 sample_posterior: bool = True, lr: float = 1e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), up_axis: Literal["z", "y"] = "z", voxel_spacing: float = 0.25,
                 render_backend: str = "auto", evaluation=None, init_weights: str | None = None,
                 nonfinite: NonFiniteGuard | None = None, vis_views: int = 4, init_weights_ignore: list[str] | None = None,
                 validation_mode: Literal["render", "loss"] = "render", eval_seed: int = 0):
        super().__init__(evaluation=evaluation, init_weights=init_weights, nonfinite=nonfinite, vis_views=vis_views,
                         init_weights_ignore=init_weights_ignore, validation_mode=validation_mode, eval_seed=eval_seed)
        self.save_hyperparameters()
        self._init_common(up_axis, lr, weight_decay, betas, voxel_spacing)
        self._init_features(feature_views, cache_features, feature_chunk)
        self.features, self.encoder, self.decoder = own_instance(features), own_instance(encoder), own_instance(decoder)
        self.features.requires_grad_(False)
        if self.encoder.in_channels != self.features.out_dim:
            raise ConfigError(f"model.encoder: in_channels {self.encoder.in_channels} differs from the DINOv2 width {self.features.out_dim}")
        if self.decoder.latent_channels != self.encoder.latent_channels:
            raise ConfigError(f"model.decoder: latent_channels {self.decoder.latent_channels} differs from the encoder's {self.encoder.latent_channels}")
        res = self.encoder.resolution if resolution is None else resolution
        check_option("model.resolution", res, 2, integer=True)
        if self.decoder.resolution != res:
            raise ConfigError(f"model.decoder: resolution {self.decoder.resolution} differs from model.resolution {res}")
        if loss_type not in ("l1", "l2"):
            raise ConfigError(f"model.loss_type: expected 'l1' or 'l2', got {loss_type!r}")
        for name, v in (("lambda_ssim", lambda_ssim), ("lambda_lpips", lambda_lpips), ("lambda_kl", lambda_kl),
                        ("lambda_vol", lambda_vol), ("lambda_opacity", lambda_opacity)):
            check_option(f"model.{name}", v, 0.0)
        check_option("model.lpips_resolution", lpips_resolution, 16, integer=True, allow_none=True)
        self.resolution, self.loss_type = int(res), loss_type
        self.lambda_ssim, self.lambda_lpips, self.lambda_kl = float(lambda_ssim), float(lambda_lpips), float(lambda_kl)
        self.lambda_vol, self.lambda_opacity = float(lambda_vol), float(lambda_opacity)
        self.sample_posterior, self.render_backend = bool(sample_posterior), render_backend
        self.lpips_weights_dir, self.lpips_resolution = lpips_weights_dir, lpips_resolution
        # In a list: not a submodule (kept out of the state dict, so a checkpoint loads whether or
        # not LPIPS was found), moved to the device on use.
        self._lpips: list[nn.Module] = []
        self._lpips_state = "unloaded" if self.lambda_lpips > 0 else "off"
        self._rasterizer = None

    # -------------------------------------------------------------- parts
    def _train_params(self) -> list[nn.Parameter]:
        return [p for m in (self.encoder, self.decoder) for p in m.parameters() if p.requires_grad]

    def lpips_loss(self) -> nn.Module | None:
        """LPIPS-VGG (loaded on first use, never trained), or None when ``lambda_lpips`` is 0 or its
        weights are absent (said once)."""
        if self._lpips_state == "unloaded":
            from recon3d.metrics.lpips import BACKBONE_FILES, HEAD_FILES, LPIPSLoss, LPIPSWeightsNotFoundError

            try:
                net = LPIPSLoss("vgg", pretrained=True, weights_dir=self.lpips_weights_dir, resize=self.lpips_resolution)
                net.requires_grad_(False).eval()
                self._lpips, self._lpips_state = [net], "on"
            except LPIPSWeightsNotFoundError as err:
                self._lpips_state = "missing"
                log.warning("TrellisSLatVAEModule: no LPIPS-VGG weights (%s), so the 0.2 LPIPS term of TRELLIS's loss is left "
                            "out. Put %s and %s in $TORCH_HOME/hub/checkpoints, $RECON3D_LPIPS_DIR or model.lpips_weights_dir.",
                            err, BACKBONE_FILES["vgg"], HEAD_FILES["vgg"])
        if not self._lpips:
            return None
        return self._lpips[0].to(self.device)

    def _rasterize(self, g: Gaussians, cameras: Cameras):
        from recon3d.render import render

        renderer = self.rasterizer(cameras.c2w.device)
        with torch.autocast(device_type=cameras.c2w.device.type, enabled=False):
            return render(g.to(torch.float32), cameras.to(torch.float32), "white", renderer=renderer)

    def decode_gaussians(self, z: SparseVoxels) -> tuple[Gaussians, dict[str, torch.Tensor]]:
        """Latent voxels -> recon3d :class:`Gaussians` in the world (packed, ``G`` per voxel) and
        TRELLIS's activated attributes in its own frame (:meth:`SLatGaussianDecoder.activations`)."""
        a = self.decoder.activations(self.decoder(z))
        g = Gaussians(a["world"], a["rotation"], a["scaling"], a["opacity"][:, 0], a["features_dc"], sh_degree=0,
                      counts=z.counts * self.decoder.num_gaussians)
        return gaussians_to_world(g, self.up_axis), a

    # -------------------------------------------------------------- training
    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        batch.require("targets.cameras", who="TrellisSLatVAEModule (renders the decoded Gaussians at the target views)")
        x = self.slat_features(batch, self.features, self.resolution)
        _, mean, logvar = self.encoder(x, sample_posterior=False, return_raw=True)
        if self.sample_posterior:
            gens = self.step_generators(batch)
            counts = x.counts.tolist()
            eps = torch.cat([torch.randn(n, mean.shape[1], generator=g) for n, g in zip(counts, gens)]).to(mean)
            z = mean + torch.exp(0.5 * logvar) * eps
        else:
            z = mean
        g, act = self.decode_gaussians(x.replace(feats=z))
        tg = batch.targets
        out = self._rasterize(g, tg.cameras)
        target = tg.images
        if tg.masks is not None and batch.background is not None:  # re-composite on white, the render's background
            target = target + (1 - batch.background.to(target).view(-1, 1, 3, 1, 1)) * (1 - tg.masks.to(target))
        pred = out.rgb
        terms: dict[str, torch.Tensor] = {}
        rec = (pred - target).abs().mean() if self.loss_type == "l1" else (pred - target).square().mean()
        terms[self.loss_type] = rec
        if self.lambda_ssim > 0:
            from recon3d.metrics.image import ssim

            terms["ssim"] = (1 - ssim(pred.flatten(0, 1), target.flatten(0, 1))).mean().to(rec.dtype)
            rec = rec + self.lambda_ssim * terms["ssim"]
        lp = self.lpips_loss() if self.lambda_lpips > 0 else None
        if lp is not None:
            terms["lpips"] = lp(pred.flatten(0, 1), target.flatten(0, 1))
            rec = rec + self.lambda_lpips * terms["lpips"]
        terms["rec"] = rec
        terms["kl"] = 0.5 * torch.mean(mean.square() + logvar.exp() - logvar - 1)
        reg = slat_vae_regularizers(act["scaling"], act["opacity"])
        terms.update(reg)
        terms["loss"] = rec + self.lambda_kl * terms["kl"] + self.lambda_vol * reg["reg_vol"] + self.lambda_opacity * reg["reg_opacity"]
        with torch.no_grad():
            terms["psnr"] = -10 * torch.log10((pred - target).square().mean().clamp_min(1e-10))
        return terms

    # -------------------------------------------------------------- reconstruct / render
    @torch.no_grad()
    def reconstruct(self, batch: Batch) -> Reconstruction:
        x = self.slat_features(batch, self.features, self.resolution)
        z = self.encoder(x, sample_posterior=False)
        g, _ = self.decode_gaussians(z)
        return Reconstruction(list(batch.object_ids), g, {"slat": z})

    def render_reconstruction(self, rec: Reconstruction, cameras: Cameras):
        return self._rasterize(rec.representation, cameras)


# ---------------------------------------------------------------------------------- SLAT flow stage
class TrellisSLatFlowModule(_SLatBase):
    """TRELLIS's SLAT flow stage on recon3d data (module docstring).

    Args:
        flow: the :class:`SLatFlowModel` trained here (its ``resolution`` is the voxel grid's).
        slat_encoder: the SLAT VAE stage's :class:`SLatEncoder` (frozen; its posterior mean is ``x0``).
        condition: DINOv2 (frozen): condition tokens (after the non-affine LayerNorm) of one input
            view per object, and the pre-norm patch tokens of the voxel features.
        slat_encoder_weights: file to load ``slat_encoder`` from (a TrellisSLatVAEModule ``.ckpt``,
            keys under ``slat_encoder_prefix``; or TRELLIS's ``slat_enc_swin8_B_64l8_fp16.safetensors``
            with prefix ``""``); None keeps its initial weights (tests).
        slat_mean, slat_std: the fixed normalisation (``flow_x0 = (z - mean) / std``); None:
            ``pipeline``'s, else computed from the training set (module docstring).
        pipeline: a TRELLIS ``pipeline.json`` (or its folder) to read ``slat_normalization`` from.
        normalization_batches: training batches the computed normalisation averages over.
        feature_views, cache_features, feature_chunk: as :class:`TrellisSLatVAEModule`.
        sigma_min, t_mean, t_std, p_uncond: TRELLIS's objective (1e-5, logit-normal (1, 1), 0.1).
        lr, weight_decay, betas, up_axis, voxel_spacing: as the other stages.
    """

    RECONSTRUCTS_3D = False  # a latent generator stage; TrellisModule samples and decodes

    def __init__(self, flow: SLatFlowModel, slat_encoder: SLatEncoder, condition: TrellisImageCondition,
                 slat_encoder_weights: str | None = None, slat_encoder_prefix: str = "encoder.",
                 slat_mean: list[float] | None = None, slat_std: list[float] | None = None, pipeline: str | None = None,
                 normalization_batches: int = 16, feature_views: Literal["inputs", "targets", "all"] = "all",
                 cache_features: bool = True, feature_chunk: int = 16, sigma_min: float = 1e-5, t_mean: float = 1.0,
                 t_std: float = 1.0, p_uncond: float = 0.1, lr: float = 1e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), up_axis: Literal["z", "y"] = "z", voxel_spacing: float = 0.25,
                 evaluation=None, init_weights: str | None = None, nonfinite: NonFiniteGuard | None = None, vis_views: int = 4,
                 init_weights_ignore: list[str] | None = None, validation_mode: Literal["render", "loss"] = "loss",
                 eval_seed: int = 0):
        super().__init__(evaluation=evaluation, init_weights=init_weights, nonfinite=nonfinite, vis_views=vis_views,
                         init_weights_ignore=init_weights_ignore, validation_mode=validation_mode, eval_seed=eval_seed)
        self.save_hyperparameters()
        self._init_common(up_axis, lr, weight_decay, betas, voxel_spacing)
        self._init_features(feature_views, cache_features, feature_chunk)
        check_option("model.normalization_batches", normalization_batches, 1, integer=True)
        self.flow, self.slat_encoder, self.condition = own_instance(flow), own_instance(slat_encoder), own_instance(condition)
        self.condition.requires_grad_(False)
        if self.slat_encoder.latent_channels != self.flow.in_channels:
            raise ConfigError(f"model.slat_encoder: latent_channels {self.slat_encoder.latent_channels} differs from the flow's "
                              f"in_channels {self.flow.in_channels}")
        if self.slat_encoder.in_channels != self.condition.out_dim:
            raise ConfigError(f"model.slat_encoder: in_channels {self.slat_encoder.in_channels} differs from the DINOv2 width {self.condition.out_dim}")
        if self.flow.cond_channels != self.condition.out_dim:
            raise ConfigError(f"model.condition: DINOv2 width {self.condition.out_dim} differs from the flow's cond_channels {self.flow.cond_channels}")
        _load_frozen_encoder(self.slat_encoder, slat_encoder_weights, slat_encoder_prefix)
        self.slat_encoder.eval()
        C = self.flow.in_channels
        if pipeline is not None and (slat_mean is None or slat_std is None):
            from recon3d.models.trellis.pipeline_config import read_pipeline_json

            cfg = read_pipeline_json(pipeline)
            slat_mean = cfg.slat_mean if slat_mean is None else slat_mean
            slat_std = cfg.slat_std if slat_std is None else slat_std
        if (slat_mean is None) != (slat_std is None):
            raise ConfigError("model.slat_mean / slat_std: give both (or neither: computed from the training set)")
        given = slat_mean is not None
        if given:
            if len(slat_mean) != C or len(slat_std) != C:
                raise ConfigError(f"model.slat_mean / slat_std: expected {C} values each (the flow's channels), got "
                                  f"{len(slat_mean)} and {len(slat_std)}")
            if any(float(s) <= 0 for s in slat_std):
                raise ConfigError(f"model.slat_std: expected values > 0, got {list(slat_std)}")
        # Persistent: the normalisation is part of the trained flow (checkpoints keep it).
        self.register_buffer("slat_mean", torch.tensor([float(x) for x in slat_mean] if given else [0.0] * C))
        self.register_buffer("slat_std", torch.tensor([float(x) for x in slat_std] if given else [1.0] * C))
        self.register_buffer("normalization_ready", torch.tensor(given))
        self.normalization_batches = int(normalization_batches)
        self.objective = RectifiedFlowObjective.trellis(sigma_min=sigma_min, t_mean=t_mean, t_std=t_std, p_uncond=p_uncond)

    def train(self, mode: bool = True):
        super().train(mode)
        self.slat_encoder.eval()  # frozen
        return self

    def _train_params(self) -> list[nn.Parameter]:
        return [p for p in self.flow.parameters() if p.requires_grad]

    # -------------------------------------------------------------- latents
    @torch.no_grad()
    def latents(self, batch: Batch) -> SparseVoxels:
        """The frozen encoder's posterior mean of the batch's voxel features (not normalised)."""
        x = self.slat_features(batch, self.condition, self.flow.resolution)
        return self.slat_encoder(x, sample_posterior=False)

    @torch.no_grad()
    def compute_normalization(self, batches) -> tuple[list[float], list[float]]:
        """Per-channel mean and std (population) of :meth:`latents` over every voxel of ``batches``
        (an iterable of :class:`Batch`), summed over ranks under DDP; stored in the buffers."""
        C = self.flow.in_channels
        s1 = torch.zeros(C, dtype=torch.float64, device=self.device)
        s2 = torch.zeros_like(s1)
        n = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(batches):
            if i >= self.normalization_batches:
                break
            f = self.latents(batch.to(self.device)).feats.double()
            s1 += f.sum(0)
            s2 += f.square().sum(0)
            n += f.shape[0]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in (s1, s2, n):
                torch.distributed.all_reduce(t)
        if float(n) < 2:
            raise DataError("training set", f"the SLAT normalisation needs at least 2 voxels, got {int(n)}; give model.slat_mean / slat_std")
        mean = s1 / n
        std = (s2 / n - mean.square()).clamp_min(0).sqrt()
        flat = std < 1e-6
        if bool(flat.any()):
            # A constant channel (e.g. an untrained encoder, whose zero-initialised out_layer gives 0):
            # dividing by ~0 would blow up any later deviation; keep it unscaled and say so.
            log.warning("TrellisSLatFlowModule: SLAT channels %s are constant over the training batches (std < 1e-6); their "
                        "std is set to 1 (was the SLAT encoder trained / loaded? model.slat_encoder_weights)", flat.nonzero()[:, 0].tolist())
            std = torch.where(flat, torch.ones_like(std), std)
        self.slat_mean.copy_(mean.float())
        self.slat_std.copy_(std.float())
        self.normalization_ready.fill_(True)
        log.info("TrellisSLatFlowModule: SLAT normalisation computed over %d voxels: mean %s std %s", int(n),
                 [round(float(x), 4) for x in mean], [round(float(x), 4) for x in std])
        return mean.tolist(), std.tolist()

    def on_fit_start(self) -> None:
        if bool(self.normalization_ready):
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            raise ConfigError("TrellisSLatFlowModule: the SLAT normalisation is computed from the training set, which needs a "
                              "datamodule; give model.slat_mean / slat_std (or model.pipeline)")
        self.compute_normalization(dm.train_dataloader())

    # -------------------------------------------------------------- training
    def normalized_latents(self, batch: Batch) -> SparseVoxels:
        """The flow's ``x0``: :meth:`latents` normalised by the fixed ``slat_mean`` / ``slat_std``
        (:func:`~recon3d.methods.trellis.normalize_slat`); refused until the normalisation is set."""
        if not bool(self.normalization_ready):
            raise ConfigError(f"{type(self).__name__}: SLAT normalisation not set; give model.slat_mean / slat_std, model.pipeline, "
                              "or call compute_normalization (done before fitting)")
        return normalize_slat(self.latents(batch), self.slat_mean, self.slat_std)

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        x0 = self.normalized_latents(batch)
        gens = self.step_generators(batch)
        V = batch.inputs.images.shape[1]
        picks = [int(torch.randint(V, (1,), generator=g)) for g in gens]
        idx = torch.arange(len(picks))
        images = batch.inputs.images[idx, picks]
        masks = batch.inputs.masks[idx, picks] if batch.inputs.masks is not None else None
        cond = self.condition(images, masks, _background(batch))
        out = self.objective.loss(self.flow, x0, cond, generator=gens)
        return {"loss": out.loss, "slat_flow_mse": out.loss.detach()}

    def reconstruct(self, batch: Batch) -> Reconstruction:
        raise ConfigError("TrellisSLatFlowModule is a training stage: sample and decode with recon3d.methods.trellis.TrellisModule "
                          "(its slat_flow, slat_mean / slat_std from this stage's checkpoint)")
