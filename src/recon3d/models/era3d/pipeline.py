"""Era3D as a :class:`~recon3d.models.multiview.generator.MultiViewGenerator`: sampling exactly as
upstream's ``StableUnCLIPImg2ImgPipeline`` (``mvdiffusion/pipelines/pipeline_mvdiffusion_unclip.py``,
``test_mvdiffusion_unclip.py``, ``configs/test_unclip-512-6view.yaml``), plus MVBoost's SDEdit refinement.

Components (diffusers / transformers classes, loaded from a local folder only,
:meth:`Era3DGenerator.from_pretrained`): :class:`~recon3d.models.era3d.unet.Era3DUNet`, VAE
``AutoencoderKL``, CLIP image encoder ``CLIPVisionModelWithProjection`` with its
``CLIPImageProcessor``, the unCLIP noise augmentor (``StableUnCLIPImageNormalizer`` +
``image_noising_scheduler``), the sampler ``DDIMScheduler``, and the fixed per-view prompt
embeddings (``normal_embeds.pt``, ``clr_embeds.pt``: ``(6, 77, 1024)`` each, from the Era3D Git
repo's ``mvdiffusion/data/fixed_prompt_embeds_6view``).

Sampling, for ``B`` objects of ``V = 6`` views:

- **Input**: RGBA → tight crop of the alpha, longest side resized to 420, centred in 512² and
  composited on white (:func:`prepare_era3d_input`, upstream ``SingleImageDataset.load_image``).
- **Joint batch** of ``2 B V`` rows: ``[normals (b v), colours (b v)]``; the row-wise and
  cross-domain attentions rely on that order (:mod:`.unet`).
- **Conditioning**: CLIP image embedding (``image_embeds``), noise-augmented at ``noise_level``
  (0: normalise, ``add_noise`` at t = 0, un-normalise; per-row noise as upstream) and followed by the
  sinusoidal noise-level embedding → ``class_labels``; VAE latent of the input, ``.mode() ×
  scaling_factor`` → concatenated to the noisy latent (8 channels); prompt embedding per view and
  domain → ``encoder_hidden_states``.
- **CFG** (``guidance_scale != 1``): UNet batch ``[uncond normals, normals, uncond colours,
  colours]``; the unconditional rows get a **zero** ``class_labels`` vector (CLIP embedding and
  noise-level embedding both zero) and a **zero** VAE latent, but the same prompt embedding;
  ``eps = uncond + w (cond - uncond)``, ``w = 3.0``.
- **Sampler**: DDIM, 40 steps, ``eta = 1.0``, ε-prediction (Era3D's training schedule: linear β
  0.00085–0.012, 1000 steps, ``leading`` spacing, ``steps_offset 1``, :func:`era3d_ddim_scheduler`).
- **Output**: decode ``latents / scaling_factor``, ``(x / 2 + 0.5).clamp(0, 1)``; colours become
  ``Views.images``, normals ``Views.normals`` (module section *Normals*).

Cameras (:func:`era3d_cameras`; Era3D's Blender script ``blender/blender_render_script.py``): six
**orthographic** views at elevation 0 and azimuths 0/45/90/180/270/315 degrees relative to the
input (views ``front, front_right, right, back, left, front_left``), Blender ``ortho_scale 1.0``
(the image spans 1 world unit), camera distance 3, looking at the origin, world +Z up; the input
view is azimuth 0 (camera on +X). Objects are normalised so their bounding-box diagonal is 1 and
centred (``normalize_scene``; the script's ``--scale 0.8`` flag is declared but unused by it), so
they fit the 1-unit frame in every view. A different world scale is one factor: ``ortho_scale``
and ``distance`` scale together.

Which views feed what (MVBoost supplementary §6): **all six views supervise** the boosted model;
LGM takes **four** input views, front/right/back/left = views ``0, 2, 3, 4`` (azimuths 0, 90,
180, 270; :data:`ERA3D_LGM_VIEWS`). LGM's 9-channel input is ``RGB ‖ Plücker(o × d, d)``; for these
views recon3d builds it from the orthographic cameras (:func:`recon3d.data.rays.plucker_embedding`):
every ray of a view has the same direction (the camera's +z) and its own origin on the camera plane
``c2w · ((u − cx)/fx, (v − cy)/fy, 0)``, so ``d`` is constant per view and the moment ``o × d``
varies linearly across the image. A released LGM was trained on perspective rays (fovy 49.1°,
radius 1.5); feeding it orthographic rays is a distribution shift the boost has to absorb, and
the alternative (LGM's perspective rays at the same azimuths) mislabels the geometry of the images.

Normals: Era3D's normal maps are in the **input camera's** frame with OpenGL axes (x right, y up,
z towards the viewer), encoded ``n / 2 + 1/2`` on white (upstream ``dreamdata.load_normal``).
recon3d's ``Views.normals`` are world-space unit normals, 0 where empty: the decoded map is turned
into ``n = 2 c − 1``, flipped to OpenCV axes, rotated by the input camera's c2w and normalised;
pixels whose decoded vector is far from unit length (``|2c − 1| > 1.5``: the white background
decodes to length √3) are empty.

SDEdit (:meth:`Era3DGenerator.refine`, MVBoost eq. 4-5): colour renders are VAE-encoded
(``.mode() × scaling_factor``), noised at the first of the last ``int(N s)`` DDIM steps
(:func:`~recon3d.models.multiview.sdedit.sdedit_timesteps` / ``sdedit_start``) and denoised with the
same conditioning and guidance. **The normal half of the batch is fed pure noise at the same
timesteps** (``noise × init_noise_sigma``, denoised over the same kept steps): a Gaussian
reconstruction renders no normals, and a normal map derived from its depth would inject the
reconstruction's geometry errors into exactly the branch the colours attend to. The price: at
small ``s`` the normal branch has few steps to form, so its output (``Views.normals`` of
``refine``) is only meaningful near ``s = 1``, and the colour↔normal attention sees a weak normal
signal early on. ``s = 0`` returns the colour renders through the VAE round trip (``normals``
None); ``s = 1`` starts both halves from pure noise and draws its noise in :meth:`generate`'s order,
so with the same generator it returns exactly :meth:`generate`'s sample, whatever the renders.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recon3d.data.batch import Views
from recon3d.data.cameras import Cameras, look_at, orthographic_intrinsics
from recon3d.errors import CheckpointError, ConfigError, ShapeError
from recon3d.models.era3d.pretrained import WEIGHT_NAMES, load_era3d_unet
from recon3d.models.era3d.unet import Era3DUNet
from recon3d.models.multiview.generator import (
    Generators,
    MultiViewGenerator,
    check_condition_image,
    check_views_for,
    randn_per_object,
)
from recon3d.models.multiview.sdedit import check_strength, sdedit_start, sdedit_timesteps

__all__ = ["ERA3D_AZIMUTHS", "ERA3D_VIEW_NAMES", "ERA3D_LGM_VIEWS", "ERA3D_ORTHO_SCALE", "ERA3D_CAMERA_DISTANCE", "era3d_cameras",
           "era3d_ddim_scheduler", "prepare_era3d_input", "load_prompt_embeds", "Era3DGenerator"]

#: Azimuths (degrees, relative to the input view) and names of Era3D's six views.
ERA3D_AZIMUTHS = (0.0, 45.0, 90.0, 180.0, 270.0, 315.0)
ERA3D_VIEW_NAMES = ("front", "front_right", "right", "back", "left", "front_left")
#: The four views LGM takes as input (front, right, back, left); all six supervise.
ERA3D_LGM_VIEWS = (0, 2, 3, 4)
#: Blender ``ortho_scale`` (world units across the image) and camera distance of Era3D's renders.
ERA3D_ORTHO_SCALE = 1.0
ERA3D_CAMERA_DISTANCE = 3.0
ERA3D_CROP_SIZE = 420
ERA3D_RESOLUTION = 512


def era3d_cameras(batch_size: int = 1, resolution: int = ERA3D_RESOLUTION, ortho_scale: float = ERA3D_ORTHO_SCALE,
                  distance: float = ERA3D_CAMERA_DISTANCE, azimuths=ERA3D_AZIMUTHS) -> Cameras:
    """Era3D's orthographic output cameras, batch shape ``(batch_size, V)`` (module docstring).

    Camera ``i`` sits at ``distance · (cos a_i, sin a_i, 0)`` (Blender's ``set_camera_mvdream`` at
    elevation 0), looks at the origin with world +Z up, and its ``resolution``² image spans
    ``ortho_scale`` world units (``fx = fy = resolution / ortho_scale``).
    """
    az = torch.deg2rad(torch.as_tensor(azimuths, dtype=torch.float32))
    eye = torch.stack([distance * torch.cos(az), distance * torch.sin(az), torch.zeros_like(az)], -1)
    c2w = look_at(eye, None, torch.tensor([0.0, 0.0, 1.0]))
    K = orthographic_intrinsics(ortho_scale, resolution, resolution).expand(len(az), 3, 3)
    v = len(az)
    return Cameras(c2w[None].expand(batch_size, v, 4, 4).contiguous(), K[None].expand(batch_size, v, 3, 3).contiguous(),
                   resolution, resolution, projection="orthographic")


def era3d_ddim_scheduler():
    """DDIM with Era3D's training noise schedule (``configs/train-unclip-512-6view.yaml`` ``noise_scheduler_kwargs``)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                         timestep_spacing="leading", steps_offset=1, clip_sample=False, rescale_betas_zero_snr=False,
                         prediction_type="epsilon")


