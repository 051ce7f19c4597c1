"""Image metrics: PSNR and SSIM, per image, optionally restricted to a mask.

Conventions (DESIGN.md): images are float in ``[0, 1]``, channels first. Every function here
accepts any number of leading batch dimensions (``*B C H W``, e.g. ``B V 3 H W``) and returns one
value per image (shape ``*B``). Masks are ``*B 1 H W`` with values in ``[0, 1]`` (soft masks act as
per-pixel weights); a masked number is the "object-only" variant used when the background is
constant and would otherwise inflate the score.

The :class:`PSNR` and :class:`SSIM` metrics average the **per-image** values (the convention of the
3D-reconstruction papers: PSNR of each rendered view, then the mean), not the PSNR of the pooled
MSE that ``torchmetrics.PeakSignalNoiseRatio`` reports.

SSIM follows Wang et al. 2004 and scikit-image's ``structural_similarity(gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=1)``: the SSIM map comes from torchmetrics'
functional SSIM (11x11 Gaussian, sigma 1.5, reflect padding) and is averaged over the interior
pixels only (a 5-pixel border is cropped). torchmetrics itself averages over the padded border
too, which differs from scikit-image by ~1e-3; the crop makes both agree to 1e-6.

SSIM's statistics are computed in float64 whatever the input dtype: the local variance is
``E[x^2] - E[x]^2``, and on a flat white background (x ~ 1) float32 cancels it to ~1e-7 absolute,
which against ``C2 = 9e-4`` moves the SSIM map by ~1e-4 per pixel and the image mean by up to
~9e-5 (enough to flip the 4th decimal of a results table). The value is returned in the input's
dtype (at least float32).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure as _tm_ssim

from recon3d.metrics.geometry import occupancy_iou
from recon3d.utils.checks import check_shape

__all__ = ["psnr", "ssim", "mask_iou", "PSNR", "SSIM"]

#: MSE floor: identical images give 10*log10(1/1e-12) = 120 dB instead of inf.
MSE_FLOOR = 1e-12


def _check_pair(pred: Tensor, target: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    dims: dict = {}
    check_shape(pred, "*B C H W", "pred", dims)
    check_shape(target, "*B C H W", "target", dims)
    if mask is not None:
        check_shape(mask, "*B 1 H W", "mask", dims)
    lead = pred.shape[:-3]
    pred = pred.reshape(-1, *pred.shape[-3:])
    target = target.reshape(-1, *target.shape[-3:]).to(pred.dtype)
    if mask is not None:
        mask = mask.reshape(-1, *mask.shape[-3:]).to(pred.dtype)
    return pred, target, mask, lead  # type: ignore[return-value]


def psnr(pred: Tensor, target: Tensor, mask: Tensor | None = None, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio of each image, in dB.

    Args:
        pred: ``(*B, C, H, W)`` rendered images in ``[0, data_range]``.
        target: ``(*B, C, H, W)`` reference images.
        mask: optional ``(*B, 1, H, W)`` weights; the MSE is taken over masked pixels only.
            An image whose mask is empty gives NaN.
        data_range: the value range of the images (1 for ``[0, 1]``).

    Returns:
        ``(*B,)`` PSNR per image. MSE is floored at 1e-12 (identical images give 120 dB).
    """
    pred, target, mask, lead = _check_pair(pred, target, mask)
    err = (pred - target).square()
    if mask is None:
        mse = err.flatten(1).mean(1)
    else:
        w = mask.expand_as(err)
        denom = w.flatten(1).sum(1)
        mse = (err * w).flatten(1).sum(1) / denom
        mse = torch.where(denom > 0, mse, torch.full_like(mse, float("nan")))
    out = 10.0 * torch.log10(data_range**2 / mse.clamp_min(MSE_FLOOR))
    return out.reshape(lead)


