"""GTR (Zhuang et al., "GTR: Improving Large 3D Reconstruction Models through Geometry and
Texture Refinement", 2024) as a LightningModule.

Stages (one module, ``stage`` chosen in the config; each stage starts from the previous one's
weights with ``init_weights``):

``nerf``
    Triplanes from the input views; volume rendering of the triplane field (256 stratified
    samples per ray, §4.1) at the supervision views, optionally on random ``patch_size^2``
    crops of full-resolution renders (paper: 128² patches of 512² renders). Loss (eq. 1):
    ``MSE + λ_p LPIPS`` with ``λ_p = 0.5``. AdamW lr 1e-4, weight decay 0.05, cosine to 0.
``mesh``
    Density → SDF ``sdf = -(density - s)``, ``s = 10``; differentiable marching cubes (DiffMC's
    role: :func:`~recon3d.render.isosurface.marching_cubes` on CPU, ``diso`` on CUDA) on a
    ``mesh_resolution^3`` grid (paper: 256); mesh rasterisation of the supervision views, colour
    from the colour MLP at the rasterised surface points. Loss (eq. 3): ``rgb MSE + λ_p LPIPS +
    λ_d depth MSE + λ_m mask MSE + λ_r opacity`` with the paper's ``λ = (0.5, 0.5, 1, 0.5)``.
    lr 5e-5.

Per-asset **texture refinement** runs at predict time (``refine``) through the reusable
:class:`~recon3d.models.texture_refiner.TextureRefiner`.

Paper vs official code (snap_gtr), where they differ; the paper is the default:

- field MLP width 512 (paper) vs 32 (official; ``field.init_args.hidden_dim: 32``);
- mesh loss weights depth 0.5 (paper) vs 0.2 (official); ``mesh_loss_weights`` takes either
  (``configs/gtr/mesh.yaml`` documents both);
- texture refinement MSE, 20 iterations (paper) vs L1, 50 iterations (official);
- the opacity regulariser is described only by citation in the paper; we implement the official
  ``ray_opacity`` term: free-space points ``t ~ U(near, surface)`` on supervision rays are
  penalised by ``1 - exp(-σ · |t_far - t|)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from jsonargparse import lazy_instance

from recon3d.data.batch import Batch, Views
from recon3d.data.cameras import Cameras
from recon3d.data.rays import camera_rays
from recon3d.errors import ConfigError
from recon3d.methods.base import NonFiniteGuard, ReconModule, depth_mse, own_instance, warmup_cosine_factor
from recon3d.metrics.protocol import EvaluationProtocol
from recon3d.models.encoders import ConvPatchEncoder, ImageEncoder
from recon3d.models.gtr.field import TriplaneField
from recon3d.models.gtr.generator import TriplaneGenerator
from recon3d.models.gtr.mesh import extract_mesh
from recon3d.models.gtr.network import GTRNetwork
from recon3d.models.texture_refiner import TextureRefiner
from recon3d.render.isosurface import IsoSurfaceExtractor
from recon3d.render.mesh import MeshRasterizer
from recon3d.render.volume import VolumeRenderer, ray_aabb
from recon3d.representations import Meshes, RenderOutput, Triplanes
from recon3d.representations.reconstruction import Reconstruction
from recon3d.utils.checks import check_adamw_options, check_option, merge_weights

__all__ = ["GTRModule", "PAPER_MESH_LOSS", "OFFICIAL_MESH_LOSS"]

#: Mesh-stage loss weights of the paper (§4.1: λ_p=0.5, λ_d=0.5, λ_m=1, λ_r=0.5).
PAPER_MESH_LOSS = {"rgb": 1.0, "lpips": 0.5, "depth": 0.5, "mask": 1.0, "opacity": 0.5}
#: Mesh-stage loss weights of the official code (snap_gtr MeshRenderLoss).
OFFICIAL_MESH_LOSS = {"rgb": 1.0, "lpips": 0.5, "depth": 0.2, "mask": 1.0, "opacity": 0.5}


def _check_options(a: dict) -> None:
    """One :class:`ConfigError` naming ``model.<key>`` for a value that would silently train wrong
    (a NaN or negative loss weight or learning rate, no ray samples)."""
    check_adamw_options(a["lr"], a["weight_decay"], a["betas"], a["warmup_steps"])
    check_option("model.n_samples", a["n_samples"], 1, integer=True)
    check_option("model.patch_size", a["patch_size"], 1, integer=True, allow_none=True)
    check_option("model.object_patch_fraction", a["object_patch_fraction"], 0.0)
    if a["object_patch_fraction"] > 1:
        raise ConfigError(f"model.object_patch_fraction: expected a number in [0, 1], got {a['object_patch_fraction']!r}")
    check_option("model.eval_chunk", a["eval_chunk"], 1, integer=True)
    check_option("model.min_near", a["min_near"], 0.0)
    check_option("model.lambda_lpips", a["lambda_lpips"], 0.0)
    check_option("model.lambda_mask", a["lambda_mask"], 0.0)
    check_option("model.lambda_depth", a["lambda_depth"], 0.0)
    check_option("model.lambda_opacity", a["lambda_opacity"], 0.0)
    check_option("model.mesh_resolution", a["mesh_resolution"], 2, integer=True)
    check_option("model.mesh_density_level", a["mesh_density_level"])
    check_option("model.mesh_smoothing", a["mesh_smoothing"], 0.0)
    check_option("model.mesh_soft_sigma", a["mesh_soft_sigma"], 0.0)
    check_option("model.export_resolution", a["export_resolution"], 2, integer=True)
    check_option("model.turntable_frames", a["turntable_frames"], 0, integer=True)


class GTRModule(ReconModule):
    """GTR: triplane large reconstruction model with NeRF and mesh stages (see module docstring).

    Args:
        encoder: image encoder (conv patch encoder by default; DINOv2 / VAE are one-line swaps).
        generator: triplane transformer + upsampler.
        field: density/colour MLPs over the triplane.
        stage: ``"nerf"`` or ``"mesh"``.
        lr: AdamW learning rate (paper: 1e-4 NeRF stage, 5e-5 mesh stage).
        weight_decay: AdamW weight decay (paper: 0.05).
        betas: AdamW betas (official code: 0.9, 0.95).
        warmup_steps: linear warm-up before the cosine decay to 0.
        n_samples: stratified samples per ray in the NeRF stage (paper: 256).
        patch_size: NeRF-stage supervision on random square crops of this size (paper: 128), or
            None for whole views.
        object_patch_fraction: **not in the paper** (0: every crop uniformly placed, as the paper
            does). This fraction of the crops is centred on a pixel drawn from the target's mask
            (uniform over the object's pixels; a view without mask pixels falls back to a uniform
            crop), so small objects on a large background get more colour supervision per step.
        stratified_jitter: jitter the ray samples while training (standard stratified sampling);
            off makes training deterministic given the data (used to compare DDP with 1 process).
        eval_chunk: rays per volume-rendering chunk (bounds memory).
        min_near: rays start at least this far from the camera (official ``base_nerf``: 0.2; the
            paper is silent).
        last_delta: segment length of the last sample, ``"bin"`` (the official renderer: every
            sample gets its bin, so an empty box renders the background) or ``"inf"`` (NeRF's
            unbounded rule); see :mod:`recon3d.render.volume`.
        lambda_lpips: λ_p (paper: 0.5). Needs the LPIPS weights (``lpips_weights_dir``); set 0
            where they are not available.
        lambda_mask: optional NeRF-stage opacity-vs-mask MSE (not in the paper: 0).
        lambda_depth: optional NeRF-stage depth MSE (not in the paper's NeRF stage: 0; its mesh
            stage has the term, eq. 3): the volume render's expected z-depth against the target
            depth on pixels that are object in the target mask, have a target depth (> 0) and
            opacity > 0.5 in the render. Needs target masks and depths.
        lambda_opacity: optional NeRF-stage free-space term (not in the paper's NeRF stage: 0; its
            mesh stage has it, λ_r): the density at random points between the ray's entry and the
            true surface (target depth; the box's far side on background pixels) is penalised by
            ``1 - exp(-σ · |t_far - t|)``. Needs target depths.
        lpips_weights_dir: folder with the LPIPS VGG backbone and heads (see recon3d.metrics.lpips).
        mesh_resolution: marching-cubes grid (paper: 256).
        mesh_density_level: ``s`` in ``sdf = -(density - s)`` (paper/official: 10).
        mesh_smoothing: **not in the paper** (0: none, as GTR): Gaussian sigma in voxels of the
            density grid before marching cubes, for every extracted mesh (mesh stage, evaluation,
            export); see :func:`~recon3d.models.gtr.mesh.smooth_grid`.
        mesh_loss_weights: rgb/lpips/depth/mask/opacity weights (paper defaults).
        mesh_soft_sigma: soft-silhouette width in pixels for the torch rasteriser's mask gradient.
        render_backend: ``auto | torch | nvdiffrast`` for mesh rasterisation, ``auto | torch | diso``
            for iso-surfaces (one name applies to both; ``auto`` picks CUDA libraries on GPU).
        refine: texture refinement at predict time (None: off).
        export_resolution: marching-cubes grid for exported meshes.
        turntable_frames: frames of the exported turntable (0: none).
        evaluation, init_weights, init_weights_ignore, nonfinite, vis_views, validation_mode, eval_seed: see
            :class:`~recon3d.methods.base.ReconModule`.

    Run-time options (the command line wins over a checkpoint, :class:`ReconModule`): evaluation
    chunk, iso-surface level, smoothing and grids, rendering backend, texture refinement, export
    resolution and turntable, LPIPS weight folder. In the mesh stage ``mesh_density_level``,
    ``mesh_smoothing`` and ``mesh_resolution`` are also the training iso-surface: give the saved
    values when resuming one.
    """

    RUNTIME_OPTIONS = ReconModule.RUNTIME_OPTIONS | {
        "eval_chunk", "mesh_resolution", "mesh_density_level", "mesh_smoothing", "render_backend", "refine", "export_resolution",
        "turntable_frames", "lpips_weights_dir",
    }
    EXPORT_REPRESENTATION = Meshes

    def __init__(
        self,
        encoder: ImageEncoder = lazy_instance(ConvPatchEncoder, width=1024, patch_size=16),
        generator: TriplaneGenerator = lazy_instance(TriplaneGenerator),
        field: TriplaneField = lazy_instance(TriplaneField),
        stage: Literal["nerf", "mesh"] = "nerf",
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        n_samples: int = 256,
        patch_size: int | None = 128,
        object_patch_fraction: float = 0.0,
        stratified_jitter: bool = True,
        eval_chunk: int = 8192,
        min_near: float = 0.2,
        last_delta: Literal["bin", "inf"] = "bin",
        lambda_lpips: float = 0.5,
        lambda_mask: float = 0.0,
        lambda_depth: float = 0.0,
        lambda_opacity: float = 0.0,
        lpips_weights_dir: str | None = None,
        mesh_resolution: int = 256,
        mesh_density_level: float = 10.0,
        mesh_smoothing: float = 0.0,
        mesh_loss_weights: dict[str, float] | None = None,
        mesh_soft_sigma: float = 1.0,
        render_backend: str = "auto",
        refine: TextureRefiner | None = None,
        export_resolution: int = 256,
        turntable_frames: int = 24,
        evaluation: EvaluationProtocol | None = None,
        init_weights: str | None = None,
        nonfinite: NonFiniteGuard | None = None,
        vis_views: int = 4,
        init_weights_ignore: list[str] | None = None,
        validation_mode: Literal["render", "loss"] = "render",
        eval_seed: int = 0,
    ):
        super().__init__(evaluation=evaluation, init_weights=init_weights, nonfinite=nonfinite, vis_views=vis_views,
                         init_weights_ignore=init_weights_ignore, validation_mode=validation_mode, eval_seed=eval_seed)
        if stage not in ("nerf", "mesh"):
            raise ConfigError(f"model.stage: expected 'nerf' or 'mesh', got {stage!r}")
        _check_options(locals())
        self.save_hyperparameters()  # sub-models: their config (recon3d fit) or left out, never pickled (ReconModule)
        # Checked before anything is built, so a bad weight is the one error line.
        self.mesh_loss_weights = merge_weights("model.mesh_loss_weights", PAPER_MESH_LOSS, mesh_loss_weights)
        self.net = GTRNetwork(*(own_instance(m) for m in (encoder, generator, field)))
        self.stage = stage
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        self.patch_size, self.object_patch_fraction = patch_size, float(object_patch_fraction)
        self.lambda_lpips, self.lambda_mask, self.lambda_depth = lambda_lpips, lambda_mask, lambda_depth
        self.lambda_opacity = lambda_opacity
        self.volume = VolumeRenderer(aabb=field.aabb, n_samples=n_samples, background="white", chunk=eval_chunk,
                                     perturb=None if stratified_jitter else False, min_near=min_near, last_delta=last_delta)
        self.mesh_resolution, self.mesh_density_level = mesh_resolution, mesh_density_level
        self.mesh_smoothing = float(mesh_smoothing)
        self.mesh_soft_sigma = mesh_soft_sigma
        self.render_backend = render_backend
        self.refiners = [refine] if refine is not None else []
        self.export_resolution, self.turntable_frames = export_resolution, turntable_frames
        self.lpips_weights_dir = lpips_weights_dir
        self.lpips = None
        needs_lpips = lambda_lpips > 0 if stage == "nerf" else self.mesh_loss_weights["lpips"] > 0
        if needs_lpips:
            from recon3d.metrics.lpips import LPIPSLoss

            # Refuses (names the files) when the pretrained LPIPS weights are absent.
            self.lpips = LPIPSLoss("vgg", pretrained=True, weights_dir=lpips_weights_dir, resize=256)
        self._rasterizer: MeshRasterizer | None = None
        self._iso: IsoSurfaceExtractor | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def field(self) -> TriplaneField:
        return self.net.field

    def triplanes(self, views: Views) -> torch.Tensor:
        """``(B, 3, C, R, R)`` from the input views."""
        return self.net.triplanes(views.images, views.masks, views.cameras)

    def field_views(self, views: Views) -> Views | None:
        """The input views the field reads besides the triplane (images, masks, cameras), or None
        for a field of the triplane alone (``field.needs_views``)."""
        if not self.field.needs_views:
            return None
        return Views(views.images, views.cameras, views.masks)

    def _field_fn(self, planes: torch.Tensor, views: Views | None = None):
        return lambda pts: self.field(planes, pts, views)

    def rasterizer(self) -> MeshRasterizer:
        if self._rasterizer is None:
            sigma = self.mesh_soft_sigma if self.training or self.stage == "mesh" else 0.0
            self._rasterizer = MeshRasterizer(self._backend("nvdiffrast"), device=self.device, sigma=sigma)
        return self._rasterizer

    def _backend(self, library: str) -> str:
        return self.render_backend if self.render_backend in ("auto", "torch") else (self.render_backend if self.render_backend == library else "auto")

    def _extractor(self) -> IsoSurfaceExtractor:
        if self._iso is None:
            self._iso = IsoSurfaceExtractor(self._backend("diso"), device=self.device)
        return self._iso

    def mesh(self, planes: torch.Tensor, object_id: str = "object", differentiable: bool = True, resolution: int | None = None,
             views: Views | None = None):
        """The mesh of one object's triplane ``(1, 3, C, R, R)`` (``views``: its input views, for a
        field that reads them): ``verts (V, 3)``, ``faces (F, 3)``."""
        return extract_mesh(
            self.field, planes, resolution or self.mesh_resolution, self.mesh_density_level, self.field.aabb,
            differentiable=differentiable, object_id=object_id, extractor=self._extractor() if differentiable else None,
            views=views, smoothing=self.mesh_smoothing,
        )

    # ------------------------------------------------------------------ rendering
    def render_volume(self, planes: torch.Tensor, cameras: Cameras, views: Views | None = None) -> RenderOutput:
        return self.volume(self._field_fn(planes, views), cameras)

    def render_mesh(self, planes: torch.Tensor, cameras: Cameras, object_ids: list[str], differentiable: bool,
                    decoder: TriplaneField | None = None, views: Views | None = None) -> RenderOutput:
        """Mesh-render each object's extracted mesh: ``rgb``, ``alpha`` (the soft silhouette if
        available), ``depth`` and the extra ``hard_mask``; colour from ``decoder`` (default the field).
        ``views``: the input views of batch ``(B, V)``, for a field that reads them."""
        decoder = self.field if decoder is None else decoder
        outs = []
        for b in range(planes.shape[0]):
            p = planes[b : b + 1]
            vb = None if views is None else views.select(b)
            verts, faces = self.mesh(p, object_ids[b], differentiable, views=vb)
            frags = self.rasterizer()(verts[None], faces, cameras[b : b + 1])
            pts = frags.interpolate(verts[None])  # 1, V, 3, H, W
            V, H, W = pts.shape[1], pts.shape[3], pts.shape[4]
            col = decoder.color(p, pts.permute(0, 1, 3, 4, 2).reshape(1, -1, 3), vb).reshape(1, V, H, W, 3).permute(0, 1, 4, 2, 3)
            hard = frags.mask
            mask = frags.soft_mask if frags.soft_mask is not None else hard
            rgb = col * hard + (1 - hard) * 1.0
            # The soft silhouette carries the gradient that moves silhouette vertices.
            rgb = rgb * mask + (1 - mask) * 1.0 if frags.soft_mask is not None else rgb
            outs.append(RenderOutput(rgb, mask, frags.depth, extras={"hard_mask": hard}))
        return RenderOutput.cat(outs)

    # ------------------------------------------------------------------ reconstruct once
    def reconstruct(self, batch: Batch) -> Reconstruction:
        """The triplanes of every object: ``Triplanes(planes (B, 3, C, R, R), decoder=field)`` (with
        the input views when the field reads them). Meshes are extracted on demand
        (:meth:`reconstruction_meshes`) and cached in ``extras``."""
        batch.require("inputs.cameras", who="GTR")  # the encoder's Plücker ray channels
        tri = Triplanes(self.triplanes(batch.inputs), self.field, self.field.aabb, self.field_views(batch.inputs))
        return Reconstruction(list(batch.object_ids), tri)

    def render_reconstruction(self, rec: Reconstruction, cameras: Cameras) -> RenderOutput:
        """Evaluation renders: the volume render (nerf stage) or the mesh render (mesh stage) of
        each object's triplanes with its decoder (a refined one after texture refinement).
        ``ReconModule``'s eval step clamps colour to [0, 1] for every method, as GTR's official
        renderer does: the colour head's widened sigmoid reaches slightly outside."""
        parts = _triplanes_of(rec)
        outs, b = [], 0
        for tri in parts:
            n = tri.batch_size
            cams = cameras[b : b + n]
            if self.stage == "nerf":
                outs.append(self.volume(tri, cams))
            else:
                outs.append(self.render_mesh(tri.planes, cams, rec.object_ids[b : b + n], differentiable=False, decoder=tri.decoder,
                                             views=tri.views))
            b += n
        return outs[0] if len(outs) == 1 else RenderOutput.cat(outs)

    # ------------------------------------------------------------------ losses
    def _random_patches(self, targets: Views) -> Views:
        """The supervision views cut to random ``patch_size^2`` crops (images, masks, depths) with
        the crop cameras (the whole views when there is no patch size or it is not smaller)."""
        cams = targets.cameras
        P = self.patch_size
        if P is None or P >= min(cams.width, cams.height):
            return Views(targets.images, cams, targets.masks, targets.depths)
        B, V = cams.batch_shape
        top = torch.randint(0, cams.height - P + 1, (B, V))
        left = torch.randint(0, cams.width - P + 1, (B, V))
        if self.object_patch_fraction > 0 and targets.masks is not None:
            top, left = self._object_centred(targets.masks, top, left, P)
        K = cams.K.clone()
        K[..., 0, 2] -= left.to(K)
        K[..., 1, 2] -= top.to(K)
        rows = top[..., None] + torch.arange(P)  # B V P
        cols = left[..., None] + torch.arange(P)

        def crop(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            idx_r = rows[:, :, None, :, None].expand(B, V, x.shape[2], P, x.shape[-1]).to(x.device)
            x = torch.gather(x, 3, idx_r)
            idx_c = cols[:, :, None, None, :].expand(B, V, x.shape[2], P, P).to(x.device)
            return torch.gather(x, 4, idx_c)

        return Views(crop(targets.images), Cameras(cams.c2w, K, P, P), crop(targets.masks), crop(targets.depths))

    def _object_centred(self, masks: torch.Tensor, top: torch.Tensor, left: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace a random ``object_patch_fraction`` of the crop corners ``(B, V)`` by crops
        centred on a pixel drawn uniformly from each view's mask ``(B, V, 1, H, W)``."""
        B, V, _, H, W = masks.shape
        flat = (masks[:, :, 0] > 0.5).reshape(B * V, H * W).float().cpu()
        has = flat.sum(1) > 0
        pick = torch.rand(B * V) < self.object_patch_fraction
        use = pick & has
        if not bool(use.any()):
            return top, left
        pix = torch.multinomial(flat[use], 1)[:, 0]  # one object pixel per chosen view
        top, left = top.reshape(-1).clone(), left.reshape(-1).clone()
        top[use] = (pix // W - P // 2).clamp(0, H - P)
        left[use] = (pix % W - P // 2).clamp(0, W - P)
        return top.reshape(B, V), left.reshape(B, V)

    def _lpips(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lpips(pred.flatten(0, 1), target.flatten(0, 1))

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        batch.require("inputs.cameras", "targets.cameras", who="GTR")  # Plücker ray inputs, rendered targets
        if self.stage == "nerf" and self.lambda_depth > 0:
            batch.require("targets.masks", "targets.depths", who="GTR's NeRF-stage depth term (model.lambda_depth > 0)")
        if self.stage == "nerf" and self.lambda_opacity > 0:
            batch.require("targets.depths", who="GTR's NeRF-stage free-space term (model.lambda_opacity > 0)")
        planes = self.triplanes(batch.inputs)
        views = self.field_views(batch.inputs)
        if self.stage == "nerf":
            return self._nerf_losses(planes, batch, views)
        return self._mesh_losses(planes, batch, views)

    def _nerf_losses(self, planes: torch.Tensor, batch: Batch, views: Views | None = None) -> dict[str, torch.Tensor]:
        patch = self._random_patches(batch.targets)
        target, mask = patch.images, patch.masks
        out = self.render_volume(planes, patch.cameras, views)
        terms = {"rgb": F.mse_loss(out["rgb"], target)}
        loss = terms["rgb"]
        if self.lpips is not None and self.lambda_lpips > 0:
            terms["lpips"] = self._lpips(out["rgb"], target)
            loss = loss + self.lambda_lpips * terms["lpips"]
        if self.lambda_mask > 0 and mask is not None:
            terms["mask"] = F.mse_loss(out["alpha"], mask)
            loss = loss + self.lambda_mask * terms["mask"]
        if self.lambda_depth > 0:
            # the mesh stage's depth term (eq. 3) on the volume render's expected z-depth, over
            # pixels that are object in the target and opaque enough in the render to have a depth
            terms["depth"] = depth_mse(out["depth"], patch.depths, (mask > 0.5) & (out["alpha"].detach() > 0.5))
            loss = loss + self.lambda_depth * terms["depth"]
        if self.lambda_opacity > 0:
            # the mesh stage's free-space term (official ray_opacity) on the whole supervision views
            terms["opacity"] = self._free_space_opacity(planes, batch.targets, views=views)
            loss = loss + self.lambda_opacity * terms["opacity"]
        terms["psnr"] = -10 * torch.log10(terms["rgb"].detach().clamp_min(1e-10))
        terms["loss"] = loss
        return terms

    def _mesh_losses(self, planes: torch.Tensor, batch: Batch, views: Views | None = None) -> dict[str, torch.Tensor]:
        batch.require("targets.masks", "targets.depths", who="GTR's mesh stage")
        tg = batch.targets
        out = self.render_mesh(planes, tg.cameras, batch.object_ids, differentiable=True, views=views)
        w = self.mesh_loss_weights
        terms = {"rgb": F.mse_loss(out["rgb"], tg.images), "mask": F.mse_loss(out["alpha"], tg.masks)}
        terms["depth"] = depth_mse(out["depth"], tg.depths, (out["hard_mask"] > 0.5) & (tg.masks > 0.5))
        terms["opacity"] = self._free_space_opacity(planes, tg, views=views)
        if self.lpips is not None and w["lpips"] > 0:
            terms["lpips"] = self._lpips(out["rgb"], tg.images)
        loss = sum(w[k] * v for k, v in terms.items() if k in w)
        terms["psnr"] = -10 * torch.log10(terms["rgb"].detach().clamp_min(1e-10))
        terms["loss"] = loss
        return terms

    def _free_space_opacity(self, planes: torch.Tensor, targets: Views, n_rays: int = 1024, views: Views | None = None) -> torch.Tensor:
        """Official ``ray_opacity``: free-space points before the true surface should be empty."""
        cams = targets.cameras
        B, V = cams.batch_shape
        H, W = cams.height, cams.width
        o, d = camera_rays(cams)  # B V H W 3
        fwd = cams.c2w[..., :3, 2][:, :, None, None, :]
        t_surface = targets.depths[:, :, 0] / (d * fwd).sum(-1).clamp_min(1e-6)
        o, d, t_surface = o.reshape(B, -1, 3), d.reshape(B, -1, 3), t_surface.reshape(B, -1)
        sel = torch.randint(0, V * H * W, (B, min(n_rays, V * H * W)), device=o.device)
        idx3 = sel[..., None].expand(-1, -1, 3)
        o, d, t_surface = torch.gather(o, 1, idx3), torch.gather(d, 1, idx3), torch.gather(t_surface, 1, sel)
        near, far, hit = ray_aabb(o, d, self.volume.aabb)
        t_far = torch.where(t_surface > 0, torch.minimum(t_surface - 0.02, far), far)
        valid = hit & (t_far > near)
        t = near + torch.rand_like(near) * (t_far - near).clamp_min(0)
        sigma = self.field.density(planes, o + t[..., None] * d, views)
        pen = 1 - torch.exp(-sigma * (t_far - t).clamp_min(0))
        return (pen * valid).sum() / valid.sum().clamp_min(1)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up for ``warmup_steps``, then cosine decay to 0 at the last step (§4.1)."""
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self.trainer is not None else 1
        return warmup_cosine_factor(step, total, self.warmup_steps)

    # ------------------------------------------------------------------ geometry and export
    @property
    def empty_surface_reason(self) -> str:
        return f"empty surface: the density never reaches mesh_density_level {self.mesh_density_level:g}"

    @torch.no_grad()
    def reconstruction_meshes(self, rec: Reconstruction, batch: Batch | None = None, resolution: int | None = None) -> Meshes:
        """Each object's mesh (geometry only) at ``resolution`` (default ``export_resolution``); an
        object whose density never reaches the level gets an empty mesh. Cached in
        ``rec.extras["mesh"]``, so geometry metrics, export and texture refinement (which needs
        the fixed mesh) share one extraction."""
        from recon3d.render.isosurface import EmptySurfaceError

        res = resolution or self.export_resolution
        cached = rec.get("mesh")
        if isinstance(cached, Meshes) and rec.get("mesh_resolution") == res:
            return cached
        verts, faces = [], []
        b = 0
        for tri in _triplanes_of(rec):
            for j in range(tri.batch_size):
                one = tri[j]
                p = one.planes
                try:
                    v, f = self.mesh(p, rec.object_ids[b], differentiable=False, resolution=res, views=one.views)
                except EmptySurfaceError:
                    v, f = p.new_zeros(0, 3), torch.zeros(0, 3, dtype=torch.long, device=p.device)
                verts.append(v)
                faces.append(f)
                b += 1
        meshes = Meshes(verts, faces)
        rec.extras["mesh"], rec.extras["mesh_resolution"] = meshes, res
        return meshes

    def export_reconstruction(self, rec: Reconstruction, out_dir: Path, suffix: str = "", views: Views | None = None) -> dict[str, str]:
        """Write the object's mesh, vertex colours from its decoder (the refined one for a refined
        reconstruction, same geometry), in the ``export_formats`` (default ``mesh<suffix>.glb``,
        ``.obj`` and, with ``turntable_frames`` and input ``views``, ``turntable<suffix>.gif``)."""
        from recon3d.render.export import export_representation
        from recon3d.render.isosurface import EmptySurfaceError

        mesh = self.reconstruction_meshes(rec)
        if mesh.num_faces[0] == 0:
            raise EmptySurfaceError(f"object {rec.object_ids[0]}: {self.empty_surface_reason}")
        tri = _triplanes_of(rec)[0][0]
        with torch.no_grad():
            colors = tri.decoder.color(tri.planes, mesh.verts[0][None].to(tri.planes), tri.views)[0].clamp(0, 1)
        cams = self._turntable_cameras(views)
        formats = self.export_formats or (("glb", "obj", "gif") if cams is not None else ("glb", "obj"))
        return export_representation(Meshes(mesh.verts, mesh.faces, [colors]), Path(out_dir), formats, suffix=suffix,
                                     turntable=cams, fps=12, render_opts={"backend": self._backend("nvdiffrast")})

    def _turntable_cameras(self, views: Views | None) -> Cameras | None:
        """An orbit at the input views' mean distance and field of view (None without them)."""
        from recon3d.render.export import turntable_cameras

        if not self.turntable_frames or views is None or views.cameras is None:
            return None
        return turntable_cameras(self.turntable_frames, radius=float(views.cameras.centers[0].norm(dim=-1).mean()),
                                 fov_y_deg=float(torch.rad2deg(views.cameras.fov_y[0].mean())), size=128)


def _triplanes_of(rec: Reconstruction) -> list[Triplanes]:
    """The reconstruction's triplanes as a list (one batched entry, or one per refined object)."""
    rep = rec.representation
    parts = list(rep) if isinstance(rep, (list, tuple)) else [rep]
    if not all(isinstance(p, Triplanes) for p in parts):
        raise ConfigError(f"GTR: expected a reconstruction of Triplanes, got {type(rep).__name__}")
    return parts
