"""Multi-view image encoders: images (+ cameras) -> one sequence of tokens.

The contract every reconstruction backbone relies on (:class:`ImageEncoder`)::

    tokens = encoder(images, cameras)      # images (B, V, C, H, W) -> tokens (B, V*T, D)

- ``images`` are float in ``[0, 1]``, channels-first. ``C`` is 3 (rgb) or 4 (rgb + a binary
  foreground mask as the 4th channel); an encoder that has no use for the mask ignores it.
- ``cameras`` is a :class:`~recon3d.data.cameras.Cameras` with batch shape ``(B, V)`` and image
  size ``W x H`` (recon3d's OpenCV convention), or ``None`` for encoders that do not need it.
- Tokens come out **view-major**: view ``v`` owns tokens ``v*T .. (v+1)*T - 1``, each view's
  ``T = tokens_per_view(H, W)`` tokens in row-major patch order.

Every constructor argument is a plain value (int, float, str, dict of plain values), so swapping
the encoder of a method is one ``class_path`` line in its YAML. Pretrained backbones are built
from a **local** directory (``from_pretrained(..., local_files_only=True)``) or, for tests and
random initialisation, from a config dict; nothing is downloaded. ``transformers`` and
``diffusers`` are imported only when such an encoder is built. Loading is strict: a key the
directory's weights lack or hold extra, or of another shape, is one
:class:`~recon3d.errors.CheckpointError` line (recon3d's one key-mismatch report,
:func:`recon3d.utils.checkpoint.key_mismatch_report`) unless ``pretrained_ignore`` names it
(transformers and diffusers would only log it and leave random weights). A backbone that is
both pretrained and frozen is marked as a frozen pretrained part
(:func:`recon3d.utils.checkpoint.mark_frozen`): method checkpoints leave its tensors out and
re-attach them from the directory's weight file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from recon3d.data.cameras import Cameras
from recon3d.data.rays import plucker_embedding
from recon3d.errors import CheckpointError, ConfigError, ShapeError
from recon3d.utils.checkpoint import check_ignore_patterns, load_hf_pretrained, mark_frozen
from recon3d.utils.checks import check_shape

__all__ = ["ImageEncoder", "ConvPatchEncoder", "DinoV2Encoder", "VAEEncoder", "ray_input_channels"]


def _split_images(images: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rgb (B,V,3,H,W), mask (B,V,1,H,W) | None)`` from rgb or rgb+mask images."""
    dims = check_shape(images, "B V C H W", "images")
    if dims["C"] not in (3, 4):
        raise ShapeError(f"images: expected 3 (rgb) or 4 (rgb + mask) channels, got shape {list(images.shape)}")
    rgb, mask = images[:, :, :3], (images[:, :, 3:4] if dims["C"] == 4 else None)
    if masks is not None:
        check_shape(masks, "B V 1 H W", "masks", {k: dims[k] for k in ("B", "V", "H", "W")})
        mask = masks.to(images.dtype)
    return rgb, mask


def _check_cameras(cameras: Cameras | None, images: torch.Tensor, who: str) -> Cameras:
    if cameras is None:
        raise ShapeError(f"cameras: {who} needs the input cameras (ray embedding), got None")
    if not isinstance(cameras, Cameras):
        raise ShapeError(f"cameras: expected a recon3d Cameras, got {type(cameras).__name__}")
    B, V, _, H, W = images.shape
    if tuple(cameras.batch_shape) != (B, V):
        raise ShapeError(f"cameras: expected batch shape [{B}, {V}] to match images, got {list(cameras.batch_shape)}")
    if (cameras.width, cameras.height) != (W, H):
        raise ShapeError(
            f"cameras: image size {cameras.width}x{cameras.height} does not match images {W}x{H} "
            "(use Cameras.resized after resizing images)"
        )
    return cameras


