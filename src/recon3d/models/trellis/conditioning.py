"""TRELLIS's image condition: DINOv2 ViT-L/14 with registers, tokens after a final LayerNorm.

Upstream (``trellis/pipelines/trellis_image_to_3d.py``):

* ``preprocess_image``: with an alpha channel, crop a square of side ``int(1.2 * max(w, h))``
  around the centre of the bounding box of ``alpha > 0.8`` (PIL crop: outside the image is
  transparent black), resize to 518² (Lanczos), and premultiply RGB by alpha — the object on
  **black**. Without alpha upstream first runs rembg; recon3d has no matting network, so images
  without masks are used whole (resized, no crop) — say so where it matters.
* ``encode_image``: ImageNet normalisation, ``dinov2_vitl14_reg`` (torch hub) ``x_prenorm``
  (the last block's output, before the model's own affine norm), then a **non-affine**
  ``layer_norm`` (eps 1e-5) -> ``(B, 1 + 4 + 1369, 1024)`` tokens: cls, 4 registers, 37 x 37
  patches. The negative condition is zeros of that shape.

Here the backbone is ``transformers``' ``Dinov2WithRegistersModel`` (the HF port of
``dinov2_vitl14_reg``: ``facebook/dinov2-with-registers-large``) from a local folder, or any
``Dinov2Model`` / ``Dinov2WithRegistersModel`` config dict (tests: a tiny random one). The HF
``hidden_states[-1]`` is upstream's ``x_prenorm``. Differences, stated:

* resizing is torch's bilinear with antialiasing, not PIL's Lanczos (both low-pass; values
  differ near edges; not measured here). Resizing the premultiplied image, as here, is what
  upstream's order (resize the RGBA crop, then multiply by alpha) computes: Pillow resamples RGBA
  in premultiplied form;
* ``image_size`` may be set below 518 for CPU tests (fewer patch tokens); 518 is TRELLIS's.

:meth:`TrellisImageCondition.patch_features` gives the **pre-norm** patch tokens on the patch
grid, which TRELLIS's SLAT feature extraction samples at projected voxel centres
(``dataset_toolkits/extract_feature.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.errors import ConfigError, ShapeError

__all__ = ["TrellisImageCondition", "trellis_preprocess", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _crop_box(mask: torch.Tensor, threshold: float, scale: float) -> tuple[int, int, int, int] | None:
    """Upstream's square crop ``(x0, y0, x1, y1)`` (exclusive end) around ``mask > threshold``;
    None when no pixel passes. ``mask (H, W)``."""
    ys, xs = torch.nonzero(mask > threshold, as_tuple=True)
    if ys.numel() == 0:
        return None
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    size = int(max(x1 - x0, y1 - y0) * scale)
    # PIL's Image.crop rounds its (possibly half-integer) box to whole pixels.
    return round(cx - size // 2), round(cy - size // 2), round(cx + size // 2), round(cy + size // 2)


def trellis_preprocess(images: torch.Tensor, masks: torch.Tensor | None = None, background: torch.Tensor | None = None,
                       size: int = 518, alpha_threshold: float = 0.8, crop_scale: float = 1.2) -> torch.Tensor:
    """TRELLIS's ``preprocess_image`` on tensors (module docstring).

    Args:
        images: ``(N, 3, H, W)`` RGB in [0, 1], composited on ``background`` where ``masks`` < 1.
        masks: ``(N, 1, H, W)`` alpha in [0, 1], or None (no crop; the image as it is).
        background: ``(N, 3)`` or ``(3,)`` colour the images were composited on (default white),
            removed before premultiplying: ``rgb * alpha = image - background * (1 - alpha)``.
        size: output side (518).

    Returns ``(N, 3, size, size)`` alpha-premultiplied RGB (object on black) in [0, 1].
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ShapeError(f"images: expected (N, 3, H, W) RGB, got {tuple(images.shape)}")
    N, _, H, W = images.shape
    if masks is None:
        return F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    if masks.shape != (N, 1, H, W):
        raise ShapeError(f"masks: expected ({N}, 1, {H}, {W}) to match the images, got {tuple(masks.shape)}")
    bg = torch.ones(3) if background is None else torch.as_tensor(background, dtype=torch.float32)
    bg = bg.to(images.device).reshape(-1, 3)[:, :, None, None].expand(N, 3, 1, 1)
    alpha = masks.float().clamp(0, 1)
    premult = (images.float() - bg * (1 - alpha)).clamp(0, 1)
    premult = torch.where(alpha > 0, premult, torch.zeros_like(premult))
    out = []
    for i in range(N):
        box = _crop_box(alpha[i, 0], alpha_threshold, crop_scale)
        if box is None:
            box = (0, 0, W, H)  # nothing opaque enough: upstream would fail; keep the whole frame
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            x1, y1 = x0 + 1, y0 + 1
        # Pad with black (transparent, premultiplied) so boxes reaching outside the image work as PIL's crop.
        pad = (max(0, -x0), max(0, x1 - W), max(0, -y0), max(0, y1 - H))
        img = F.pad(premult[i : i + 1], pad)
        crop = img[:, :, y0 + pad[2] : y1 + pad[2], x0 + pad[0] : x1 + pad[0]]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(out).clamp(0, 1)


