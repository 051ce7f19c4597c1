"""Test-time refiners (:class:`Refiner`) and the context they optimise in."""

from recon3d.models.refiners.base import Refiner, test_time_optimization, trainable_copy
from recon3d.models.refiners.input_view import InputViewRefiner
from recon3d.models.refiners.texture import RefinementResult, TextureRefiner

__all__ = ["Refiner", "TextureRefiner", "RefinementResult", "InputViewRefiner", "test_time_optimization", "trainable_copy"]