def ray_input_channels(
    images: torch.Tensor,
    cameras: Cameras | None,
    masks: torch.Tensor | None = None,
    moment: Literal["dxo", "oxd"] = "dxo",
    use_mask: bool = True,
) -> torch.Tensor:
    """GTR's per-pixel encoder input ``(B, V, 10, H, W)``: ``[rgb, d, m, mask]``.

    ``d`` is the unit world ray direction through the pixel centre and ``m`` the Plücker moment,
    ``d x o`` for ``moment="dxo"`` (what GTR's released weights were trained on) or the textbook
    ``o x d``. Without ``use_mask`` the result has 9 channels (GTR's ``cond_mode: rgb``). A missing
    mask (3-channel images, no ``masks``) is all ones.

    Args:
        images: ``(B, V, 3|4, H, W)`` rgb or rgb+mask in ``[0, 1]``.
        cameras: batch ``(B, V)``, size ``W x H``.
        masks: optional ``(B, V, 1, H, W)``; overrides a 4th image channel.
    """
    rgb, mask = _split_images(images, masks)
    cams = _check_cameras(cameras, images, "ray_input_channels")
    rays = plucker_embedding(cams, convention=moment, order="dm").to(rgb)  # B V 6 H W: [d, m]
    parts = [rgb, rays]
    if use_mask:
        parts.append(torch.ones_like(rgb[:, :, :1]) if mask is None else mask)
    return torch.cat(parts, 2)


class ImageEncoder(nn.Module, ABC):
    """Abstract multi-view encoder (see the module docstring for the contract).

    Subclasses implement :meth:`forward`, :attr:`out_dim` and :meth:`tokens_per_view`.
    """

    @property
    @abstractmethod
    def out_dim(self) -> int:
        """Token width ``D``."""

    @abstractmethod
    def tokens_per_view(self, height: int, width: int) -> int:
        """Number of tokens ``T`` one ``height x width`` view becomes."""

    @abstractmethod
    def forward(self, images: torch.Tensor, cameras: Cameras | None = None) -> torch.Tensor:
        """``images (B, V, C, H, W)``, ``cameras (B, V)`` -> ``tokens (B, V*T, D)``."""


def _check_divisible(images: torch.Tensor, factor: int, who: str) -> None:
    H, W = images.shape[-2:]
    if H % factor or W % factor:
        raise ShapeError(f"images: {who} needs height and width divisible by {factor}, got {H}x{W}")


class ConvPatchEncoder(ImageEncoder):
    """GTR's convolutional encoder: one strided convolution over ``[rgb, d, m, mask]``.

    ``Conv2d(10 -> width, kernel=patch_size, stride=patch_size, bias=False)`` over each view's
    10-channel input (:func:`ray_input_channels`), trained from scratch (paper §3.1, replacing
    DINO). It builds the ray channels itself from ``cameras``.

    Paper vs official code: the paper says "Plücker coordinates" without a sign; the released
    weights use ``[d, d x o]`` (``moment="dxo"``, the default, so official weights load) and
    ``cond_mode: rgba`` (``use_mask=True``). Official size: ``width=1024, patch_size=16``.

    Args:
        width: token width ``D``.
        patch_size: patch side in pixels (kernel and stride).
        moment: Plücker moment sign, ``"dxo"`` (GTR) or ``"oxd"``.
        use_mask: append the foreground mask channel (10 inputs) or not (9 inputs).
    """

    def __init__(self, width: int = 1024, patch_size: int = 16, moment: Literal["dxo", "oxd"] = "dxo", use_mask: bool = True):
        super().__init__()
        if moment not in ("dxo", "oxd"):
            raise ConfigError(f"moment: expected 'dxo' or 'oxd', got {moment!r}")
        self.width, self.patch_size, self.moment, self.use_mask = int(width), int(patch_size), moment, bool(use_mask)
        self.in_channels = 10 if self.use_mask else 9
        self.proj = nn.Conv2d(self.in_channels, self.width, kernel_size=self.patch_size, stride=self.patch_size, bias=False)

    @property
    def out_dim(self) -> int:
        return self.width

    def tokens_per_view(self, height: int, width: int) -> int:
        return (height // self.patch_size) * (width // self.patch_size)

    def forward(self, images: torch.Tensor, cameras: Cameras | None = None, masks: torch.Tensor | None = None) -> torch.Tensor:
        """``images (B, V, 3|4, H, W)``, ``cameras (B, V)``, optional ``masks (B, V, 1, H, W)`` -> ``(B, V*T, width)``."""
        x = ray_input_channels(images, cameras, masks, moment=self.moment, use_mask=self.use_mask)
        _check_divisible(x, self.patch_size, type(self).__name__)
        B, V = x.shape[:2]
        feats = self.proj(x.flatten(0, 1).to(self.proj.weight.dtype))  # B*V, D, h, w
        return feats.flatten(2).transpose(1, 2).reshape(B, -1, self.width)


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_hf(cls: Any, pretrained_path: str | None, config: dict | None, config_cls: Any, who: str,
             ignore: list[str] | None = None) -> Any:
    """Build a HF model from a local directory (strictly, see module docstring; ``ignore``:
    patterns of keys that may differ) or from a config dict (never downloads)."""
    if (pretrained_path is None) == (config is None):
        raise ConfigError(f"{who}: give exactly one of pretrained_path (a local directory) or config (a dict)")
    ignore = check_ignore_patterns(ignore, f"{who}.pretrained_ignore")
    if config is not None:
        return cls(config_cls(**config)) if config_cls is not None else cls(**config)
    path = Path(pretrained_path).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f"{who}: pretrained_path {str(path)!r} is not a directory; download the model files "
            "(config.json + weights) there first, nothing is fetched at run time"
        )
    return load_hf_pretrained(cls, path, who, ignore)