def prepare_era3d_input(rgba: torch.Tensor, crop_size: int = ERA3D_CROP_SIZE, size: int = ERA3D_RESOLUTION) -> torch.Tensor:
    """Era3D's input framing of RGBA images ``(B, 4, H, W)`` (or ``(4, H, W)``) in ``[0, 1]`` → ``(B, 3, size, size)``.

    The alpha's bounding box (upstream's PIL crop drops its last row and column, so does this) is
    resized so its longer side is ``crop_size`` (bicubic), pasted at the centre of a transparent
    ``size``² canvas and composited over white.
    """
    if rgba.ndim == 3:
        rgba = rgba[None]
    if rgba.ndim != 4 or rgba.shape[1] != 4:
        raise ShapeError(f"rgba: expected (B, 4, H, W) RGBA in [0, 1], got {list(rgba.shape)}")
    if not 0 < crop_size <= size:
        raise ConfigError(f"crop_size: expected 0 < crop_size <= size ({size}), got {crop_size}")
    out = []
    for i, img in enumerate(rgba.float()):
        ys, xs = torch.nonzero(img[3] > 0, as_tuple=True)
        if len(ys) == 0:
            raise ShapeError(f"rgba[{i}]: the alpha channel is empty (no object to frame)")
        crop = img[:, int(ys.min()):int(ys.max()), int(xs.min()):int(xs.max())]
        h, w = crop.shape[-2:]
        if h == 0 or w == 0:  # a one-pixel-wide object: keep its pixel instead of upstream's empty crop
            crop = img[:, int(ys.min()):int(ys.max()) + 1, int(xs.min()):int(xs.max()) + 1]
            h, w = crop.shape[-2:]
        scale = crop_size / max(h, w)
        nh, nw = max(1, int(scale * h)), max(1, int(scale * w))
        crop = F.interpolate(crop[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
        canvas = torch.zeros(4, size, size)
        top, left = (size - nh) // 2, (size - nw) // 2
        canvas[:, top:top + nh, left:left + nw] = crop
        alpha = canvas[3:4]
        out.append(canvas[:3] * alpha + (1 - alpha))
    return torch.stack(out)


def load_prompt_embeds(folder: str | Path) -> torch.Tensor:
    """Era3D's fixed prompt embeddings ``(2 V, T, D)`` = ``[normal_embeds; clr_embeds]`` from a local folder."""
    folder = Path(folder).expanduser()
    parts = []
    for name in ("normal_embeds.pt", "clr_embeds.pt"):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: not found: copy mvdiffusion/data/fixed_prompt_embeds_6view/{name} from "
                                  "https://github.com/pengHTYX/Era3D into this folder")
        try:
            t = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise CheckpointError(f"{path}: not a readable tensor file ({type(e).__name__})") from None
        if not isinstance(t, torch.Tensor) or t.ndim != 3:
            raise CheckpointError(f"{path}: expected a (V, T, D) tensor, got {getattr(t, 'shape', type(t).__name__)}")
        parts.append(t.float())
    if parts[0].shape != parts[1].shape:
        raise CheckpointError(f"{folder}: normal_embeds {list(parts[0].shape)} and clr_embeds {list(parts[1].shape)} differ")
    return torch.cat(parts)


def _to_rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, 2, V, ...)`` per object → ``(2 B V, ...)`` rows ``[domain 0 (b v), domain 1 (b v)]``."""
    return x.transpose(0, 1).reshape(-1, *x.shape[3:])


def _from_rows(x: torch.Tensor, b: int, v: int) -> torch.Tensor:
    """Inverse of :func:`_to_rows`: ``(2 B V, ...)`` → ``(B, 2, V, ...)``."""
    return x.reshape(2, b, v, *x.shape[1:]).transpose(0, 1)


class Era3DGenerator(nn.Module, MultiViewGenerator):
    """Era3D (module docstring). Construct from components, or :meth:`from_pretrained` a local folder.

    Args:
        unet, vae, image_encoder, feature_extractor, image_normalizer, image_noising_scheduler,
            scheduler: the pipeline's parts (diffusers/transformers objects; ``scheduler`` a DDIM).
        prompt_embeds: ``(2 V, T, D)`` ``[normals; colours]`` per-view prompt embeddings.
        num_inference_steps: 40; guidance_scale: 3.0; eta: 1.0; noise_level: 0 (Era3D's test config).
        resolution: output size (512 = 8 × the UNet's 64² latents).
        ortho_scale, distance: camera layout (:func:`era3d_cameras`).
    """

    def __init__(self, unet: Era3DUNet, vae, image_encoder, feature_extractor, image_normalizer, image_noising_scheduler, scheduler,
                 prompt_embeds: torch.Tensor, num_inference_steps: int = 40, guidance_scale: float = 3.0, eta: float = 1.0,
                 noise_level: int = 0, resolution: int | None = None, ortho_scale: float = ERA3D_ORTHO_SCALE,
                 distance: float = ERA3D_CAMERA_DISTANCE):
        super().__init__()
        self.unet, self.vae, self.image_encoder, self.image_normalizer = unet, vae, image_encoder, image_normalizer
        self.feature_extractor, self.image_noising_scheduler, self.scheduler = feature_extractor, image_noising_scheduler, scheduler
        self.num_views = unet.config.num_views
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = int(resolution or unet.config.sample_size * factor)
        if self.resolution % (factor * 2 ** (len(unet.config.block_out_channels) - 1)):
            raise ConfigError(f"resolution: {self.resolution} is not a multiple of the VAE and UNet downsampling")
        want = (2 * self.num_views, unet.config.cross_attention_dim)
        if prompt_embeds.ndim != 3 or (prompt_embeds.shape[0], prompt_embeds.shape[2]) != want:
            raise ShapeError(f"prompt_embeds: expected ({want[0]}, T, {want[1]}) [normals; colours], got {list(prompt_embeds.shape)}")
        self.register_buffer("prompt_embeds", prompt_embeds.float(), persistent=False)
        if int(num_inference_steps) < 1:
            raise ConfigError(f"num_inference_steps: expected >= 1, got {num_inference_steps}")
        self.num_inference_steps, self.guidance_scale, self.eta = int(num_inference_steps), float(guidance_scale), float(eta)
        self.noise_level, self.ortho_scale, self.distance = int(noise_level), float(ortho_scale), float(distance)
        if not 0 <= self.noise_level < image_noising_scheduler.config.num_train_timesteps:
            raise ConfigError(f"noise_level: expected 0 <= noise_level < {image_noising_scheduler.config.num_train_timesteps}, "
                              f"got {noise_level}")
        clip_dim = image_encoder.config.projection_dim
        if 2 * clip_dim != unet.config.class_embed_input_dim:
            raise ConfigError(f"image_encoder: projection_dim {clip_dim} x 2 (embedding ‖ noise-level embedding) does not match "
                              f"the UNet's class_embed_input_dim {unet.config.class_embed_input_dim}")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, folder: str | Path, prompt_embeds: str | Path | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", **kwargs) -> Era3DGenerator:
        """Build from a local copy of ``pengHTYX/MacLab-Era3D-512-6view`` (nothing is downloaded).

        Args:
            folder: the model folder (``unet/ vae/ image_encoder/ feature_extractor/ image_normalizer/
                image_noising_scheduler/ scheduler/``).
            prompt_embeds: folder holding ``normal_embeds.pt`` and ``clr_embeds.pt`` (default
                ``folder/fixed_prompt_embeds_6view``).
            kwargs: sampling options of :class:`Era3DGenerator`.
        """
        from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
        from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        folder = Path(folder).expanduser()
        where = "https://huggingface.co/pengHTYX/MacLab-Era3D-512-6view"
        for rel in ("unet/config.json", "vae/config.json", "image_encoder/config.json", "feature_extractor/preprocessor_config.json",
                    "image_normalizer/config.json", "image_noising_scheduler/scheduler_config.json", "scheduler/scheduler_config.json"):
            if not (folder / rel).is_file():
                raise CheckpointError(f"{folder / rel}: not found: download the model folder from {where} and give its local path")
        for sub, names in (("vae", WEIGHT_NAMES), ("image_normalizer", WEIGHT_NAMES),
                           ("image_encoder", ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"))):
            if not any((folder / sub / n).is_file() for n in names):
                raise CheckpointError(f"{folder / sub}: no weight file ({' / '.join(names[:2])}): download the model folder from {where}")
        embeds = load_prompt_embeds(folder / "fixed_prompt_embeds_6view" if prompt_embeds is None else prompt_embeds)
        variant = lambda sub: "fp16" if not (folder / sub / "diffusion_pytorch_model.safetensors").is_file() and (  # noqa: E731
            folder / sub / "diffusion_pytorch_model.fp16.safetensors").is_file() else None
        try:
            vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True, variant=variant("vae"), torch_dtype=dtype)
            normalizer = StableUnCLIPImageNormalizer.from_pretrained(folder / "image_normalizer", local_files_only=True,
                                                                     variant=variant("image_normalizer"), torch_dtype=dtype)
            encoder = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder", local_files_only=True, dtype=dtype)
            processor = CLIPImageProcessor.from_pretrained(folder / "feature_extractor", local_files_only=True)
            noising = DDPMScheduler.from_pretrained(folder / "image_noising_scheduler", local_files_only=True)
            scheduler = DDIMScheduler.from_config(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{folder}: could not load an Era3D component ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        unet = load_era3d_unet(folder / "unet", dtype=dtype)
        gen = cls(unet, vae, encoder, processor, normalizer, noising, scheduler, embeds, **kwargs)
        return gen.to(device=device, dtype=dtype)

    # ------------------------------------------------------------------ interface
    def cameras(self, batch_size: int = 1) -> Cameras:
        """Era3D's six orthographic cameras ``(batch_size, 6)`` at ``resolution``² (:func:`era3d_cameras`)."""
        return era3d_cameras(batch_size, self.resolution, self.ortho_scale, self.distance).to(self.prompt_embeds.device)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def _device(self) -> torch.device:
        return self.prompt_embeds.device

    def _clip_embeds(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → ``(B, D)`` CLIP image embeddings (upstream: uint8 PIL through the processor)."""
        from PIL import Image

        # torchvision's to_pil_image truncates (mul(255).byte()); so does this
        pils = [Image.fromarray((x.detach().float().cpu().permute(1, 2, 0) * 255).to(torch.uint8).numpy()) for x in image]
        pixels = self.feature_extractor(images=pils, return_tensors="pt")["pixel_values"]
        pixels = torch.as_tensor(np.asarray(pixels)).to(self._device, self._dtype)
        return self.image_encoder(pixel_values=pixels).image_embeds

    def _noise_augment(self, embeds_rows: torch.Tensor, noise_rows: torch.Tensor) -> torch.Tensor:
        """unCLIP noise augmentation at ``noise_level`` + the noise-level embedding: ``(R, D) → (R, 2 D)``."""
        from diffusers.models.embeddings import get_timestep_embedding

        level = torch.full((embeds_rows.shape[0],), self.noise_level, device=embeds_rows.device, dtype=torch.long)
        x = self.image_normalizer.scale(embeds_rows)
        x = self.image_noising_scheduler.add_noise(x, noise_rows.to(x), level)
        x = self.image_normalizer.unscale(x)
        emb = get_timestep_embedding(level, embeds_rows.shape[-1], flip_sin_to_cos=True, downscale_freq_shift=0).to(x.dtype)
        return torch.cat([x, emb], dim=1)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, R, R)`` in [0, 1] → VAE latents ``.mode() × scaling_factor``."""
        x = (images.to(self._device, self._dtype) * 2 - 1)
        return self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def _prepare(self, image: torch.Tensor, generator: Generators) -> dict:
        """Conditioning of the ``2 B V`` rows (CFG layout when guided) and the latent-noise draw, in upstream's order."""
        image = check_condition_image(image)
        b, v, r = image.shape[0], self.num_views, self.resolution
        if image.shape[-2:] != (r, r):
            image = F.interpolate(image.float(), size=(r, r), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        clip = self._clip_embeds(image)                                                   # (B, D)
        clip_noise = randn_per_object((b, 2, v, clip.shape[-1]), generator, self._device, torch.float32)
        class_rows = self._noise_augment(_to_rows(clip[:, None, None].expand(b, 2, v, -1)), _to_rows(clip_noise))
        lat = self._encode(image)                                                         # (B, 4, h, w)
        lat_rows = _to_rows(lat[:, None, None].expand(b, 2, v, *lat.shape[1:]))
        pn, pc = self.prompt_embeds.to(self._dtype).chunk(2)                              # (V, T, D) each
        prompt = torch.cat([pn.repeat(b, 1, 1), pc.repeat(b, 1, 1)])                      # rows [normals (b v), colours (b v)]
        if self.guidance_scale != 1.0:
            half = b * v
            zc, zl = torch.zeros_like(class_rows[:half]), torch.zeros_like(lat_rows[:half])
            class_rows = torch.cat([zc, class_rows[:half], zc, class_rows[half:]])
            lat_rows = torch.cat([zl, lat_rows[:half], zl, lat_rows[half:]])
            prompt = torch.cat([prompt[:half], prompt[:half], prompt[half:], prompt[half:]])
        latent_noise = randn_per_object((b, 2, v, *lat.shape[1:]), generator, self._device, torch.float32).to(self._dtype)
        return {"b": b, "class_labels": class_rows.to(self._dtype), "image_latents": lat_rows, "prompt": prompt,
                "noise": latent_noise}

    def _denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict, generator: Generators) -> torch.Tensor:
        """DDIM over ``timesteps`` from ``latents`` ``(2 B V, 4, h, w)`` with upstream's CFG chunking."""
        b, v = cond["b"], self.num_views
        guided = self.guidance_scale != 1.0
        for t in timesteps:
            x = latents
            if guided:
                n, c = latents.chunk(2)
                x = torch.cat([n, n, c, c])
            x = self.scheduler.scale_model_input(torch.cat([x, cond["image_latents"]], dim=1), t)
            eps, _ = self.unet(x, t, cond["prompt"], cond["class_labels"])
            if guided:
                nu, nc, cu, cc = eps.chunk(4)
                uncond, text = torch.cat([nu, cu]), torch.cat([nc, cc])
                eps = uncond + self.guidance_scale * (text - uncond)
            step_noise = None
            if self.eta > 0:
                step_noise = _to_rows(randn_per_object((b, 2, v, *latents.shape[1:]), generator, self._device, torch.float32))
                step_noise = step_noise.to(latents.dtype)
            latents = self.scheduler.step(eps, t, latents, eta=self.eta, variance_noise=step_noise).prev_sample
        return latents

    def _views(self, latents: torch.Tensor, b: int, cams: Cameras, with_normals: bool = True) -> Views:
        v, r = self.num_views, self.resolution
        decoded = _from_rows(self._decode(latents), b, v) if with_normals else self._decode(latents).reshape(b, 1, v, 3, r, r)
        colours = decoded[:, -1]
        normals = self._world_normals(decoded[:, 0], cams) if with_normals else None
        return Views(images=colours, cameras=cams, normals=normals)

    @staticmethod
    def _world_normals(maps: torch.Tensor, cams: Cameras) -> torch.Tensor:
        """Decoded normal maps ``(B, V, 3, R, R)`` (input-camera OpenGL frame, ``n/2 + 1/2``) → world unit normals, 0 where empty."""
        n = maps * 2 - 1
        empty = n.norm(dim=2, keepdim=True) > 1.5
        n_cv = n * torch.tensor([1.0, -1.0, -1.0], device=n.device).view(1, 1, 3, 1, 1)
        rot = cams.c2w[:, 0, :3, :3].to(n)                                                # the input view's camera
        world = torch.einsum("bij,bvjhw->bvihw", rot, n_cv)
        world = F.normalize(world, dim=2)
        return torch.where(empty, torch.zeros_like(world), world)

    @torch.no_grad()
    def generate(self, image: torch.Tensor, generator: Generators = None) -> Views:
        """Six views of each object from pure noise (module docstring).

        Args:
            image: ``(B, 3, H, W)`` the input view in [0, 1] on white (:func:`prepare_era3d_input`;
                resized to ``resolution`` if needed).

        Returns:
            :class:`Views`: colours ``(B, 6, 3, R, R)``, orthographic cameras ``(B, 6)``, world-space
            normals ``(B, 6, 3, R, R)``; no masks.
        """
        cond = self._prepare(image, generator)
        self.scheduler.set_timesteps(self.num_inference_steps, device=self._device)
        latents = _to_rows(cond["noise"]) * self.scheduler.init_noise_sigma
        latents = self._denoise(latents, self.scheduler.timesteps, cond, generator)
        return self._views(latents, cond["b"], self.cameras(cond["b"]))

    @torch.no_grad()
    def refine(self, views: Views, image: torch.Tensor, strength: float, generator: Generators = None) -> Views:
        """SDEdit the colour ``views`` at ``strength`` (module docstring: what feeds the normal half).

        Args:
            views: ``(B, 6, 3, R, R)`` renders at :meth:`cameras`.
            image: ``(B, 3, H, W)`` the input view conditioning the generator.
            strength: ``s`` in [0, 1].
        """
        s = check_strength(strength)
        b = check_condition_image(image).shape[0]
        renders = check_views_for(self, views, b)
        cond = self._prepare(image, generator)
        v = self.num_views
        timesteps = sdedit_timesteps(self.scheduler, self.num_inference_steps, s)
        clean = self._encode(renders.reshape(b * v, *renders.shape[2:]))                 # (B V, 4, h, w), (b v) order
        cams = self.cameras(b)
        if len(timesteps) == 0:
            return self._views(clean, b, cams, with_normals=False)
        noise_normal, noise_colour = (cond["noise"][:, d].reshape(b * v, *clean.shape[1:]) for d in (0, 1))
        start_colour = sdedit_start(self.scheduler, clean, noise_colour, timesteps.to(clean.device), s)
        start_normal = noise_normal * self.scheduler.init_noise_sigma                       # no normal renders: pure noise at the same t
        latents = self._denoise(torch.cat([start_normal, start_colour]), timesteps, cond, generator)
        return self._views(latents, b, cams)
