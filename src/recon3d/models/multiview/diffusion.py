"""recon3d's own small multi-view diffusion model (a :class:`MultiViewGenerator`).

So that MVBoost's pipeline (generate -> reconstruct -> render -> refine -> boost) runs, and is
tested, with real diffusion on a machine without Era3D's weights. Pixel space (no VAE: at the
CPU sizes of the tests, 32² RGB is already smaller than a 64² x 4 latent, and the SDEdit ends are
then exact), ε-prediction, one shared timestep per object (all ``V`` views are noised and
denoised jointly, as in MVDream/Era3D).

Denoiser: a diffusers ``UNet2DConditionModel`` over the ``B * V`` views stacked object-major,
with

- **cross-view attention**: every ``attn1`` gets :class:`~.attention.MultiViewAttnProcessor`
  (tokens of all views of an object attend jointly);
- **view identity**: ``class_labels`` = the view's index in the layout (the UNet's
  ``num_class_embeds`` embedding, added to the time embedding), so each view knows which camera
  it is generated for;
- **image condition**, twice (Era3D/Zero123++ style): the input view in ``[-1, 1]`` concatenated
  to every noisy view as 3 extra input channels (pixel-aligned, strongest for view 0 which is the
  input's own camera), and its patch tokens (:class:`ImageTokens`) as ``encoder_hidden_states``
  for cross-attention (global, for the other views).

Classifier-free guidance: the unconditional branch gets a **zero** condition — zero concatenated
channels and zero tokens (not the tokens of a black image) — like Era3D's zero CLIP embedding and
zero VAE latent; training drops the condition of an object with probability
``condition_dropout`` the same way. ``eps = uncond + w (cond - uncond)``: ``w = 1`` is the
conditional model, ``w = 0`` the unconditional one.

Schedulers: DDPM noise for training (``add_noise`` at uniform integer ``t``), DDIM for sampling
(``num_inference_steps``, ``eta``), both built from one scheduler config so their ``alpha_bar``
agree; a fresh scheduler per call, so sampling is stateless and thread-safe.

Cameras: ``V`` perspective orbit cameras (:func:`recon3d.data.cameras.orbit_cameras`) at
``azimuths`` / ``elevations`` / ``radius`` / ``fov_deg`` about the origin, the input view being
azimuth 0, elevation 0. The defaults are LGM's input layout (0/90/180/270 at elevation 0, fovy
49.1°, radius 2.9 = the synthetic set's default orbit), so generated views feed LGM directly; the
synthetic set with ``camera_layout: fixed`` and the same numbers renders exactly these cameras
(what :class:`~recon3d.methods.mv_diffusion.MultiViewDiffusionModule` trains on).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from recon3d.data.batch import Views
from recon3d.data.cameras import Cameras, orbit_cameras
from recon3d.errors import ConfigError, ShapeError
from recon3d.models.multiview.attention import set_multiview_attention
from recon3d.models.multiview.generator import (
    Generators,
    MultiViewGenerator,
    check_condition_image,
    check_views_for,
    randn_per_object,
)
from recon3d.models.multiview.sdedit import check_strength, sdedit_start, sdedit_timesteps

__all__ = ["MultiViewDiffusion", "ImageTokens"]


class ImageTokens(nn.Module):
    """Patch tokens of the condition image for cross-attention.

    Args:
        resolution: input size ``R`` (square).
        patch: patch size (divides ``R``).
        dim: token width (the UNet's ``cross_attention_dim``).
    """

    def __init__(self, resolution: int, patch: int, dim: int):
        super().__init__()
        if resolution % patch:
            raise ConfigError(f"token_patch: expected a divisor of resolution {resolution}, got {patch}")
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (resolution // patch) ** 2, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image (B, 3, R, R)`` in ``[-1, 1]`` -> tokens ``(B, (R / patch)², dim)``."""
        return self.norm(self.proj(image).flatten(2).transpose(1, 2) + self.pos)


class MultiViewDiffusion(nn.Module, MultiViewGenerator):
    """Image-conditioned multi-view pixel diffusion (module docstring).

    Args:
        num_views: ``V`` views per object.
        resolution: square image size ``R`` (inputs are resized to it).
        azimuths: ``V`` azimuths in degrees, relative to the input view (default ``i * 360 / V``).
        elevations: ``V`` elevations in degrees (default all 0), or one for all.
        radius: camera distance to the origin.
        fov_deg: vertical field of view of every camera.
        up_axis: world up axis of the orbit (``"z"``, as the synthetic set).
        block_out_channels: UNet channels per resolution level.
        layers_per_block: ResNet layers per UNet block.
        down_block_types / up_block_types: diffusers block names; at least one ``CrossAttn`` block.
        attention_heads: heads of every attention layer.
        cross_attention_dim: width of the condition tokens.
        norm_num_groups: GroupNorm groups of the UNet.
        token_patch: patch size of the condition tokens.
        num_train_timesteps / beta_schedule / beta_start / beta_end: the diffusion schedule.
        num_inference_steps: DDIM steps of :meth:`generate` / :meth:`refine` (``N``).
        eta: DDIM eta (0 deterministic given the start; Era3D samples with 1).
        guidance_scale: CFG ``w`` at sampling.
    """

    def __init__(
        self,
        num_views: int = 4,
        resolution: int = 32,
        azimuths: list[float] | None = None,
        elevations: list[float] | float = 0.0,
        radius: float = 2.9,
        fov_deg: float = 49.1,
        up_axis: str = "z",
        block_out_channels: tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_heads: int = 4,
        cross_attention_dim: int = 64,
        norm_num_groups: int = 8,
        token_patch: int = 4,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        num_inference_steps: int = 20,
        eta: float = 0.0,
        guidance_scale: float = 2.0,
    ):
        super().__init__()
        from diffusers import UNet2DConditionModel

        if num_views < 1 or resolution < 8:
            raise ConfigError(f"MultiViewDiffusion: expected num_views >= 1 and resolution >= 8, got {num_views}, {resolution}")
        if resolution % (2 ** (len(block_out_channels) - 1)):
            raise ConfigError(f"resolution: expected a multiple of {2 ** (len(block_out_channels) - 1)} "
                              f"({len(block_out_channels)} UNet levels), got {resolution}")
        if num_inference_steps < 1 or guidance_scale < 0 or not 0 <= eta <= 1:
            raise ConfigError(f"MultiViewDiffusion: expected num_inference_steps >= 1, guidance_scale >= 0, eta in [0, 1]; "
                              f"got {num_inference_steps}, {guidance_scale}, {eta}")
        self.num_views, self.resolution = int(num_views), int(resolution)
        az = [i * 360.0 / num_views for i in range(num_views)] if azimuths is None else [float(a) for a in azimuths]
        el = [float(elevations)] * num_views if isinstance(elevations, (int, float)) else [float(e) for e in elevations]
        if len(az) != num_views or len(el) != num_views:
            raise ConfigError(f"azimuths/elevations: expected {num_views} values each (num_views), got {len(az)} and {len(el)}")
        if radius <= 0 or not 0 < fov_deg < 180:
            raise ConfigError(f"radius/fov_deg: expected radius > 0 and 0 < fov_deg < 180, got {radius}, {fov_deg}")
        self.azimuths, self.elevations, self.radius, self.fov_deg, self.up_axis = az, el, float(radius), float(fov_deg), up_axis
        self._layout = orbit_cameras(torch.tensor(az), torch.tensor(el), self.radius, self.fov_deg, resolution, resolution, up_axis)
        self.unet = UNet2DConditionModel(
            sample_size=resolution,
            in_channels=6,  # noisy view (3) || input view (3)
            out_channels=3,
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_heads,  # diffusers' legacy name: the number of heads
            norm_num_groups=norm_num_groups,
            num_class_embeds=num_views,  # view identity
        )
        self.num_cross_view_layers = set_multiview_attention(self.unet, num_views)
        self.tokens = ImageTokens(resolution, token_patch, cross_attention_dim)
        self.scheduler_config = dict(num_train_timesteps=int(num_train_timesteps), beta_schedule=beta_schedule,
                                     beta_start=float(beta_start), beta_end=float(beta_end), prediction_type="epsilon",
                                     clip_sample=True, clip_sample_range=1.0)
        self.num_inference_steps, self.eta, self.guidance_scale = int(num_inference_steps), float(eta), float(guidance_scale)

    # ------------------------------------------------------------------ schedulers
    def train_scheduler(self):
        """A DDPM scheduler (training noise, ``add_noise``)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self.scheduler_config)

    def sample_scheduler(self):
        """A fresh DDIM scheduler (sampling); same ``alpha_bar`` as :meth:`train_scheduler`."""
        from diffusers import DDIMScheduler

        return DDIMScheduler(**self.scheduler_config, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")

    # ------------------------------------------------------------------ layout
    def cameras(self, batch_size: int = 1) -> Cameras:
        """The ``(batch_size, V)`` fixed cameras (module docstring)."""
        c = self._layout
        return Cameras(c.c2w.expand(batch_size, -1, 4, 4).clone(), c.K.expand(batch_size, -1, 3, 3).clone(), c.width, c.height)

    def prepare_condition(self, image: torch.Tensor) -> torch.Tensor:
        """``image (B, 3, H, W)`` in ``[0, 1]`` -> ``(B, 3, R, R)`` in ``[-1, 1]`` (bilinear resize to ``R``)."""
        image = check_condition_image(image)
        if image.shape[-2:] != (self.resolution, self.resolution):
            if image.shape[-1] != image.shape[-2]:
                raise ShapeError(f"image: expected a square input view, got {image.shape[-1]}x{image.shape[-2]}")
            image = torch.nn.functional.interpolate(image, size=(self.resolution,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return image * 2 - 1

    # ------------------------------------------------------------------ denoiser
    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, condition: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """ε-prediction of the UNet.

        Args:
            noisy: ``(B, V, 3, R, R)`` noisy views.
            t: ``(B,)`` or scalar integer timestep(s), one per object.
            condition: ``(B, 3, R, R)`` the input view in ``[-1, 1]`` (:meth:`prepare_condition`).
            keep: ``(B,)`` bool, False = this object's condition is zeroed (unconditional); default all True.

        Returns:
            ``(B, V, 3, R, R)`` predicted noise.
        """
        B, V = noisy.shape[:2]
        if V != self.num_views or noisy.shape[2:] != (3, self.resolution, self.resolution):
            raise ShapeError(f"noisy: expected (B, {self.num_views}, 3, {self.resolution}, {self.resolution}), got {list(noisy.shape)}")
        if condition.shape != (B, 3, self.resolution, self.resolution):
            raise ShapeError(f"condition: expected {[B, 3, self.resolution, self.resolution]}, got {list(condition.shape)}")
        tokens = self.tokens(condition)
        if keep is not None:
            # The unconditional branch sees an exact zero condition: zero channels and zero tokens.
            k = keep.to(device=noisy.device, dtype=noisy.dtype)
            condition = condition * k.view(B, 1, 1, 1)
            tokens = tokens * k.view(B, 1, 1)
        t = torch.as_tensor(t, device=noisy.device).reshape(-1).expand(B)
        sample = torch.cat([noisy, condition[:, None].expand(B, V, 3, *condition.shape[-2:])], dim=2).flatten(0, 1)
        views = torch.arange(V, device=noisy.device).repeat(B)
        out = self.unet(sample, t.repeat_interleave(V), encoder_hidden_states=tokens.repeat_interleave(V, dim=0),
                        class_labels=views, return_dict=False)[0]
        return out.reshape(B, V, 3, *out.shape[-2:])

    def guided_noise(self, noisy: torch.Tensor, t: torch.Tensor, condition: torch.Tensor, guidance_scale: float | None = None) -> torch.Tensor:
        """Classifier-free guided ε: ``uncond + w (cond - uncond)``, both branches in one UNet call
        (batch ``[uncond; cond]``; objects are independent, so this equals two calls)."""
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        B = noisy.shape[0]
        keep = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)])
        t = torch.as_tensor(t, device=noisy.device).reshape(-1).expand(B)
        eps = self.predict_noise(noisy.repeat(2, 1, 1, 1, 1), t.repeat(2), condition.repeat(2, 1, 1, 1), keep)
        uncond, cond = eps.chunk(2)
        return uncond + w * (cond - uncond)

    # ------------------------------------------------------------------ sampling
    def _sample(self, start: torch.Tensor, timesteps: torch.Tensor, scheduler, condition: torch.Tensor, generator: Generators) -> torch.Tensor:
        """DDIM from ``start`` over ``timesteps``; returns views in ``[0, 1]``."""
        x = start
        for t in timesteps:
            eps = self.guided_noise(x, t, condition)
            # eta > 0 adds fresh noise each step: drawn here per object (randn_per_object), so a list
            # of generators keeps every object's sample independent of its batch.
            extra = randn_per_object(tuple(x.shape), generator, x.device, x.dtype) if self.eta > 0 else None
            x = scheduler.step(eps, t, x, eta=self.eta, variance_noise=extra).prev_sample
        return ((x.clamp(-1, 1) + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def generate(self, image: torch.Tensor, generator: Generators = None) -> Views:
        """Sample the ``V`` views of every object from pure noise (:class:`MultiViewGenerator`)."""
        cond = self.prepare_condition(image)
        B, R = cond.shape[0], self.resolution
        scheduler = self.sample_scheduler()
        scheduler.set_timesteps(self.num_inference_steps)
        noise = randn_per_object((B, self.num_views, 3, R, R), generator, device=cond.device, dtype=cond.dtype)
        images = self._sample(noise * scheduler.init_noise_sigma, scheduler.timesteps, scheduler, cond, generator)
        return Views(images=images, cameras=self.cameras(B).to(cond.device))

    @torch.no_grad()
    def refine(self, views: Views, image: torch.Tensor, strength: float, generator: Generators = None) -> Views:
        """SDEdit ``views`` at ``strength`` (:class:`MultiViewGenerator`, :mod:`.sdedit`); pixel
        space, so ``s = 0`` returns the given images exactly."""
        s = check_strength(strength)
        cond = self.prepare_condition(image)
        B = cond.shape[0]
        x = check_views_for(self, views, B)
        cams = self.cameras(B).to(cond.device)
        scheduler = self.sample_scheduler()
        timesteps = sdedit_timesteps(scheduler, self.num_inference_steps, s)
        if len(timesteps) == 0:
            return Views(images=x.clone(), cameras=cams)
        clean = x.to(cond) * 2 - 1
        noise = randn_per_object(tuple(clean.shape), generator, device=cond.device, dtype=cond.dtype)
        start = sdedit_start(scheduler, clean, noise, timesteps, s)
        return Views(images=self._sample(start, timesteps, scheduler, cond, generator), cameras=cams)