def _weights_file(path: str | None) -> Path | None:
    """The single safetensors weight file of a HF/diffusers directory (None if sharded or absent)."""
    if path is None:
        return None
    files = sorted(Path(path).expanduser().glob("*.safetensors"))
    return files[0] if len(files) == 1 else None


class DinoV2Encoder(ImageEncoder):
    """DINOv2 ViT (``transformers.Dinov2Model``) patch tokens, optionally camera-conditioned.

    RGB is normalised with the ImageNet statistics; the mask channel, if any, is ignored (give
    images composited on the background). Patch tokens of the last layer (CLS dropped) are the
    output, optionally linearly projected to ``out_dim``.

    Camera conditioning (a recon3d choice; GTR's DINO ablation, appendix A, does not describe one):
    the per-pixel Plücker embedding ``[d, m]`` is patchified by a zero-initialised
    ``Conv2d(6 -> hidden, patch, patch)`` and *added* to the patch tokens, either to the patch
    embeddings before the first ViT block (``"plucker_input"``, default) or to the output tokens
    (``"plucker_output"``). Zero initialisation makes the encoder start as plain DINOv2.
    ``"none"`` disables it (and ``cameras`` may be None).

    Args:
        pretrained_path: local directory holding a HF DINOv2 checkpoint (``config.json`` + weights).
        config: alternatively a ``Dinov2Config`` dict, for a randomly initialised model (tests).
        out_dim: if given, a linear projection to this width; else the ViT hidden size.
        camera_conditioning: ``"plucker_input"``, ``"plucker_output"`` or ``"none"``.
        moment: Plücker moment sign (``"dxo"`` like GTR, or ``"oxd"``).
        freeze_backbone: keep the ViT's own weights fixed (the camera and output projections train);
            with ``pretrained_path`` it is a frozen pretrained part (module docstring).
        pretrained_ignore: patterns (globs or ``"re:<regex>"``) of backbone keys that may be
            missing from ``pretrained_path``'s weights, extra in them or of another shape.
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        config: dict | None = None,
        out_dim: int | None = None,
        camera_conditioning: Literal["plucker_input", "plucker_output", "none"] = "plucker_input",
        moment: Literal["dxo", "oxd"] = "dxo",
        freeze_backbone: bool = False,
        pretrained_ignore: list[str] | None = None,
    ):
        super().__init__()
        if camera_conditioning not in ("plucker_input", "plucker_output", "none"):
            raise ConfigError(f"camera_conditioning: expected 'plucker_input', 'plucker_output' or 'none', got {camera_conditioning!r}")
        from transformers import Dinov2Config, Dinov2Model

        self.backbone = _load_hf(Dinov2Model, pretrained_path, config, Dinov2Config, "DinoV2Encoder", pretrained_ignore)
        cfg = self.backbone.config
        self.patch_size, self.hidden = int(cfg.patch_size), int(cfg.hidden_size)
        self.camera_conditioning, self.moment = camera_conditioning, moment
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            weights = _weights_file(pretrained_path)
            if weights is not None:
                mark_frozen(self.backbone, weights)
        self.camera_proj = None
        if camera_conditioning != "none":
            self.camera_proj = nn.Conv2d(6, self.hidden, self.patch_size, self.patch_size)
            nn.init.zeros_(self.camera_proj.weight)
            nn.init.zeros_(self.camera_proj.bias)
        self.out_proj = nn.Linear(self.hidden, int(out_dim)) if out_dim is not None else None
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._pending: torch.Tensor | None = None
        if camera_conditioning == "plucker_input":
            self.backbone.embeddings.register_forward_hook(self._add_camera_to_embeddings)

    def _add_camera_to_embeddings(self, module, args, output):
        if self._pending is None:
            return output
        cam, self._pending = self._pending, None
        T = cam.shape[1]
        return torch.cat([output[:, : output.shape[1] - T], output[:, -T:] + cam.to(output.dtype)], 1)

    @property
    def out_dim(self) -> int:
        return self.out_proj.out_features if self.out_proj is not None else self.hidden

    def tokens_per_view(self, height: int, width: int) -> int:
        return (height // self.patch_size) * (width // self.patch_size)

    def forward(self, images: torch.Tensor, cameras: Cameras | None = None) -> torch.Tensor:
        """``images (B, V, 3|4, H, W)``, ``cameras (B, V)`` -> ``tokens (B, V*T, out_dim)``."""
        rgb, _ = _split_images(images)
        _check_divisible(rgb, self.patch_size, type(self).__name__)
        B, V, _, H, W = rgb.shape
        x = (rgb.flatten(0, 1) - self.mean) / self.std
        cam = None
        if self.camera_proj is not None:
            rays = plucker_embedding(_check_cameras(cameras, images, type(self).__name__), convention=self.moment, order="dm")
            cam = self.camera_proj(rays.flatten(0, 1).to(x)).flatten(2).transpose(1, 2)  # B*V, T, hidden
        T = self.tokens_per_view(H, W)
        if self.camera_conditioning == "plucker_input":
            self._pending = cam
        try:
            out = self.backbone(pixel_values=x).last_hidden_state[:, -T:]
        finally:
            self._pending = None
        if self.camera_conditioning == "plucker_output":
            out = out + cam
        if self.out_proj is not None:
            out = self.out_proj(out)
        return out.reshape(B, V * T, -1)


class VAEEncoder(ImageEncoder):
    """A Stable-Diffusion VAE encoder as the image encoder (GTR appendix A, "Vae encoder").

    Following the appendix, the images, the masks and the camera rays are given to the VAE
    encoder *separately*, each as a 3-channel image in ``[-1, 1]``-ish range: rgb, mask (repeated
    to 3 channels), ray direction ``d`` and ray moment ``m``. The four latent maps are concatenated
    and assembled into tokens by one ``Conv2d(4 * latent_channels -> width, k=s, stride=s)`` with
    ``s = patch_size / vae_factor`` (``vae_factor`` = the VAE's downsampling, 8 for SD VAEs).

    The paper used TAESD (``arch="tiny"``, diffusers ``AutoencoderTiny``); ``arch="kl"`` takes a
    full SD ``AutoencoderKL`` (its posterior mean is used). Only the encoder half is kept.

    Args:
        pretrained_path: local directory of a diffusers VAE (``config.json`` + weights).
        config: alternatively the VAE's constructor kwargs as a dict (random init; tests).
        arch: ``"kl"`` (``AutoencoderKL``) or ``"tiny"`` (``AutoencoderTiny`` / TAESD).
        width: token width ``D``.
        patch_size: pixels per token side; a multiple of the VAE's downsampling factor.
        moment: Plücker moment sign of the ray input.
        freeze_vae: keep the VAE weights fixed (only the assembling convolution trains); with
            ``pretrained_path`` they are a frozen pretrained part (module docstring).
        pretrained_ignore: patterns of VAE keys that may be missing from ``pretrained_path``'s
            weights or extra in them.
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        config: dict | None = None,
        arch: Literal["kl", "tiny"] = "kl",
        width: int = 1024,
        patch_size: int = 16,
        moment: Literal["dxo", "oxd"] = "dxo",
        freeze_vae: bool = False,
        pretrained_ignore: list[str] | None = None,
    ):
        super().__init__()
        from diffusers import AutoencoderKL, AutoencoderTiny

        if arch not in ("kl", "tiny"):
            raise ConfigError(f"arch: expected 'kl' or 'tiny', got {arch!r}")
        vae = _load_hf(AutoencoderKL if arch == "kl" else AutoencoderTiny, pretrained_path, config, None, "VAEEncoder",
                       pretrained_ignore)
        cfg = vae.config
        blocks = cfg.block_out_channels if arch == "kl" else cfg.encoder_block_out_channels
        self.vae_factor = 2 ** (len(blocks) - 1)
        self.latent_channels = int(cfg.latent_channels)
        self.arch, self.moment = arch, moment
        self.width, self.patch_size = int(width), int(patch_size)
        if self.patch_size % self.vae_factor:
            raise ConfigError(f"patch_size: expected a multiple of the VAE downsampling {self.vae_factor}, got {patch_size}")
        self.vae_encoder = vae.encoder
        self.quant_conv = getattr(vae, "quant_conv", None) if arch == "kl" else None
        if freeze_vae:
            self.vae_encoder.requires_grad_(False)
            if self.quant_conv is not None:
                self.quant_conv.requires_grad_(False)
            weights = _weights_file(pretrained_path)
            if weights is not None:
                mark_frozen(self.vae_encoder, weights, prefix="encoder.")
                if self.quant_conv is not None:
                    mark_frozen(self.quant_conv, weights, prefix="quant_conv.")
        s = self.patch_size // self.vae_factor
        self.assemble = nn.Conv2d(4 * self.latent_channels, self.width, kernel_size=s, stride=s)

    @property
    def out_dim(self) -> int:
        return self.width

    def tokens_per_view(self, height: int, width: int) -> int:
        return (height // self.patch_size) * (width // self.patch_size)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.vae_encoder(x)
        if self.arch == "kl":
            if self.quant_conv is not None:
                z = self.quant_conv(z)
            z = z[:, : self.latent_channels]  # posterior mean
        return z

    def forward(self, images: torch.Tensor, cameras: Cameras | None = None, masks: torch.Tensor | None = None) -> torch.Tensor:
        """``images (B, V, 3|4, H, W)``, ``cameras (B, V)`` -> ``tokens (B, V*T, width)``."""
        x = ray_input_channels(images, cameras, masks, moment=self.moment, use_mask=True)
        _check_divisible(x, self.patch_size, type(self).__name__)
        B, V = x.shape[:2]
        x = x.flatten(0, 1)
        rgb, d, m, mask = x[:, 0:3], x[:, 3:6], x[:, 6:9], x[:, 9:10]
        groups = torch.cat([rgb * 2 - 1, mask.expand(-1, 3, -1, -1) * 2 - 1, d, m], 0)  # 4*BV, 3, H, W
        lat = self._encode(groups).chunk(4, 0)
        feats = self.assemble(torch.cat(lat, 1))
        return feats.flatten(2).transpose(1, 2).reshape(B, -1, self.width)
