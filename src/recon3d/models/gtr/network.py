"""GTR's whole network: image encoder -> triplane generator -> triplane field."""

from __future__ import annotations

import torch
import torch.nn as nn

from recon3d.data.batch import Views
from recon3d.data.cameras import Cameras
from recon3d.errors import ConfigError
from recon3d.models.encoders import ConvPatchEncoder, ImageEncoder
from recon3d.models.gtr.field import TriplaneField
from recon3d.models.gtr.generator import TriplaneGenerator
from recon3d.utils.checks import check_shape

__all__ = ["GTRNetwork", "gtr_official", "gtr_paper", "gtr_tiny"]


class GTRNetwork(nn.Module):
    """Encoder + :class:`TriplaneGenerator` + :class:`TriplaneField` (no renderer, no losses).

    ``triplanes(images, masks, cameras)`` gives ``(B, 3, C, R, R)``; ``field(planes, points)``
    gives density and colour at world points; a renderer (volume or mesh) consumes both.

    If the encoder's token width differs from the generator's width, a ``Linear`` projection
    (``token_proj``) bridges them, so swapping the encoder (e.g. DINOv2 with 768-wide tokens) is
    one line of config. The field's ``plane_channels`` must equal the generator's.

    Args:
        encoder: any :class:`~recon3d.models.encoders.ImageEncoder`.
        generator: the triplane transformer.
        field: the density/colour MLPs.
    """

    def __init__(self, encoder: ImageEncoder, generator: TriplaneGenerator, field: TriplaneField):
        super().__init__()
        if not isinstance(encoder, ImageEncoder):
            raise ConfigError(f"encoder: expected an ImageEncoder, got {type(encoder).__name__}")
        if generator.plane_channels != field.plane_channels:
            raise ConfigError(
                f"field.plane_channels={field.plane_channels} must equal generator.plane_channels={generator.plane_channels}"
            )
        if generator.needs_cameras and generator.lift_aabb != field.aabb:
            raise ConfigError(f"generator.lift_aabb={generator.lift_aabb} must equal field.aabb={field.aabb}")
        self.encoder, self.generator, self.field = encoder, generator, field
        self.token_proj = nn.Linear(encoder.out_dim, generator.width) if encoder.out_dim != generator.width else nn.Identity()

    def triplanes(self, images: torch.Tensor, masks: torch.Tensor | None, cameras: Cameras) -> torch.Tensor:
        """Triplanes from posed input views.

        Args:
            images: ``(B, V, 3, H, W)`` rgb (or ``(B, V, 4, H, W)`` rgb+mask) in ``[0, 1]``.
            masks: ``(B, V, 1, H, W)`` foreground masks, or None (then the 4th image channel, or ones).
            cameras: input cameras, batch ``(B, V)``, size ``W x H``.

        Returns:
            ``(B, 3, C, R, R)`` triplane (planes xy, xz, yz).
        """
        dims = check_shape(images, "B V C H W", "images")
        if masks is not None:
            check_shape(masks, "B V 1 H W", "masks", {k: dims[k] for k in ("B", "V", "H", "W")})
            images = torch.cat([images[:, :, :3], masks.to(images.dtype)], 2)
        tokens = self.encoder(images, cameras)
        if not self.generator.needs_cameras:
            return self.generator(self.token_proj(tokens))
        rgba = images if images.shape[2] == 4 else torch.cat([images[:, :, :3], torch.ones_like(images[:, :, :1])], 2)
        return self.generator(self.token_proj(tokens), cameras, rgba)

    def forward(
        self, images: torch.Tensor, cameras: Cameras, points: torch.Tensor, masks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Triplanes, then the field at ``points (B, N, 3)``: ``{"planes", "density" (B, N), "rgb" (B, N, 3)}``."""
        planes = self.triplanes(images, masks, cameras)
        views = None
        if self.field.needs_views:  # a pixel-aligned field reads the input views too
            alpha = images[:, :, 3:4] if images.shape[2] == 4 else None
            views = Views(images[:, :, :3], cameras, masks if masks is not None else alpha)
        return {"planes": planes, **self.field(planes, points, views)}


def gtr_official(gradient_checkpointing: bool = False) -> GTRNetwork:
    """The released GTR checkpoint's architecture (``configs/config_texrefine.yaml``).

    Conv encoder 10 -> 1024 (patch 16), 24 blocks of 16 x 64 heads, ``r = 32``, pixel shuffle ×8
    to ``3 x 40 x 256^2``, field MLPs of hidden size 32 (3 and 4 layers).
    """
    return GTRNetwork(
        ConvPatchEncoder(width=1024, patch_size=16, moment="dxo", use_mask=True),
        TriplaneGenerator(width=1024, num_layers=24, num_heads=16, head_dim=64, plane_resolution=32, plane_channels=40,
                          upsample_factor=8, gradient_checkpointing=gradient_checkpointing),
        TriplaneField(plane_channels=40, hidden_dim=32, density_layers=3, color_layers=4),
    )


def gtr_paper(gradient_checkpointing: bool = False) -> GTRNetwork:
    """The paper's architecture (§4.1): as :func:`gtr_official` but field MLPs of hidden size 512."""
    net = gtr_official(gradient_checkpointing)
    net.field = TriplaneField(plane_channels=40, hidden_dim=512, density_layers=3, color_layers=4)
    return net


def gtr_tiny(gradient_checkpointing: bool = False) -> GTRNetwork:
    """A CPU smoke-test size: width 64, 2 blocks, patch 8, triplane ``3 x 8 x 16^2`` (r=4, ×4)."""
    return GTRNetwork(
        ConvPatchEncoder(width=64, patch_size=8),
        TriplaneGenerator(width=64, num_layers=2, num_heads=4, head_dim=16, plane_resolution=4, plane_channels=8,
                          upsample_factor=4, gradient_checkpointing=gradient_checkpointing),
        TriplaneField(plane_channels=8, hidden_dim=32, density_layers=3, color_layers=4),
    )
