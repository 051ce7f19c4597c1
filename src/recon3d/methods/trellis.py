"""TRELLIS (Xiang et al. 2025, "Structured 3D Latents for Scalable and Versatile 3D Generation")
in recon3d: its training stages on recon3d data and image(s)-to-3D as a method.

Networks: :mod:`recon3d.models.trellis` (upstream's classes and key names; official
``ckpts/<name>.json`` + ``.safetensors`` and ``pipeline.json`` load there). This file holds the
Lightning side, thin:

- :class:`TrellisSSVAEModule` — stage "SS-VAE": the sparse-structure VAE on the **surface** voxels
  of the ground-truth mesh at ``resolution`` (TRELLIS: 64, voxel 1/64 of its unit cube;
  :func:`recon3d.geometry.voxelize.surface_voxels`), dice + KL ``1e-3`` (upstream
  ``configs/vae/ss_vae_conv3d_16l8_fp16.json``).
- :class:`TrellisSSFlowModule` — stage "SS flow": rectified flow (:class:`~recon3d.models.flow.RectifiedFlowObjective`,
  TRELLIS's: ``t = sigmoid(N(1, 1))`` per object, condition dropped to zeros with p 0.1,
  target ``(1 - sigma_min) eps - x0``) on the latents a frozen SS-VAE encoder gives the surface
  voxels, conditioned on DINOv2 tokens of one input view.
- :class:`TrellisModule` — image(s)-to-3D (a :class:`~recon3d.methods.base.ReconModule`):
  condition -> SS flow (:class:`~recon3d.models.flow.FlowEulerSampler`, CFG in TRELLIS's
  convention inside ``cfg_interval``) -> SS-VAE decode -> occupied voxels (``logit > 0``; an
  empty decode is one :class:`~recon3d.errors.DataError` naming the object) -> SLAT flow
  (de-normalised by the fixed mean/std) -> decoders -> :class:`Gaussians` and :class:`Meshes`.

Several input views (TRELLIS ``run_multi_image``, ``trellis_image_to_3d.py``):

- ``"stochastic"`` (TRELLIS-S): step ``k`` of each sampler uses view ``k mod V``'s condition
  alone (upstream's ``cond_indices = arange(steps) % num_images``: round-robin, not random);
- ``"multidiffusion"`` (TRELLIS-M): every step averages the conditional velocity over the views,
  then applies guidance once against the zero condition, ``(1 + w) mean_i v(c_i) - w v(0)``
  (no guidance outside ``cfg_interval``: the mean alone).

Both reduce to single-image sampling for one view, and agree with each other when every view is
the same image. Implemented by :class:`~recon3d.models.flow.FlowEulerSampler`'s
``multi_condition``; nothing else differs between the modes.

Frames: TRELLIS's object lives in ``[-0.5, 0.5]^3``, Z up (its renders: ``utils/render_utils.py``);
recon3d normalises objects to ``[-1, 1]^3`` (DESIGN.md). The map at the edge is
``p_recon3d = 2 * A @ p_trellis`` with ``A = I`` for Z-up datasets (the synthetic set, Objaverse
renders) and the rotation taking +Z to +Y (``x -> x, y -> -z, z -> y``) for ``up_axis: y``;
voxel grids are the same cube at the same resolution (axes permuted for Y up). Gaussians
(means, scales x2, rotations composed with ``A``), meshes and voxels leave in recon3d's frame;
ground-truth meshes enter TRELLIS's frame through the inverse map.

Decoders (``gaussian_decoder``, ``mesh_decoder``): typed parts (``class_path``), TRELLIS's
:class:`~recon3d.models.trellis.SLatGaussianDecoder` (32 Gaussians per voxel, TRELLIS's
activations) and :class:`~recon3d.models.trellis.SLatMeshDecoder` (FlexiCubes features at 4x the
resolution, extracted by marching cubes: not FlexiCubes, see that module), run through their
``decode(slat, scale=1)`` (TRELLIS's frame; this module maps it); any other part is called as
``decoder(slat: SparseVoxels) -> Gaussians | Meshes`` in TRELLIS's frame. Without a Gaussian
decoder the Gaussians are the sampled sparse structure itself (one grey Gaussian per occupied
voxel, half a voxel wide): what the SS stages produce, not TRELLIS's appearance. Without a mesh
decoder the mesh is the marching-cubes surface of the SS-VAE decoder's occupancy logits at 0
(the structure's hull at the SS resolution), not FlexiCubes on the SLAT mesh decoder.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.data.batch import Batch, Views
from recon3d.errors import CheckpointError, ConfigError, DataError, ShapeError
from recon3d.methods.base import NonFiniteGuard, ReconModule, own_instance
from recon3d.models.flow import FlowEulerSampler, RectifiedFlowObjective
from recon3d.models.trellis.conditioning import TrellisImageCondition
from recon3d.models.trellis.slat_flow import SLatFlowModel
from recon3d.models.trellis.ss_flow import SparseStructureFlowModel
from recon3d.models.trellis.ss_vae import SparseStructureDecoder, SparseStructureEncoder, occupancy_to_voxels, ss_vae_loss
from recon3d.representations import Gaussians, Meshes, SparseVoxels
from recon3d.representations.reconstruction import Reconstruction, object_seed
from recon3d.utils.checks import check_adamw_options, check_option

__all__ = ["TrellisSSVAEModule", "TrellisSSFlowModule", "TrellisModule", "TRELLIS_SCALE", "trellis_axes",
           "trellis_to_world_points", "world_to_trellis_points", "trellis_voxels_to_world", "structure_gaussians",
           "DEFAULT_SS_SAMPLER", "DEFAULT_SLAT_SAMPLER", "checkpoint_slat_normalization", "resolve_slat_normalization",
           "normalize_slat", "denormalize_slat", "ss_flow_targets"]

log = logging.getLogger(__name__)

#: recon3d's cube [-1, 1]^3 over TRELLIS's [-0.5, 0.5]^3.
TRELLIS_SCALE = 2.0
UP_AXES = ("z", "y")

#: Sampler params when no ``pipeline`` folder is given: those of TRELLIS-image-large's
#: ``pipeline.json`` (Hugging Face ``microsoft/TRELLIS-image-large``), which upstream's
#: ``TrellisImageTo3DPipeline.from_pretrained`` (``trellis/pipelines/trellis_image_to_3d.py``) reads
#: as ``sparse_structure_sampler`` / ``slat_sampler`` = ``FlowEulerGuidanceIntervalSampler``
#: ``{"args": {"sigma_min": 1e-5}, "params": {"steps": 25, "cfg_strength": 5.0, "cfg_interval": [0.5, 1.0],
#: "rescale_t": 3.0}}`` for both stages. The file itself is not readable from here: these values
#: are the ones public copies of it agree on, not read from the file; a given ``pipeline``
#: replaces them, and :class:`TrellisModule` logs one warning naming the defaults a run samples
#: with. Not upstream's other defaults: the sampler classes' own (``trellis/pipelines/samplers/
#: flow_euler.py``: steps 50, rescale_t 1, cfg_strength 3, cfg_interval (0, 1)) and the demo's
#: (``app.py``: 12 steps, CFG 7.5 for the structure and 3 for the latents) differ.
DEFAULT_SS_SAMPLER = {"steps": 25, "cfg_strength": 5.0, "cfg_interval": (0.5, 1.0), "rescale_t": 3.0, "sigma_min": 1e-5}
DEFAULT_SLAT_SAMPLER = {"steps": 25, "cfg_strength": 5.0, "cfg_interval": (0.5, 1.0), "rescale_t": 3.0, "sigma_min": 1e-5}
_SAMPLER_KEYS = ("steps", "cfg_strength", "cfg_interval", "rescale_t", "sigma_min", "guidance_rescale")


# ---------------------------------------------------------------------------------- frames
def trellis_axes(up_axis: str) -> torch.Tensor:
    """``(3, 3)`` rotation ``A`` with ``p_recon3d = TRELLIS_SCALE * A @ p_trellis`` (module docstring)."""
    if up_axis == "z":
        return torch.eye(3)
    if up_axis == "y":
        return torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    raise ConfigError(f"up_axis: expected one of {list(UP_AXES)}, got {up_axis!r}")


def trellis_to_world_points(p: torch.Tensor, up_axis: str = "z") -> torch.Tensor:
    """``(..., 3)`` points in TRELLIS's frame -> recon3d's world."""
    A = trellis_axes(up_axis).to(p)
    return TRELLIS_SCALE * p @ A.T


def world_to_trellis_points(p: torch.Tensor, up_axis: str = "z") -> torch.Tensor:
    """Inverse of :func:`trellis_to_world_points`."""
    A = trellis_axes(up_axis).to(p)
    return (p / TRELLIS_SCALE) @ A


def trellis_voxels_to_world(v: SparseVoxels, up_axis: str = "z") -> SparseVoxels:
    """Voxels on TRELLIS's grid -> the same cells of recon3d's ``[-1, 1]^3`` grid (same resolution):
    identity for Z up; ``(i, j, k) -> (i, k, R - 1 - j)`` for Y up."""
    if up_axis == "z":
        return v
    trellis_axes(up_axis)
    c = v.coords
    R = v.resolution
    coords = torch.stack([c[:, 0], c[:, 1], c[:, 3], R - 1 - c[:, 2]], 1)
    return SparseVoxels(coords, v.feats, R, v.batch_size)


def _quat_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product of ``(..., 4)`` wxyz quaternions."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


def _axes_quat(up_axis: str) -> torch.Tensor:
    # A for Y up is the rotation by -90 deg about x.
    return torch.tensor([1.0, 0.0, 0.0, 0.0]) if up_axis == "z" else torch.tensor([math.sqrt(0.5), -math.sqrt(0.5), 0.0, 0.0])


def gaussians_to_world(g: Gaussians, up_axis: str = "z") -> Gaussians:
    """Gaussians in TRELLIS's frame -> recon3d's: means mapped, scales x ``TRELLIS_SCALE``,
    rotations composed with ``A``; opacities and colours unchanged."""
    q = _axes_quat(up_axis).to(g.quats)
    quats = g.quats if up_axis == "z" else _quat_mul(q.expand_as(g.quats), g.quats)
    return Gaussians(trellis_to_world_points(g.means, up_axis), quats, g.scales * TRELLIS_SCALE, g.opacities, g.colors,
                     g.sh_degree, g.counts if g.is_packed else None)


def meshes_to_world(m: Meshes, up_axis: str = "z") -> Meshes:
    return Meshes([trellis_to_world_points(v, up_axis) for v in m.verts], m.faces, m.vertex_colors, m.uvs, m.textures)


def structure_gaussians(voxels: SparseVoxels, color: float = 0.5, opacity: float = 0.95) -> Gaussians:
    """One isotropic Gaussian per voxel of ``voxels`` (recon3d's ``[-1, 1]^3`` grid) at its centre,
    standard deviation half a voxel, grey: the sparse structure drawn as Gaussians (packed)."""
    centers = voxels.centers()
    N = centers.shape[0]
    h = 2.0 / voxels.resolution
    dev, dt = centers.device, centers.dtype
    quats = torch.zeros(N, 4, device=dev, dtype=dt)
    quats[:, 0] = 1
    return Gaussians(centers, quats, torch.full((N, 3), 0.5 * h, device=dev, dtype=dt), torch.full((N,), opacity, device=dev, dtype=dt),
                     torch.full((N, 3), color, device=dev, dtype=dt), counts=voxels.counts.tolist())


# ---------------------------------------------------------------------------------- shared
class _TrellisBase(ReconModule):
    """What the TRELLIS modules share: ground-truth surface voxels in TRELLIS's frame, image
    conditions of the input views, per-object generators, AdamW over the trained part."""

    def _init_common(self, up_axis: str, lr: float, weight_decay: float, betas, voxel_spacing: float) -> None:
        trellis_axes(up_axis)
        check_adamw_options(lr, weight_decay, betas)
        check_option("model.voxel_spacing", voxel_spacing, 0.0, strict=True)
        self.up_axis, self.lr, self.weight_decay, self.betas = up_axis, float(lr), float(weight_decay), tuple(betas)
        self.voxel_spacing = float(voxel_spacing)
        self._gt_cache: dict[tuple[str, int], torch.Tensor] = {}

    # -------------------------------------------------------------- ground truth
    def surface_occupancy(self, batch: Batch, resolution: int) -> torch.Tensor:
        """``(B, 1, R, R, R)`` float occupancy of the ground-truth surface voxels on TRELLIS's grid
        (``[-0.5, 0.5]^3``): from the mesh files when the batch has them, else from the surface
        samples (coverage then depends on their number). Cached per object."""
        from recon3d.geometry.voxelize import points_to_voxels, surface_voxels

        geo = batch.geometry
        paths = geo.mesh_paths if geo.mesh_paths and all(geo.mesh_paths) else None
        if paths is None and geo.surface_points is None:
            raise DataError(f"batch of {list(batch.object_ids)[:3]}", "TRELLIS's sparse-structure stages need the ground-truth "
                            "surface (geometry.mesh_paths or geometry.surface_points); set data.with_geometry: true")
        out = []
        for b, oid in enumerate(batch.object_ids):
            key = (oid, resolution)
            occ = self._gt_cache.get(key)
            if occ is None:
                if paths is not None:
                    import trimesh

                    m = trimesh.load(paths[b], force="mesh", process=False)
                    verts = torch.as_tensor(m.vertices, dtype=torch.float64)
                    faces = torch.as_tensor(m.faces, dtype=torch.int64)
                    occ = surface_voxels(world_to_trellis_points(verts, self.up_axis), faces, resolution, (-0.5, 0.5), self.voxel_spacing)
                else:
                    pts = geo.surface_points[b].double().cpu()
                    occ = points_to_voxels(world_to_trellis_points(pts, self.up_axis), resolution, (-0.5, 0.5))
                if len(self._gt_cache) > 4096:
                    self._gt_cache.clear()
                self._gt_cache[key] = occ
            out.append(occ)
        return torch.stack(out)[:, None].to(device=self.device, dtype=torch.float32)

    # -------------------------------------------------------------- conditions
    @staticmethod
    def view_conditions(condition: TrellisImageCondition, views: Views, background, indices: list[int]) -> list[torch.Tensor]:
        """DINOv2 tokens ``(B, L, C)`` of each input view in ``indices`` (masks used for TRELLIS's crop)."""
        out = []
        for v in indices:
            masks = views.masks[:, v] if views.masks is not None else None
            out.append(condition(views.images[:, v], masks, background))
        return out

    def step_generators(self, batch: Batch, salt: int = 0) -> list[torch.Generator]:
        """One CPU generator per object, seeded by its id and the global step (resume-exact)."""
        step = int(self.global_step) if self._trainer is not None else 0
        return [torch.Generator().manual_seed(object_seed(oid, 1_000_003 * salt + step)) for oid in batch.object_ids]

    def _train_params(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def rasterizer(self, device: torch.device | str | None = None):
        """The Gaussian rasteriser of ``self.render_backend`` on white for ``device``'s kind (None:
        the module's), built once per kind (modules that render set ``render_backend`` and
        ``_rasterizer = None``)."""
        kind = torch.device(device or self.device).type
        if self._rasterizer is None or self._rasterizer[0] != kind:
            from recon3d.render.gaussians import GaussianRasterizer

            self._rasterizer = (kind, GaussianRasterizer(self.render_backend, device=kind, background="white"))
        return self._rasterizer[1]

    def configure_optimizers(self):
        params = self._train_params()
        if not params:
            raise ConfigError(f"{type(self).__name__}: nothing to train (every part is frozen)")
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)


def _background(batch: Batch) -> torch.Tensor | None:
    return batch.background


def _load_frozen_encoder(encoder: nn.Module, weights: str | None, prefix: str) -> None:
    encoder.requires_grad_(False)
    if weights is None:
        return
    from recon3d.utils.checkpoint import load_frozen

    load_frozen(encoder, weights, prefix=prefix)


# ---------------------------------------------------------------------------------- SS-VAE stage
class TrellisSSVAEModule(_TrellisBase):
    """TRELLIS's sparse-structure VAE stage on recon3d data (module docstring).

    Args:
        encoder, decoder: :class:`SparseStructureEncoder` / :class:`SparseStructureDecoder`
            (TRELLIS-image-large: channels [32, 128, 512] / [512, 128, 32], latent 8).
        resolution: occupancy grid side (TRELLIS: 64).
        loss_type: ``dice`` (TRELLIS), ``bce`` or ``l1``.
        lambda_kl: KL weight (TRELLIS 1e-3).
        sample_posterior: train on ``mean + std * eps`` (TRELLIS) rather than the mean.
        lr, weight_decay, betas: AdamW (TRELLIS: 1e-4, 0).
        up_axis: the dataset's up axis (``z``: the synthetic set).
        voxel_spacing: surface sampling step of the voxeliser, in voxels.

    Validation: ``validation_mode: loss`` logs the terms; :meth:`reconstruct` encodes the
    ground-truth structure (posterior mean) and decodes it to :class:`SparseVoxels`.
    """

    RECONSTRUCTS_3D = False  # an autoencoder of ground-truth structure, not reconstruction from views

    def __init__(self, encoder: SparseStructureEncoder, decoder: SparseStructureDecoder, resolution: int = 64,
                 loss_type: Literal["dice", "bce", "l1"] = "dice", lambda_kl: float = 1e-3, sample_posterior: bool = True,
                 lr: float = 1e-4, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 up_axis: Literal["z", "y"] = "z", voxel_spacing: float = 0.25,
                 evaluation=None, init_weights: str | None = None, nonfinite: NonFiniteGuard | None = None, vis_views: int = 4,
                 init_weights_ignore: list[str] | None = None, validation_mode: Literal["render", "loss"] = "loss",
                 eval_seed: int = 0):
        super().__init__(evaluation=evaluation, init_weights=init_weights, nonfinite=nonfinite, vis_views=vis_views,
                         init_weights_ignore=init_weights_ignore, validation_mode=validation_mode, eval_seed=eval_seed)
        self.save_hyperparameters()
        self.encoder, self.decoder = own_instance(encoder), own_instance(decoder)
        self._init_common(up_axis, lr, weight_decay, betas, voxel_spacing)
        check_option("model.resolution", resolution, 2, integer=True)
        check_option("model.lambda_kl", lambda_kl, 0.0)
        f = self.encoder.downsample_factor
        if resolution % f:
            raise ConfigError(f"model.resolution: {resolution} is not divisible by the encoder's downsampling {f}")
        if self.decoder.latent_channels != self.encoder.latent_channels:
            raise ConfigError(f"model.decoder: latent_channels {self.decoder.latent_channels} differs from the encoder's {self.encoder.latent_channels}")
        self.resolution, self.loss_type, self.lambda_kl = int(resolution), loss_type, float(lambda_kl)
        self.sample_posterior = bool(sample_posterior)

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        occ = self.surface_occupancy(batch, self.resolution)
        g = self.step_generators(batch)[0]
        mean, logvar = self.encoder.moments(occ)
        if self.sample_posterior:
            eps = torch.randn(mean.shape, generator=g, dtype=mean.dtype).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * eps
        else:
            z = mean
        logits = self.decoder(z)
        out = ss_vae_loss(logits, occ, mean, logvar, self.loss_type, self.lambda_kl)
        with torch.no_grad():
            pred, gt = logits > 0, occ > 0.5
            iou = (pred & gt).sum() / (pred | gt).sum().clamp_min(1)
        return {"loss": out.loss, self.loss_type: out.recon, "kl": out.kl, "iou": iou.float()}

    @torch.no_grad()
    def reconstruct(self, batch: Batch) -> Reconstruction:
        occ = self.surface_occupancy(batch, self.resolution)
        logits = self.decoder(self.encoder(occ))
        vox = trellis_voxels_to_world(occupancy_to_voxels(logits, list(batch.object_ids)), self.up_axis)
        return Reconstruction(list(batch.object_ids), vox, {"logits": logits})


# ---------------------------------------------------------------------------------- SS flow stage
class TrellisSSFlowModule(_TrellisBase):
    """TRELLIS's sparse-structure flow stage on recon3d data (module docstring).

    Args:
        flow: the :class:`SparseStructureFlowModel` trained here.
        ss_encoder: the SS-VAE encoder giving the latents ``x0`` (frozen); its input side is
            ``flow.resolution * encoder.downsample_factor``.
        condition: DINOv2 conditioning (frozen).
        ss_encoder_weights: file to load ``ss_encoder`` from (the SS-VAE stage's ``.ckpt``, keys
            under ``ss_encoder_prefix``; or TRELLIS's ``ss_enc_conv3d_16l8_fp16.safetensors`` with
            prefix ``""``); None keeps its initial weights (tests).
        ss_encoder_prefix: key prefix in that file (``encoder.``: a TrellisSSVAEModule checkpoint).
        sigma_min, t_mean, t_std, p_uncond: TRELLIS's objective (1e-5, logit-normal (1, 1), 0.1).
        lr, weight_decay, betas: AdamW (TRELLIS: 1e-4, 0).
        up_axis, voxel_spacing: as :class:`TrellisSSVAEModule`.

    The condition is the tokens of one input view per object (chosen per step from the object's
    generator among the batch's input views).
    """

    RECONSTRUCTS_3D = False  # a latent generator stage; TrellisModule samples and decodes

    def __init__(self, flow: SparseStructureFlowModel, ss_encoder: SparseStructureEncoder, condition: TrellisImageCondition,
                 ss_encoder_weights: str | None = None, ss_encoder_prefix: str = "encoder.", sigma_min: float = 1e-5,
                 t_mean: float = 1.0, t_std: float = 1.0, p_uncond: float = 0.1,
                 lr: float = 1e-4, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 up_axis: Literal["z", "y"] = "z", voxel_spacing: float = 0.25,
                 evaluation=None, init_weights: str | None = None, nonfinite: NonFiniteGuard | None = None, vis_views: int = 4,
                 init_weights_ignore: list[str] | None = None, validation_mode: Literal["render", "loss"] = "loss",
                 eval_seed: int = 0):
        super().__init__(evaluation=evaluation, init_weights=init_weights, nonfinite=nonfinite, vis_views=vis_views,
                         init_weights_ignore=init_weights_ignore, validation_mode=validation_mode, eval_seed=eval_seed)
        self.save_hyperparameters()
        self.flow, self.ss_encoder, self.condition = own_instance(flow), own_instance(ss_encoder), own_instance(condition)
        self._init_common(up_axis, lr, weight_decay, betas, voxel_spacing)
        _check_flow_parts(self.flow, self.ss_encoder, self.condition)
        _load_frozen_encoder(self.ss_encoder, ss_encoder_weights, ss_encoder_prefix)
        self.objective = RectifiedFlowObjective.trellis(sigma_min=sigma_min, t_mean=t_mean, t_std=t_std, p_uncond=p_uncond)

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        return ss_flow_losses(self, self.flow, self.ss_encoder, self.condition, self.objective, batch)

    def reconstruct(self, batch: Batch) -> Reconstruction:
        raise ConfigError("TrellisSSFlowModule is a training stage: sample and decode with recon3d.methods.trellis.TrellisModule "
                          "(configs/trellis_cpu.yaml), initialised from this stage's checkpoint")


def _check_flow_parts(flow: SparseStructureFlowModel, encoder: SparseStructureEncoder | None, condition: TrellisImageCondition | None) -> None:
    if encoder is not None and encoder.latent_channels != flow.in_channels:
        raise ConfigError(f"model.ss_encoder: latent_channels {encoder.latent_channels} differs from the flow's in_channels {flow.in_channels}")
    if condition is not None and condition.out_dim != flow.cond_channels:
        raise ConfigError(f"model.condition: DINOv2 width {condition.out_dim} differs from the flow's cond_channels {flow.cond_channels}")


def ss_flow_targets(module: _TrellisBase, flow: SparseStructureFlowModel, encoder: SparseStructureEncoder,
                    batch: Batch) -> tuple[torch.Tensor, list[torch.Generator]]:
    """What an SS-flow training step starts from: ``x0 (B, C, r, r, r)``, the (frozen) encoder's
    latents of the ground-truth surface voxels at ``flow.resolution x encoder.downsample_factor``,
    and the step's per-object generators (:meth:`_TrellisBase.step_generators`)."""
    R = flow.resolution * encoder.downsample_factor
    occ = module.surface_occupancy(batch, R)
    with torch.no_grad():
        x0 = encoder(occ)
    return x0, module.step_generators(batch)


def ss_flow_losses(module: _TrellisBase, flow: SparseStructureFlowModel, encoder: SparseStructureEncoder,
                   condition: TrellisImageCondition, objective: RectifiedFlowObjective, batch: Batch) -> dict[str, torch.Tensor]:
    """The SS-flow training terms of one batch: ``x0`` = encoder mean of the ground-truth surface
    voxels, condition = tokens of one input view per object."""
    x0, gens = ss_flow_targets(module, flow, encoder, batch)
    V = batch.inputs.images.shape[1]
    picks = [int(torch.randint(V, (1,), generator=g)) for g in gens]
    images = batch.inputs.images[torch.arange(len(picks)), picks]
    masks = batch.inputs.masks[torch.arange(len(picks)), picks] if batch.inputs.masks is not None else None
    cond = condition(images, masks, _background(batch))
    out = objective.loss(flow, x0, cond, generator=gens)
    return {"loss": out.loss, "ss_flow_mse": out.loss.detach()}


# ---------------------------------------------------------------------------------- image(s)-to-3D
class TrellisModule(_TrellisBase):
    """TRELLIS image(s)-to-3D (module docstring).

    Args:
        condition: DINOv2 conditioning (:class:`TrellisImageCondition`; a local
            ``dinov2_vitl14_reg`` port, or a tiny config for tests).
        ss_flow, ss_decoder, slat_flow: the networks; None takes each from ``pipeline``.
        gaussian_decoder, mesh_decoder: ``decoder(slat) -> Gaussians / Meshes`` in TRELLIS's frame
            (typed parts); None: ``pipeline``'s ``slat_decoder_gs`` / ``slat_decoder_mesh`` when a
            pipeline is given, else the structure fallbacks of the module docstring.
        ss_encoder: SS-VAE encoder, needed only to train (the SS flow's ``x0``); frozen.
        pipeline: a TRELLIS model folder (``pipeline.json`` + ``ckpts/``): the networks not given
            above are loaded from it (strictly, float32) and frozen, and its sampler params and
            SLAT normalisation replace the defaults below.
        ss_sampler, slat_sampler: sampler params (``steps``, ``cfg_strength``, ``cfg_interval``,
            ``rescale_t``, ``sigma_min``, ``guidance_rescale``) over :data:`DEFAULT_SS_SAMPLER` /
            :data:`DEFAULT_SLAT_SAMPLER` (or the pipeline's).
        slat_mean, slat_std: SLAT normalisation (``slat = sample * std + mean``, the per-channel
            statistics the SLAT flow was trained with); None: read from where the SLAT flow's
            weights come from -- the ``part_weights.slat_flow`` file (a
            :class:`~recon3d.methods.trellis_slat.TrellisSLatFlowModule` checkpoint stores them
            beside ``flow.*``), else ``pipeline``'s ``slat_normalization``. A weights file without
            them and no pipeline: one CheckpointError; given values that differ from the file's:
            one ConfigError. A SLAT flow with no weights file at all (untrained): 0 / 1, with a
            warning.
        multi_image_mode: ``stochastic`` (TRELLIS-S) or ``multidiffusion`` (TRELLIS-M).
        max_views: condition on the first this many input views (None: all).
        up_axis: the dataset's up axis.
        ss_encoder_weights, ss_encoder_prefix: as :class:`TrellisSSFlowModule`.
        part_weights: weights of the stages' checkpoints for the parts, ``{part: path}`` or
            ``{part: {path, prefix}}`` with ``part`` one of ``ss_flow``, ``ss_decoder``,
            ``slat_flow``, ``gaussian_decoder``, ``mesh_decoder``, ``condition``; e.g. the SS-flow
            stage's ``last.ckpt`` with prefix ``flow.`` for ``ss_flow``, the SS-VAE stage's with
            ``decoder.`` for ``ss_decoder``, the SLAT stages' (``recon3d.methods.trellis_slat``) for
            ``slat_flow`` / ``gaussian_decoder``. Loaded strictly at construction; every part but
            ``ss_flow`` (the one this module trains) becomes a frozen part (left out of
            checkpoints, re-read from its file).
        sigma_min, t_mean, t_std, p_uncond, lr, weight_decay, betas: SS-flow training (the only
            part this module trains; the SLAT flow has its own stage).
        render_backend: Gaussian rasteriser (``auto | torch | gsplat``).
        export_min_opacity: Gaussians below it are left out of the exported ``.ply``.
    """

    RUNTIME_OPTIONS = ReconModule.RUNTIME_OPTIONS | {"multi_image_mode", "max_views", "ss_sampler", "slat_sampler",
                                                     "render_backend", "export_min_opacity"}
    EXPORT_REPRESENTATION = Gaussians

    def __init__(self, condition: TrellisImageCondition, ss_flow: SparseStructureFlowModel | None = None,
                 ss_decoder: SparseStructureDecoder | None = None, slat_flow: SLatFlowModel | None = None,
                 gaussian_decoder: nn.Module | None = None, mesh_decoder: nn.Module | None = None,
                 ss_encoder: SparseStructureEncoder | None = None, pipeline: str | None = None,
                 ss_sampler: dict | None = None, slat_sampler: dict | None = None,
                 slat_mean: list[float] | None = None, slat_std: list[float] | None = None,
                 multi_image_mode: Literal["stochastic", "multidiffusion"] = "stochastic", max_views: int | None = None,
                 up_axis: Literal["z", "y"] = "z", ss_encoder_weights: str | None = None, ss_encoder_prefix: str = "encoder.",
                 part_weights: dict[str, str | dict[str, str]] | None = None,
                 sigma_min: float = 1e-5, t_mean: float = 1.0, t_std: float = 1.0, p_uncond: float = 0.1,
                 lr: float = 1e-4, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 voxel_spacing: float = 0.25, render_backend: str = "auto", export_min_opacity: float = 0.0,
                 evaluation=None, init_weights: str | None = None, nonfinite: NonFiniteGuard | None = None, vis_views: int = 4,
                 init_weights_ignore: list[str] | None = None, validation_mode: Literal["render", "loss"] = "render",
                 eval_seed: int = 0):
        super().__init__(evaluation=evaluation, init_weights=init_weights, nonfinite=nonfinite, vis_views=vis_views,
                         init_weights_ignore=init_weights_ignore, validation_mode=validation_mode, eval_seed=eval_seed)
        self.save_hyperparameters()
        self._init_common(up_axis, lr, weight_decay, betas, voxel_spacing)
        if multi_image_mode not in ("stochastic", "multidiffusion"):
            raise ConfigError(f"model.multi_image_mode: expected 'stochastic' or 'multidiffusion', got {multi_image_mode!r}")
        if max_views is not None:
            check_option("model.max_views", max_views, 1, integer=True)
        check_option("model.export_min_opacity", export_min_opacity, 0.0)
        self.multi_image_mode, self.max_views = multi_image_mode, max_views
        self.render_backend, self.export_min_opacity = render_backend, float(export_min_opacity)
        self.condition = own_instance(condition)
        parts = {"ss_flow": ss_flow, "ss_decoder": ss_decoder, "slat_flow": slat_flow,
                 "gaussian_decoder": gaussian_decoder, "mesh_decoder": mesh_decoder}
        parts = {k: own_instance(v) for k, v in parts.items()}
        ss_params, slat_params = dict(DEFAULT_SS_SAMPLER), dict(DEFAULT_SLAT_SAMPLER)
        norm = None
        self.pipeline = pipeline
        if pipeline is not None:
            ss_params, slat_params, norm = self._from_pipeline(pipeline, parts)
        missing = [k for k in ("ss_flow", "ss_decoder", "slat_flow") if parts[k] is None]
        if missing:
            raise ConfigError(f"model: TrellisModule needs {missing} (give them as parts, or model.pipeline: a TRELLIS folder)")
        for k, v in parts.items():
            setattr(self, k, v)
        self.ss_encoder = own_instance(ss_encoder)
        _check_flow_parts(self.ss_flow, self.ss_encoder, self.condition)
        if self.slat_flow.cond_channels != self.condition.out_dim:
            raise ConfigError(f"model.condition: DINOv2 width {self.condition.out_dim} differs from slat_flow.cond_channels {self.slat_flow.cond_channels}")
        if self.ss_decoder.latent_channels != self.ss_flow.out_channels:
            raise ConfigError(f"model.ss_decoder: latent_channels {self.ss_decoder.latent_channels} differs from ss_flow.out_channels {self.ss_flow.out_channels}")
        self.ss_resolution = self.ss_flow.resolution * self.ss_decoder.upsample_factor
        if self.slat_flow.resolution != self.ss_resolution:
            raise ConfigError(f"model.slat_flow: resolution {self.slat_flow.resolution} differs from the decoded structure's "
                              f"{self.ss_resolution} (ss_flow.resolution x ss_decoder upsampling)")
        _check_decoder(self.gaussian_decoder, self.slat_flow, "model.gaussian_decoder")
        _check_decoder(self.mesh_decoder, self.slat_flow, "model.mesh_decoder")
        if self.ss_encoder is not None:
            _load_frozen_encoder(self.ss_encoder, ss_encoder_weights, ss_encoder_prefix)
        self._load_part_weights(part_weights)
        self.ss_sampler_params = _sampler_params(ss_params, ss_sampler, "model.ss_sampler")
        self.slat_sampler_params = _sampler_params(slat_params, slat_sampler, "model.slat_sampler")
        # Which sampler values are upstream's defaults rather than read from a pipeline.json or given:
        # said once, when sampling starts (DEFAULT_SS_SAMPLER).
        self._sampler_defaults = {} if pipeline is not None else {
            what: {k: v for k, v in base.items() if k not in (over or {})}
            for what, base, over in (("ss_sampler", DEFAULT_SS_SAMPLER, ss_sampler), ("slat_sampler", DEFAULT_SLAT_SAMPLER, slat_sampler))}
        mean, std = self._slat_normalization(slat_mean, slat_std, norm, part_weights)
        self.register_buffer("slat_mean", torch.tensor([float(x) for x in mean]), persistent=False)
        self.register_buffer("slat_std", torch.tensor([float(x) for x in std]), persistent=False)
        # Only the SS flow trains here (module docstring); everything else is a fixed part.
        for name in ("condition", "ss_decoder", "slat_flow", "gaussian_decoder", "mesh_decoder", "ss_encoder"):
            part = getattr(self, name)
            if part is not None:
                part.requires_grad_(False)
        self.objective = RectifiedFlowObjective.trellis(sigma_min=sigma_min, t_mean=t_mean, t_std=t_std, p_uncond=p_uncond)
        if self.gaussian_decoder is None:
            log.info("TrellisModule: no gaussian_decoder: the Gaussians show the sampled sparse structure (one per voxel)")
        self._rasterizer = None

    PARTS = ("ss_flow", "ss_decoder", "slat_flow", "gaussian_decoder", "mesh_decoder", "condition")

    def _load_part_weights(self, spec: dict | None) -> None:
        from recon3d.utils.checkpoint import load_frozen, load_weights_into

        if not spec:
            return
        if not isinstance(spec, dict):
            raise ConfigError(f"model.part_weights: expected a mapping {{part: path or {{path, prefix}}}}, got {type(spec).__name__}")
        todo = []
        for name, entry in spec.items():  # every entry checked before anything loads
            if name not in self.PARTS:
                raise ConfigError(f"model.part_weights: unknown part {name!r}; expected some of {list(self.PARTS)}")
            path, prefix = _part_entry(name, entry)
            if getattr(self, name) is None:
                raise ConfigError(f"model.part_weights.{name}: the module has no {name} to load into (give the part)")
            todo.append((name, path, prefix))
        for name, path, prefix in todo:
            part = getattr(self, name)
            if name == "condition":
                part = part.backbone
            if name == "ss_flow":
                load_weights_into(part, path, prefix=prefix)
            else:
                load_frozen(part, path, prefix=prefix)

    def _slat_normalization(self, slat_mean, slat_std, pipeline_norm: dict | None, part_weights: dict | None) -> tuple[list[float], list[float]]:
        """``(mean, std)`` (C values each) of the SLAT flow's normalisation (class docstring, ``slat_mean``):
        the given values, checked against the source of the flow's weights, else that source's."""
        C = self.slat_flow.out_channels
        entry = (part_weights or {}).get("slat_flow")
        found = where = None
        if entry is not None:
            path, prefix = _part_entry("slat_flow", entry)
            found, where = checkpoint_slat_normalization(path, prefix), f"{path} (model.part_weights.slat_flow)"
            if found is None and pipeline_norm is not None:
                log.info("TrellisModule: %s holds no SLAT normalisation; using the pipeline's (%s)", path, pipeline_norm["path"])
            elif found is None and slat_mean is None:
                key = _stats_prefix(prefix)
                raise CheckpointError(f"{path}: no SLAT normalisation for model.part_weights.slat_flow (keys '{key}slat_mean' / "
                                      f"'{key}slat_std', which a TrellisSLatFlowModule checkpoint stores); give model.slat_mean / "
                                      "slat_std (the per-channel values that SLAT flow was trained with) or model.pipeline")
        if found is None and pipeline_norm is not None:
            found = (pipeline_norm["mean"], pipeline_norm["std"])
            where = f"{pipeline_norm['path']} (args.slat_normalization)"
        out = resolve_slat_normalization(slat_mean, slat_std, found, where, C)
        if out is None:
            log.warning("TrellisModule: the SLAT flow has no weights file (model.part_weights.slat_flow / model.pipeline) and no "
                        "model.slat_mean / slat_std: its samples are decoded as they are (mean 0, std 1), right only for an "
                        "untrained SLAT flow")
            out = ([0.0] * C, [1.0] * C)
        return out

    # -------------------------------------------------------------- pipeline.json
    def _from_pipeline(self, path: str, parts: dict) -> tuple[dict, dict, dict]:
        from recon3d.models.trellis.pipeline_config import read_pipeline_json
        from recon3d.models.trellis.pretrained import load_trellis_model
        from recon3d.utils.checkpoint import mark_frozen

        cfg = read_pipeline_json(path)
        roles = {"ss_decoder": "sparse_structure_decoder", "ss_flow": "sparse_structure_flow_model", "slat_flow": "slat_flow_model",
                 "gaussian_decoder": "slat_decoder_gs", "mesh_decoder": "slat_decoder_mesh"}
        for part, role in roles.items():
            if parts[part] is None and (role in cfg.models or part in ("ss_decoder", "ss_flow", "slat_flow")):
                js = cfg.model_json(role)
                model = load_trellis_model(js)
                if part != "ss_flow":  # fixed parts: checkpoints leave them out and re-read the file
                    mark_frozen(model, js.with_suffix(".safetensors"))
                parts[part] = model
        ss = {**DEFAULT_SS_SAMPLER, **cfg.sparse_structure_sampler.sampler_kwargs()}
        slat = {**DEFAULT_SLAT_SAMPLER, **cfg.slat_sampler.sampler_kwargs()}
        for d in (ss, slat):
            d.pop("cfg_convention", None)
        return ss, slat, {"mean": cfg.slat_mean, "std": cfg.slat_std, "path": str(cfg.path)}

    # -------------------------------------------------------------- sampling
    def _sampler(self, params: dict, num_views: int, mode: str | None = None) -> FlowEulerSampler:
        self.warn_sampler_defaults()
        multi = None if num_views == 1 else (mode or self.multi_image_mode)
        return FlowEulerSampler(cfg_convention="trellis", multi_condition=multi, **params)

    def warn_sampler_defaults(self) -> str | None:
        """Once per module, when sampling starts without ``pipeline``: one warning line naming the
        sampler values taken from :data:`DEFAULT_SS_SAMPLER` / :data:`DEFAULT_SLAT_SAMPLER`
        (those neither given nor read from a pipeline.json). Returns the line (None: nothing to say)."""
        used = {k: v for k, v in getattr(self, "_sampler_defaults", {}).items() if v}
        if not used or getattr(self, "_sampler_defaults_said", False):
            return None
        self._sampler_defaults_said = True
        parts = "; ".join(f"{what} " + ", ".join(f"{k}={v}" for k, v in vals.items()) for what, vals in used.items())
        line = (f"TrellisModule: no model.pipeline: sampling with TRELLIS-image-large's pipeline.json values as defaults "
                f"(not read from a file): {parts}; give model.pipeline or set them in model.ss_sampler / slat_sampler")
        log.warning(line)
        return line

    def conditions(self, batch: Batch) -> list[torch.Tensor]:
        """Tokens ``(B, L, C)`` of each input view used (the first ``max_views``)."""
        V = batch.inputs.images.shape[1]
        n = V if self.max_views is None else min(V, self.max_views)
        return self.view_conditions(self.condition, batch.inputs, _background(batch), list(range(n)))

    @torch.no_grad()
    def sample_structure(self, conds: list[torch.Tensor], generators: list[torch.Generator], names: list[str],
                         mode: str | None = None) -> tuple[SparseVoxels, torch.Tensor]:
        """SS flow from noise (object ``b``'s from ``generators[b]``) -> decoder logits ``(B, 1, R, R, R)``
        -> occupied voxels on TRELLIS's grid (``feats``: the logits). Empty -> DataError naming the object."""
        sampler = self._sampler(self.ss_sampler_params, len(conds), mode)
        return self.structure_from_noise(sampler, conds if len(conds) > 1 else conds[0], generators, names, conds[0].shape[0])

    def structure_from_noise(self, sampler: FlowEulerSampler, cond, generators: list[torch.Generator], names: list[str],
                             batch_size: int) -> tuple[SparseVoxels, torch.Tensor]:
        """``sampler`` runs the SS flow on ``cond`` from per-object noise ``(B, C, r, r, r)`` (object
        ``b``'s from ``generators[b]``), the SS decoder gives logits ``(B, 1, R, R, R)``, their
        occupied voxels (TRELLIS's grid, ``feats``: the logits) come back with them. Empty -> one
        DataError naming the object."""
        f = self.ss_flow
        template = torch.zeros(batch_size, f.in_channels, f.resolution, f.resolution, f.resolution, device=self.device)
        z = sampler.sample(f, sampler.noise_like(template, generators), cond).samples
        logits = self.ss_decoder(z)
        return occupancy_to_voxels(logits, names), logits

    @torch.no_grad()
    def sample_slat(self, conds: list[torch.Tensor], coords: SparseVoxels, generators: list[torch.Generator],
                    mode: str | None = None) -> SparseVoxels:
        """SLAT flow on the structure's voxels -> de-normalised latents (TRELLIS's grid)."""
        sampler = self._sampler(self.slat_sampler_params, len(conds), mode)
        noise = self.slat_noise(coords, generators)
        x = sampler.sample(self.slat_flow, noise, conds if len(conds) > 1 else conds[0]).samples
        return self.denormalize(x)

    def slat_noise(self, coords: SparseVoxels, generators: list[torch.Generator]) -> SparseVoxels:
        """Standard normal SLAT-flow input ``(N, C_in)`` on the voxels of ``coords`` (object ``b``'s
        rows from ``generators[b]``)."""
        f = self.slat_flow
        template = SparseVoxels(coords.coords, torch.zeros(coords.num_voxels, f.in_channels, device=self.device),
                                coords.resolution, coords.batch_size)
        return FlowEulerSampler().noise_like(template, generators)  # the noise does not depend on the sampler's params

    def denormalize(self, x: SparseVoxels) -> SparseVoxels:
        """Flow samples -> SLAT: ``feats * slat_std + slat_mean`` (:func:`denormalize_slat`)."""
        return denormalize_slat(x, self.slat_mean, self.slat_std)

    def normalize(self, x: SparseVoxels) -> SparseVoxels:
        """SLAT -> the flow's space: ``(feats - slat_mean) / slat_std`` (:func:`normalize_slat`)."""
        return normalize_slat(x, self.slat_mean, self.slat_std)

    def _slat_decoder_output(self, decoder: nn.Module, slat: SparseVoxels, kind: type, what: str):
        """A SLAT decoder's ``kind`` output for ``slat`` in TRELLIS's frame (:func:`_run_decoder`)."""
        return _run_decoder(decoder, slat, kind, what)

    def decode_gaussians(self, slat: SparseVoxels) -> Gaussians:
        """Differentiable: SLAT (de-normalised, TRELLIS's grid) -> the Gaussian decoder's
        :class:`Gaussians` in recon3d's world."""
        return gaussians_to_world(self._slat_decoder_output(self.gaussian_decoder, slat, Gaussians, "model.gaussian_decoder"), self.up_axis)

    @torch.no_grad()
    def decode(self, slat: SparseVoxels, structure: SparseVoxels, logits: torch.Tensor) -> tuple[Gaussians, Meshes]:
        """Gaussians and meshes in recon3d's frame (decoders, or the fallbacks of the module docstring)."""
        if self.gaussian_decoder is not None:
            gaussians = self.decode_gaussians(slat)
        else:
            gaussians = structure_gaussians(trellis_voxels_to_world(structure, self.up_axis))
        if self.mesh_decoder is not None:
            meshes = meshes_to_world(self._slat_decoder_output(self.mesh_decoder, slat, Meshes, "model.mesh_decoder"), self.up_axis)
        else:
            meshes = self.logits_meshes(logits)
        return gaussians, meshes

    def logits_meshes(self, logits: torch.Tensor) -> Meshes:
        """Marching cubes of the SS decoder's logits at 0 (values at voxel centres, padded by one
        outside voxel so the surface closes), in recon3d's frame."""
        from recon3d.geometry import marching_cubes_fast

        R = logits.shape[-1]
        h = 1.0 / R  # TRELLIS voxel edge
        pad = F.pad(logits[:, 0].float(), (1, 1, 1, 1, 1, 1), value=-1.0)
        box = (-0.5 - 0.5 * h, 0.5 + 0.5 * h)
        verts, faces = [], []
        for b in range(pad.shape[0]):
            v, f = marching_cubes_fast(-pad[b], box, 0.0)
            verts.append(trellis_to_world_points(v, self.up_axis))
            faces.append(f)
        return Meshes(verts, faces)

    @torch.no_grad()
    def reconstruct(self, batch: Batch, mode: str | None = None) -> Reconstruction:
        """Gaussians (primary), mesh, voxels and SLAT of every object; sampled from per-object seeds."""
        ids = list(batch.object_ids)
        seeds = self.object_seeds(batch)
        conds = self.conditions(batch)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        structure, logits = self.sample_structure(conds, gens, ids, mode)
        slat = self.sample_slat(conds, structure.replace(feats=structure.feats[:, :0]), gens, mode)
        gaussians, meshes = self.decode(slat, structure, logits)
        voxels = trellis_voxels_to_world(structure, self.up_axis)
        return Reconstruction(ids, gaussians, {"mesh": meshes, "voxels": voxels, "slat": slat}, seeds=seeds)

    # -------------------------------------------------------------- training (the SS flow)
    def on_fit_start(self) -> None:
        if self.ss_encoder is not None and self.hparams.get("ss_encoder_weights") is None:
            log.warning("TrellisModule: model.ss_encoder_weights is not set: the SS flow trains on latents of an SS-VAE encoder "
                        "with its initial weights (give the SS-VAE stage's checkpoint or ckpts/ss_enc_conv3d_16l8_fp16.safetensors "
                        "with ss_encoder_prefix '')")

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.ss_encoder is None:
            raise ConfigError("model.ss_encoder: TrellisModule trains its SS flow on SS-VAE latents of the ground-truth "
                              "structure; give the encoder (and ss_encoder_weights)")
        return ss_flow_losses(self, self.ss_flow, self.ss_encoder, self.condition, self.objective, batch)

    # -------------------------------------------------------------- render / export
    def render_reconstruction(self, rec: Reconstruction, cameras):
        from recon3d.render import render

        renderer = self.rasterizer(cameras.c2w.device)
        return render(rec.representation.to(torch.float32), cameras.to(torch.float32), "white", renderer=renderer)

    def export_reconstruction(self, rec: Reconstruction, out_dir: Path, suffix: str = "", views: Views | None = None) -> dict[str, str]:
        """``gaussians<suffix>.ply`` (3DGS layout) and ``mesh<suffix>.glb`` of the one object of ``rec``
        (an object whose mesh has no face gets no ``.glb``). With :attr:`export_formats` set
        (``recon3d export --format``): the Gaussians in those formats only."""
        from recon3d.render.export import export_representation

        g = rec.representation[0].packed()
        if self.export_min_opacity > 0:
            keep = g.opacities >= self.export_min_opacity
            g = Gaussians(g.means[keep], g.quats[keep], g.scales[keep], g.opacities[keep], g.colors[keep], g.sh_degree,
                          counts=[int(keep.sum())])
        files = dict(export_representation(g, Path(out_dir), self.export_formats or ("ply",), suffix=suffix))
        if self.export_formats:
            return files
        mesh = rec.find(Meshes)
        if mesh is not None and mesh.num_faces[0] > 0:
            files.update(export_representation(mesh, Path(out_dir), ("glb",), suffix=suffix))
        return files


def denormalize_slat(x: SparseVoxels, mean: torch.Tensor, std: torch.Tensor) -> SparseVoxels:
    """``x`` with ``feats (N, C) * std + mean`` (``(C,)`` each): the SLAT flow's samples -> SLAT."""
    return x.replace(feats=x.feats * std.to(x.feats) + mean.to(x.feats))


def normalize_slat(x: SparseVoxels, mean: torch.Tensor, std: torch.Tensor) -> SparseVoxels:
    """``x`` with ``(feats (N, C) - mean) / std``: SLAT -> the SLAT flow's space (inverse of :func:`denormalize_slat`)."""
    return x.replace(feats=(x.feats - mean.to(x.feats)) / std.to(x.feats))


def _run_decoder(decoder: nn.Module, slat: SparseVoxels, kind: type, what: str, native: type | None = None,
                 note: str = " (TRELLIS's frame)"):
    """``decoder``'s output for ``slat`` in TRELLIS's frame: recon3d's SLAT decoders
    (:class:`~recon3d.models.trellis.SLatGaussianDecoder`, :class:`~recon3d.models.trellis.SLatMeshDecoder`)
    through ``decode(slat, scale=1)`` (scale 1: their ``[-0.5, 0.5]^3``, before this module's
    frame map); any other part is called and must return ``kind``. ``native``: the class whose
    ``decode`` is used (None: any part with a ``decode`` method); ``note`` ends the error's
    "expected" clause."""
    uses_decode = hasattr(decoder, "decode") if native is None else isinstance(decoder, native)
    out = decoder.decode(slat, scale=1.0) if uses_decode else decoder(slat)
    if not isinstance(out, kind):
        raise ShapeError(f"{what}: expected it to return {kind.__name__}{note}, got {type(out).__name__}")
    return out


def _check_decoder(decoder: nn.Module | None, slat_flow: SLatFlowModel, what: str) -> None:
    if decoder is None:
        return
    lat, res = getattr(decoder, "latent_channels", None), getattr(decoder, "resolution", None)
    if lat is not None and lat != slat_flow.out_channels:
        raise ConfigError(f"{what}: latent_channels {lat} differs from slat_flow.out_channels {slat_flow.out_channels}")
    if res is not None and res != slat_flow.resolution:
        raise ConfigError(f"{what}: resolution {res} differs from slat_flow.resolution {slat_flow.resolution}")


def _sampler_params(base: dict, override: dict | None, what: str, keys: tuple[str, ...] = _SAMPLER_KEYS) -> dict:
    """``base`` updated by ``override`` (only ``keys`` allowed), validated by building the sampler."""
    params = dict(base)
    if override:
        if not isinstance(override, dict):
            raise ConfigError(f"{what}: expected a mapping of sampler params, got {type(override).__name__}")
        unknown = sorted(set(override) - set(keys))
        if unknown:
            raise ConfigError(f"{what}: unknown sampler params {unknown}; expected some of {list(keys)}")
        params.update(override)
    if "cfg_interval" in params:
        params["cfg_interval"] = tuple(float(x) for x in params["cfg_interval"])
    FlowEulerSampler(**params)  # validates every value (one ConfigError line)
    return params


def _part_entry(name: str, entry) -> tuple[str, str]:
    """``(path, prefix)`` of one ``model.part_weights`` entry (a path, or ``{path, prefix}``)."""
    if isinstance(entry, str):
        return entry, ""
    if isinstance(entry, dict) and isinstance(entry.get("path"), str) and set(entry) <= {"path", "prefix"}:
        return entry["path"], str(entry.get("prefix", ""))
    raise ConfigError(f"model.part_weights.{name}: expected a path or {{path, prefix}}, got {entry!r}")


def _stats_prefix(prefix: str) -> str:
    # A SLAT-flow stage keeps its network under "flow." and its normalisation buffers beside it.
    return prefix[: -len("flow.")] if prefix.endswith("flow.") else prefix


def checkpoint_slat_normalization(path: str, prefix: str = "") -> tuple[list[float], list[float]] | None:
    """The SLAT normalisation stored with a SLAT flow's weights, ``(mean, std)`` (C floats each),
    or None when the file has none.

    A SLAT-flow stage checkpoint (:class:`~recon3d.methods.trellis_slat.TrellisSLatFlowModule`,
    ReconViaGen's SLAT stage; ``.ckpt`` or ``.safetensors``) keeps its network under ``flow.`` and
    the persistent buffers ``slat_mean``, ``slat_std`` ``(C,)`` and ``normalization_ready`` beside
    it: they are looked up at the level of ``prefix`` without its trailing ``flow.``. A stage that
    never computed them (``normalization_ready`` false: 0 / 1 placeholders) counts as none.
    TRELLIS's own ``slat_flow_*.safetensors`` holds none (upstream keeps them in pipeline.json)."""
    base = _stats_prefix(prefix)
    keys = [f"{base}slat_mean", f"{base}slat_std", f"{base}normalization_ready"]
    p = Path(path)
    if p.suffix == ".safetensors":  # only the three tensors are read
        from safetensors import safe_open

        with safe_open(str(p), "pt", device="cpu") as f:
            names = set(f.keys())
            got = {k: f.get_tensor(k) for k in keys if k in names}
    else:
        from recon3d.utils.checkpoint import load_state_dict_file

        obj = load_state_dict_file(p)
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
        got = {k: sd[k] for k in keys if isinstance(sd.get(k), torch.Tensor)}
    if keys[0] not in got or keys[1] not in got:
        return None
    if keys[2] in got and not bool(got[keys[2]]):
        return None
    return got[keys[0]].double().flatten().tolist(), got[keys[1]].double().flatten().tolist()


def resolve_slat_normalization(mean, std, found: tuple[list[float], list[float]] | None, where: str | None,
                               channels: int) -> tuple[list[float], list[float]] | None:
    """The SLAT normalisation to de-normalise with: the given ``mean`` / ``std`` (both or neither;
    ``channels`` values each, std > 0) when given -- a ConfigError when they differ from ``found``
    (the values stored with the flow's weights, in ``where``) by more than 1e-4 relative and
    absolute (a 4-decimal copy of the logged values passes) -- else ``found``, else None."""
    if (mean is None) != (std is None):
        raise ConfigError("model.slat_mean / slat_std: give both (or neither: read from the SLAT flow's checkpoint or pipeline)")
    if mean is None:
        if found is not None and (len(found[0]) != channels or len(found[1]) != channels):
            raise CheckpointError(f"{where}: SLAT normalisation of {len(found[0])} / {len(found[1])} channels; the SLAT flow has {channels}")
        return found
    mean, std = [float(x) for x in mean], [float(x) for x in std]
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(f"model.slat_mean / slat_std: expected {channels} values each (the SLAT flow's channels), got {len(mean)} and {len(std)}")
    if any(x <= 0 for x in std):
        raise ConfigError(f"model.slat_std: expected values > 0, got {std}")
    if found is not None:
        a, b = torch.tensor(mean + std, dtype=torch.float64), torch.tensor([*found[0], *found[1]], dtype=torch.float64)
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
            raise ConfigError(f"model.slat_mean / slat_std: differ from the SLAT normalisation stored in {where} "
                              f"(mean {[round(x, 4) for x in found[0]]}, std {[round(x, 4) for x in found[1]]}); the flow was trained "
                              "with those: drop model.slat_mean / slat_std to use them")
    return mean, std
