"""Test-time optimisation: one context to optimise inside ``predict``, one ``Refiner`` interface.

Several methods optimise something per asset after the feed-forward pass: GTR refines the
texture of each mesh on its input views (§3.3), MVBoost optimises the reconstruction on the
input view, ReconViaGen corrects the flow's velocity with rendering losses. All of them run
inside Lightning's predict/test loops, which execute under ``torch.inference_mode()``: autograd
is off there, and tensors created there are *inference tensors* that cannot be saved for
backward even after autograd is re-enabled. :func:`test_time_optimization` is the one way out
(leave inference mode, enable grad), and :func:`trainable_copy` turns an inference tensor into an
ordinary one. A :class:`Refiner` maps a :class:`~recon3d.representations.Reconstruction` and the
input views to a new reconstruction; the method's predict step applies its refiners in order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from recon3d.data.batch import Views
from recon3d.representations.reconstruction import Reconstruction

__all__ = ["Refiner", "test_time_optimization", "trainable_copy"]


@contextmanager
def test_time_optimization() -> Iterator[None]:
    """Autograd on, inference mode off, for the duration of the block (also under Lightning's
    ``inference_mode`` predict loop). Everything the block optimises must be created inside it or
    copied in with :func:`trainable_copy`."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def trainable_copy(x: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
    """An ordinary (non-inference, detached) copy of ``x``; call inside
    :func:`test_time_optimization`. ``requires_grad=True`` makes it a leaf to optimise."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("trainable_copy: call it inside test_time_optimization() (inference mode is on)")
    return x.detach().clone().requires_grad_(requires_grad)


test_time_optimization.__test__ = False  # not a pytest test, despite the name


class Refiner(ABC):
    """Per-asset test-time refinement: ``refine(reconstruction, views) -> reconstruction``.

    ``reconstruction`` holds one or more objects; ``views`` are their posed input views, batch
    ``(B, V)`` in the reconstruction's object order. The result is a new reconstruction (the
    input is not modified); a refiner may add by-products to ``extras`` (e.g. a loss history
    under ``"<name>_history"``). Implementations wrap their optimisation in
    :func:`test_time_optimization`.
    """

    #: name of the refined variant in exported file names (``mesh_<name>.glb``).
    name: str = "refined"

    @abstractmethod
    def refine(self, reconstruction: Reconstruction, views: Views) -> Reconstruction:
        raise NotImplementedError

    def summary(self, refined: Reconstruction) -> dict[str, str]:
        """Entries for the export's file list (e.g. ``{"refine_psnr": "21.3->25.0"}``) from a
        reconstruction :meth:`refine` returned; none by default."""
        return {}
