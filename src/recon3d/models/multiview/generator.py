"""The multi-view generator interface (MVBoost's ``G``): one image in, ``V`` posed views out.

A generator has a **fixed camera layout** (Era3D: six orthographic views at azimuths
0/45/90/180/270/315 relative to the input; recon3d's own :class:`~recon3d.models.multiview.diffusion.MultiViewDiffusion`:
``V`` perspective orbit views), expressed in recon3d's camera convention
(:mod:`recon3d.data.cameras`, OpenCV c2w, the input view's camera at azimuth 0). It offers

- :meth:`MultiViewGenerator.generate` ``(image) -> Views``: sample the views from pure noise
  (Algorithm 1, line 2);
- :meth:`MultiViewGenerator.refine` ``(views, image, strength) -> Views``: SDEdit the given views
  (renders of a reconstruction at the generator's cameras) at strength ``s`` with the same
  conditioning and guidance (eq. 4-5, Algorithm 1 lines 5-7; :mod:`.sdedit` for the schedule and
  the two ends ``s = 0`` / ``s = 1``).

Both return :class:`~recon3d.data.batch.Views` with ``images (B, V, 3, H, W)`` in ``[0, 1]``,
``cameras`` of batch shape ``(B, V)`` (:meth:`MultiViewGenerator.cameras`) and ``masks
(B, V, 1, H, W)`` where the generator produces them (None otherwise).

``generator`` arguments follow diffusers: None (global RNG), one ``torch.Generator`` for the
batch, or a list of ``B`` (one per object, so an object's sample does not depend on the batch it
is in).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from recon3d.data.batch import Views
from recon3d.data.cameras import Cameras
from recon3d.errors import ShapeError

__all__ = ["MultiViewGenerator", "Generators", "check_condition_image", "check_views_for", "randn_per_object"]

Generators = torch.Generator | list[torch.Generator] | None


class MultiViewGenerator(ABC):
    """Interface of a single-image-to-multi-view generator (module docstring).

    Implementations are usually also ``nn.Module`` s (``class G(nn.Module, MultiViewGenerator)``).
    """

    #: views per object the generator produces
    num_views: int
    #: square output resolution in pixels
    resolution: int

    @abstractmethod
    def cameras(self, batch_size: int = 1) -> Cameras:
        """The generator's fixed cameras, batch shape ``(batch_size, V)``, for ``resolution``² images."""

    @abstractmethod
    def generate(self, image: torch.Tensor, generator: Generators = None) -> Views:
        """Sample ``V`` views of each object from pure noise.

        Args:
            image: ``(B, 3, H, W)`` the input view, RGB in ``[0, 1]`` on the generator's background.
            generator: noise source(s) (module docstring).

        Returns:
            :class:`Views` with images ``(B, V, 3, R, R)``, :meth:`cameras` ``(B, V)``, masks or None.
        """

    @abstractmethod
    def refine(self, views: Views, image: torch.Tensor, strength: float, generator: Generators = None) -> Views:
        """SDEdit ``views`` at ``strength`` (eq. 4-5).

        Args:
            views: ``(B, V, 3, R, R)`` views at the generator's cameras (renders of a reconstruction).
            image: ``(B, 3, H, W)`` the input view that conditions the generator.
            strength: ``s`` in ``[0, 1]``; 0 returns ``views``' images (up to the VAE round trip),
                1 samples from pure noise; anything else outside ``[0, 1]`` is a ConfigError.
            generator: noise source(s).

        Returns:
            :class:`Views` like :meth:`generate`'s.
        """


def check_condition_image(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """``image`` checked as ``(B, 3, H, W)`` in ``[0, 1]``; one :class:`ShapeError` line otherwise."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
        got = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ShapeError(f"{name}: expected the input view as (B, 3, H, W) RGB in [0, 1], got {got}")
    if image.numel() and (not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1):
        raise ShapeError(f"{name}: expected RGB values in [0, 1], got range [{float(image.min()):.3g}, {float(image.max()):.3g}]")
    return image


def check_views_for(gen: MultiViewGenerator, views: Views, batch_size: int, name: str = "views") -> torch.Tensor:
    """``views.images`` checked against ``gen``'s layout: ``(B, V, 3, R, R)`` in ``[0, 1]``."""
    x = views.images
    want = [batch_size, gen.num_views, 3, gen.resolution, gen.resolution]
    if x.ndim != 5 or list(x.shape) != want:
        raise ShapeError(f"{name}.images: expected {want} (B, the generator's {gen.num_views} views, RGB, "
                         f"{gen.resolution}x{gen.resolution}), got {list(x.shape)}")
    if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
        raise ShapeError(f"{name}.images: expected values in [0, 1], got range [{float(x.min()):.3g}, {float(x.max()):.3g}]")
    return x


def randn_per_object(shape: tuple[int, ...], generator: Generators, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise of ``shape`` ``(B, ...)``; with a list of ``B`` generators, object
    ``b``'s noise comes from ``generator[b]`` alone. Noise is drawn on each generator's own device
    (the CPU without one), so a CPU generator gives the same noise whatever ``device`` is."""
    draw = lambda s, g: torch.randn(s, generator=g, dtype=dtype, device=g.device if g is not None else "cpu")  # noqa: E731
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ShapeError(f"generator: expected one generator per object ({shape[0]}), got {len(generator)}")
        out = torch.stack([draw(shape[1:], g) for g in generator])
    else:
        out = draw(shape, generator)
    return out.to(device)