def _build_backbone(pretrained_path: str | None, config: dict | None) -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from recon3d.models.encoders import _load_hf

    if (pretrained_path is None) == (config is None):
        raise ConfigError("TrellisImageCondition: give exactly one of pretrained_path (a local DINOv2 folder) or config (a dict)")
    if config is not None:
        cfg = dict(config)
        registers = int(cfg.get("num_register_tokens", 0))
        if registers:
            return _load_hf(Dinov2WithRegistersModel, None, cfg, Dinov2WithRegistersConfig, "TrellisImageCondition")
        cfg.pop("num_register_tokens", None)
        return _load_hf(Dinov2Model, None, cfg, Dinov2Config, "TrellisImageCondition")
    import json
    from pathlib import Path

    cfg_file = Path(pretrained_path).expanduser() / "config.json"
    kind = json.loads(cfg_file.read_text()).get("model_type") if cfg_file.is_file() else None
    cls = Dinov2WithRegistersModel if kind == "dinov2_with_registers" else Dinov2Model
    return _load_hf(cls, pretrained_path, None, None, "TrellisImageCondition")


class TrellisImageCondition(nn.Module):
    """DINOv2 condition tokens as TRELLIS computes them (module docstring).

    Args:
        pretrained_path: local folder of a HF DINOv2 (with registers: ``dinov2_vitl14_reg``'s port).
        config: alternatively a config dict (``num_register_tokens > 0`` builds the registers
            variant), randomly initialised — for tests.
        image_size: square input side (TRELLIS: 518; a multiple of the patch size).
        preprocess: apply :func:`trellis_preprocess` (alpha crop, black background) when masks are given.

    The backbone is frozen (TRELLIS never trains it) and runs in eval mode; loaded from a folder
    with one ``.safetensors`` file it is a frozen pretrained part
    (:func:`~recon3d.utils.checkpoint.mark_frozen`: left out of checkpoints, re-read on load).
    """

    def __init__(self, pretrained_path: str | None = None, config: dict | None = None, image_size: int = 518,
                 preprocess: bool = True):
        super().__init__()
        self.backbone = _build_backbone(pretrained_path, config)
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        if pretrained_path is not None:
            from recon3d.models.encoders import _weights_file
            from recon3d.utils.checkpoint import mark_frozen

            weights = _weights_file(pretrained_path)
            if weights is not None:
                # a frozen pretrained part: checkpoints leave its ~300M weights out and re-read the file
                mark_frozen(self.backbone, weights)
        cfg = self.backbone.config
        self.patch_size, self.hidden = int(cfg.patch_size), int(cfg.hidden_size)
        self.num_registers = int(getattr(cfg, "num_register_tokens", 0) or 0)
        if not isinstance(image_size, int) or image_size < self.patch_size or image_size % self.patch_size:
            raise ConfigError(f"image_size: expected a multiple of the patch size {self.patch_size}, got {image_size!r}")
        self.image_size, self.preprocess = image_size, bool(preprocess)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> TrellisImageCondition:
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout / drop-path, whatever the trainer's mode
        return self

    @property
    def out_dim(self) -> int:
        return self.hidden

    @property
    def grid(self) -> int:
        """Patches per image side (37 at 518)."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image: 1 cls + registers + patches (1,374 for TRELLIS)."""
        return 1 + self.num_registers + self.grid**2

    def prepare(self, images: torch.Tensor, masks: torch.Tensor | None = None, background: Any = None) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] -> ``(N, 3, S, S)`` ImageNet-normalised network input."""
        if self.preprocess:
            x = trellis_preprocess(images, masks, background, self.image_size)
        else:
            x = F.interpolate(images.float(), size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean.to(x)) / self.std.to(x)

    def _prenorm(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.backbone(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[-1]  # the last block's output before the backbone's own (affine) LayerNorm

    @torch.no_grad()
    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None, background: Any = None) -> torch.Tensor:
        """``images (N, 3, H, W)`` (optional ``masks (N, 1, H, W)``, ``background``) -> condition
        tokens ``(N, 1 + R + G^2, hidden)``: non-affine LayerNorm of ``x_prenorm``."""
        x = self._prenorm(self.prepare(images, masks, background))
        return F.layer_norm(x, x.shape[-1:])

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor, masks: torch.Tensor | None = None, background: Any = None) -> torch.Tensor:
        """Pre-norm patch tokens on their grid ``(N, hidden, G, G)`` (TRELLIS's SLAT features)."""
        x = self._prenorm(self.prepare(images, masks, background))[:, 1 + self.num_registers :]
        G = self.grid
        return x.transpose(1, 2).reshape(x.shape[0], self.hidden, G, G)
