"""Moved to :mod:`recon3d.models.refiners.texture`; this name stays for configs that use
``class_path: recon3d.models.texture_refiner.TextureRefiner``."""

from recon3d.models.refiners.texture import RefinementResult, TextureRefiner

__all__ = ["TextureRefiner", "RefinementResult"]
