"""Per-view image losses of ReconViaGen's rendering-aware velocity compensation (paper §4.2.3.2).

:class:`RenderingLoss` maps renders and input views ``(N, 3, H, W)`` in ``[0, 1]`` to one loss
per view ``(N,)``, the quantity the paper thresholds at 0.8 to drop views whose estimated camera
is probably wrong.

* ``terms="paper"``: ``(1 - SSIM) + LPIPS + DreamSim`` (the paper's L_RVC lists the three
  similarity terms; SSIM enters as the dissimilarity ``1 - SSIM``).
* ``terms="official"``: ``L1 + (1 - SSIM) + LPIPS + DreamSim`` (ReconViaGen's
  ``sample_slat_once_opt_delta_v``: per-view mean L1, ``1 - ssim``, LPIPS-VGG mean, DreamSim).

Pretrained parts are never downloaded:

* **LPIPS** is :class:`recon3d.metrics.lpips.LPIPSNet` (VGG by default, as TRELLIS's
  ``loss_utils.lpips``) with weights from ``lpips_weights_dir`` / ``$RECON3D_LPIPS_DIR`` / the
  torch hub cache. When they are absent the term is left out and **one** warning says so (per
  loss object); ``require=("lpips",)`` turns that into the error instead.
* **DreamSim** (Fu et al. 2023; the official code uses its ``dino_vitb16`` model) is
  :class:`DreamSimDistance`: ``1 - cos(e(x), e(y))`` of backbone embeddings. ``dreamsim`` is a
  local folder holding a Hugging Face vision transformer (``config.json`` + weights, loaded with
  ``transformers.AutoModel``; the embedding is the last layer's CLS token after the model's final
  norm, inputs resized to ``dreamsim_size`` and ImageNet-normalised), or any callable
  ``(pred, target) -> (N,)``. Without it the term is left out with one warning. A plain DINO
  ViT-B/16 folder gives DreamSim's backbone *without* its fine-tuned LoRA (the ``dreamsim``
  package's weights must be merged into the backbone first to be DreamSim proper); the package
  itself is not a dependency (not installed here).

``weights`` rescales the terms (all 1 by default, as both the paper and the code sum them); a
weight of 0 leaves the term out (nothing is loaded for it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from recon3d.errors import CheckpointError, ConfigError, ShapeError
from recon3d.metrics.image import ssim
from recon3d.metrics.lpips import BACKBONE_FILES, HEAD_FILES, LPIPSNet, LPIPSWeightsNotFoundError

__all__ = ["RenderingLoss", "DreamSimDistance", "TERMS"]

log = logging.getLogger(__name__)

#: The loss terms of each preset (module docstring).
TERMS = {"paper": ("ssim", "lpips", "dreamsim"), "official": ("l1", "ssim", "lpips", "dreamsim")}

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class DreamSimDistance(nn.Module):
    """``1 - cos(e(x), e(y))`` per image pair, ``e`` a frozen vision transformer's CLS embedding.

    Args:
        path: local folder with a Hugging Face ViT-like model (``config.json`` + weights).
        size: square input size of the backbone (DreamSim / DINO ViT-B/16: 224).

    ``forward(pred (N, 3, H, W), target (N, 3, H, W))`` in ``[0, 1]`` -> ``(N,)``, differentiable
    in both inputs; the parameters are frozen.
    """

    def __init__(self, path: str | os.PathLike, size: int = 224):
        super().__init__()
        p = Path(path).expanduser()
        if not (p / "config.json").is_file():
            raise CheckpointError(f"dreamsim: {p} holds no config.json; expected a local Hugging Face vision-transformer folder "
                                  "(e.g. a DINO ViT-B/16 with DreamSim's LoRA merged)")
        from transformers import AutoModel  # slow import: only when a backbone is given

        try:
            self.backbone = AutoModel.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"dreamsim: cannot load the backbone from {p}: {err}") from None
        self.backbone.eval()
        for q in self.backbone.parameters():
            q.requires_grad_(False)
        self.size = int(size)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> DreamSimDistance:  # frozen: always eval
        return super().train(False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in ``[0, 1]`` -> ``(N, D)`` CLS embeddings."""
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean.to(x)) / self.std.to(x)
        dtype = next(self.backbone.parameters()).dtype
        return self.backbone(pixel_values=x.to(dtype)).last_hidden_state[:, 0].to(x.dtype)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n = pred.shape[0]
        e = self.embed(torch.cat([pred, target.to(pred)], 0))
        return 1 - F.cosine_similarity(e[:n], e[n:], dim=-1)