def ssim(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    data_range: float = 1.0,
    sigma: float = 1.5,
    kernel_size: int = 11,
) -> Tensor:
    """Structural similarity of each image (Gaussian window, scikit-image convention).

    Args:
        pred: ``(*B, C, H, W)`` images in ``[0, data_range]``; ``H, W > kernel_size``.
        target: ``(*B, C, H, W)`` reference images.
        mask: optional ``(*B, 1, H, W)`` weights; the SSIM map is averaged with these weights
            (over the interior, cropped region). An empty mask gives NaN.
        data_range: value range of the images.
        sigma: Gaussian window standard deviation.
        kernel_size: window size (odd); ``(kernel_size - 1) // 2`` border pixels are cropped.

    Returns:
        ``(*B,)`` SSIM per image, averaged over channels.
    """
    pred, target, mask, lead = _check_pair(pred, target, mask)
    pad = (kernel_size - 1) // 2
    if min(pred.shape[-2:]) <= 2 * pad:
        raise ValueError(f"pred: images of size {list(pred.shape[-2:])} are too small for a {kernel_size}x{kernel_size} SSIM window")
    out_dtype = torch.promote_types(pred.dtype, torch.float32)
    # float64 statistics: E[x^2] - E[x]^2 cancels catastrophically in float32 where x ~ 1 (see module doc).
    pred, target = pred.to(torch.float64), target.to(torch.float64)
    mask = None if mask is None else mask.to(torch.float64)
    _, full = _tm_ssim(
        pred,
        target,
        gaussian_kernel=True,
        sigma=sigma,
        kernel_size=kernel_size,
        data_range=data_range,
        reduction="none",
        return_full_image=True,
    )
    full = full[..., pad:-pad, pad:-pad] if pad > 0 else full
    if mask is None:
        out = full.flatten(1).mean(1)
    else:
        m = mask[..., pad:-pad, pad:-pad] if pad > 0 else mask
        w = m.expand_as(full)
        denom = w.flatten(1).sum(1)
        out = (full * w).flatten(1).sum(1) / denom
        out = torch.where(denom > 0, out, torch.full_like(out, float("nan")))
    return out.reshape(lead).to(out_dtype)


def mask_iou(pred_alpha: Tensor, target_mask: Tensor, threshold: float = 0.5) -> Tensor:
    """Silhouette IoU of each image: rendered opacity against the true mask, both binarised at ``threshold``.

    Args:
        pred_alpha: ``(*B, 1, H, W)`` rendered opacity (accumulated alpha) in ``[0, 1]``.
        target_mask: ``(*B, 1, H, W)`` ground-truth mask.

    Returns:
        ``(*B)`` intersection over union; 1 where both silhouettes are empty.
    """
    dims: dict = {}
    check_shape(pred_alpha, "*B 1 H W", "pred_alpha", dims)
    check_shape(target_mask, "*B 1 H W", "target_mask", dims)
    p = (pred_alpha > threshold).flatten(-3)
    t = (target_mask.to(pred_alpha.device) > threshold).flatten(-3)
    return occupancy_iou(p, t).to(torch.promote_types(pred_alpha.dtype, torch.float32))


class _MeanOfImages(Metric):
    """Mean of a per-image score over all images seen (NaN scores, i.e. empty masks, skipped)."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, data_range: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data_range = float(data_range)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _score(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def update(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Add images ``pred``, ``target`` of shape ``(*B, C, H, W)``, optional ``mask`` ``(*B, 1, H, W)``."""
        vals = self._score(pred, target, mask).reshape(-1).to(torch.float64)
        ok = torch.isfinite(vals)
        self.total += vals[ok].sum()
        self.count += ok.sum()

    def compute(self) -> Tensor:
        """Mean over all images (NaN if none were seen)."""
        return (self.total / self.count).float()


class PSNR(_MeanOfImages):
    """Mean per-image PSNR in dB (see :func:`psnr`). ``update(pred, target, mask=None)``.

    Shapes: ``pred``, ``target`` ``(*B, C, H, W)`` in ``[0, 1]``; ``mask`` ``(*B, 1, H, W)``.
    """

    higher_is_better = True

    def _score(self, pred, target, mask):
        return psnr(pred, target, mask, data_range=self.data_range)


class SSIM(_MeanOfImages):
    """Mean per-image SSIM (see :func:`ssim`). ``update(pred, target, mask=None)``.

    Shapes: ``pred``, ``target`` ``(*B, C, H, W)`` in ``[0, 1]``; ``mask`` ``(*B, 1, H, W)``.
    """

    higher_is_better = True

    def _score(self, pred, target, mask):
        return ssim(pred, target, mask, data_range=self.data_range)
