"""Cross-view self-attention on diffusers' attention-processor API.

A diffusers ``UNet2DConditionModel`` denoises a batch of images independently: its ResNet blocks
and GroupNorms act per image, and each transformer block's self-attention (``attn1``) attends
within one image. Run on the ``B * V`` views of ``B`` objects stacked along the batch (object
major: rows ``b * V ... b * V + V - 1`` are object ``b``'s views), the only place views can
exchange information is attention. :class:`MultiViewAttnProcessor` replaces the processor of
every ``attn1``: it regroups the ``(B * V, N, C)`` tokens as ``(B, V * N, C)``, so each token
attends over all ``V`` views' tokens of its own object (MVDream-style dense 3D attention; Era3D
uses a cheaper row-wise variant that only pairs image rows, valid for its elevation-0
orthographic views), then splits them back. It reuses the block's own ``to_q/to_k/to_v/to_out``
weights, so a pretrained single-view UNet starts from its single-image behaviour (with ``V = 1``
the processor is exactly the default one). Objects never mix: the regrouping is per object.

Cross-attention (``attn2``, to the condition tokens) keeps diffusers' default processor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recon3d.errors import ShapeError

__all__ = ["MultiViewAttnProcessor", "set_multiview_attention"]


class MultiViewAttnProcessor:
    """Self-attention over the tokens of all ``num_views`` views of each object (module docstring).

    Args:
        num_views: ``V``, views per object; the batch the block sees must be a multiple of it.
    """

    def __init__(self, num_views: int):
        if int(num_views) < 1:
            raise ShapeError(f"num_views: expected >= 1, got {num_views}")
        self.num_views = int(num_views)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``hidden_states (B * V, N, C)`` (or ``(B * V, C, h, w)``) -> the same shape."""
        if encoder_hidden_states is not None:
            raise ShapeError("MultiViewAttnProcessor: expected self-attention (attn1); got encoder_hidden_states "
                             "(use it on self-attention layers only, see set_multiview_attention)")
        if attention_mask is not None:
            raise ShapeError("MultiViewAttnProcessor: attention masks are not supported across views")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            bv, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(bv, c, h * w).transpose(1, 2)
        bv, n, c = hidden_states.shape
        V = self.num_views
        if bv % V:
            raise ShapeError(f"MultiViewAttnProcessor: batch of {bv} images is not a whole number of objects of {V} views")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        # (B*V, N, C) -> (B, V*N, C): object b's views are consecutive rows (object-major stacking).
        x = hidden_states.reshape(bv // V, V * n, c)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        heads = attn.heads
        d = k.shape[-1] // heads
        q, k, v = (t.view(t.shape[0], -1, heads, d).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(bv // V, V * n, heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.reshape(bv, n, -1)
        if four_d:
            out = out.transpose(-1, -2).reshape(bv, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def set_multiview_attention(unet, num_views: int) -> int:
    """Give every self-attention (``*.attn1``) of ``unet`` a :class:`MultiViewAttnProcessor`.

    Args:
        unet: a diffusers model with ``attn_processors`` / ``set_attn_processor`` (``UNet2DConditionModel``).
        num_views: ``V``.

    Returns:
        How many layers now attend across views (0 means the UNet has no transformer blocks: a
        ShapeError, since its views could never see each other).
    """
    procs = dict(unet.attn_processors)
    names = [k for k in procs if k.endswith("attn1.processor")]
    if not names:
        raise ShapeError("set_multiview_attention: the UNet has no self-attention layer (attn1); give it a "
                         "CrossAttn block, or its views are denoised independently")
    shared = MultiViewAttnProcessor(num_views)
    procs.update({k: shared for k in names})
    unet.set_attn_processor(procs)
    return len(names)