class RenderingLoss:
    """Per-view RVC loss ``(N,)`` (module docstring).

    Args:
        terms: ``"paper"`` ((1 - SSIM) + LPIPS + DreamSim) or ``"official"`` (+ L1).
        weights: factor per term name (``l1``, ``ssim``, ``lpips``, ``dreamsim``), default 1.
        lpips_net: LPIPS backbone, ``"vgg"`` (TRELLIS's) or ``"alex"``.
        lpips_weights_dir: folder with the LPIPS files (:mod:`recon3d.metrics.lpips`).
        dreamsim: a local backbone folder (:class:`DreamSimDistance`), a callable
            ``(pred, target) -> (N,)``, or None (term left out, one warning).
        dreamsim_size: input size of a folder backbone.
        require: term names that must be available (their absence raises instead of warning).
    """

    def __init__(self, terms: str = "paper", weights: Mapping[str, float] | None = None, lpips_net: str = "vgg",
                 lpips_weights_dir: str | os.PathLike | None = None,
                 dreamsim: str | os.PathLike | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 dreamsim_size: int = 224, require: Sequence[str] = ()):
        if terms not in TERMS:
            raise ConfigError(f"terms: expected one of {sorted(TERMS)}, got {terms!r}")
        self.terms = TERMS[terms]
        self.preset = terms
        w = dict(weights or {})
        bad = [k for k in w if k not in TERMS["official"]]
        if bad:
            raise ConfigError(f"weights: unknown term(s) {bad}; expected names from {list(TERMS['official'])}")
        # A term weighted 0 is left out entirely (nothing loaded, no warning).
        self.terms = tuple(k for k in self.terms if float(w.get(k, 1.0)) != 0.0)
        self.weights = {k: float(w.get(k, 1.0)) for k in self.terms}
        bad = [k for k in require if k not in ("lpips", "dreamsim")]
        if bad:
            raise ConfigError(f"require: expected 'lpips' and/or 'dreamsim', got {list(require)}")
        self.require = tuple(require)
        self.lpips_net, self.lpips_weights_dir = lpips_net, lpips_weights_dir
        self._dreamsim_source, self.dreamsim_size = dreamsim, int(dreamsim_size)
        self._lpips: LPIPSNet | None = None
        self._dreamsim: Callable | None = None
        self._resolved = False
        self.missing: list[str] = []  # terms left out (no weights), after resolve()

    def resolve(self) -> tuple[str, ...]:
        """Load the pretrained parts once; return the terms in use. Absent weights drop the term
        with one warning (or raise for terms in ``require``)."""
        if self._resolved:
            return self.active
        if "lpips" in self.terms:
            try:
                self._lpips = LPIPSNet(self.lpips_net, pretrained=True, weights_dir=self.lpips_weights_dir)
            except LPIPSWeightsNotFoundError as err:
                if "lpips" in self.require:
                    raise LPIPSWeightsNotFoundError(f"RenderingLoss (require lpips): {err}") from None
                self.missing.append("lpips")
                log.warning("RenderingLoss: no LPIPS-%s weights found, so the RVC loss runs without its LPIPS term. To use it put %s "
                            "(torchvision) and %s (lpips v0.1 heads) in $TORCH_HOME/hub/checkpoints, $RECON3D_LPIPS_DIR or "
                            "lpips_weights_dir.", self.lpips_net, BACKBONE_FILES[self.lpips_net], HEAD_FILES[self.lpips_net])
        if "dreamsim" in self.terms:
            src = self._dreamsim_source
            if callable(src):
                self._dreamsim = src
            elif src is not None:
                self._dreamsim = DreamSimDistance(src, self.dreamsim_size)
            elif "dreamsim" in self.require:
                raise CheckpointError("RenderingLoss (require dreamsim): no DreamSim backbone given; set dreamsim to a local "
                                      "Hugging Face ViT folder or a callable")
            else:
                self.missing.append("dreamsim")
                log.warning("RenderingLoss: no DreamSim backbone given (dreamsim: a local Hugging Face ViT folder, e.g. DINO ViT-B/16 "
                            "with DreamSim's LoRA merged), so the RVC loss runs without its DreamSim term.")
        self._resolved = True
        return self.active

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(k for k in self.terms if k not in self.missing)

    @property
    def name(self) -> str:
        """E.g. ``"paper: ssim + lpips"`` (the terms actually used)."""
        return f"{self.preset}: {' + '.join(self.resolve())}"

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-view loss ``(N,)`` of ``pred`` against ``target``, both ``(N, 3, H, W)`` in [0, 1]."""
        if pred.ndim != 4 or pred.shape[1] != 3 or tuple(target.shape) != tuple(pred.shape):
            raise ShapeError(f"RenderingLoss: expected pred and target of one shape (N, 3, H, W), got {list(pred.shape)} and {list(target.shape)}")
        active = self.resolve()
        target = target.to(pred)
        total = pred.new_zeros(pred.shape[0])
        for k in active:
            if k == "l1":
                term = (pred - target).abs().flatten(1).mean(1)
            elif k == "ssim":
                term = (1 - ssim(pred, target)).to(pred.dtype)
            elif k == "lpips":
                term = self._lpips.to(pred.device)(pred, target)
            else:
                d = self._dreamsim
                term = (d.to(pred.device) if isinstance(d, nn.Module) else d)(pred, target).to(pred.dtype)
            total = total + self.weights[k] * term
        return total
