"""Cameras validate user input once, not on every internal derivation (issue 14 item 8)."""

from __future__ import annotations

import pytest
import torch

from recon3d.data import Cameras, orbit_cameras
from recon3d.errors import ShapeError


@pytest.fixture
def cams():
    return orbit_cameras(torch.tensor([0.0, 90.0, 180.0, 270.0]), torch.full((4,), 20.0), 2.5, 40.0, 16, 16).reshape(2, 2)


def test_internal_derivations_skip_the_validator(cams, monkeypatch):
    def boom(self):
        raise AssertionError("validator called on an internal derivation")

    monkeypatch.setattr(Cameras, "_validate", boom)
    derived = [
        cams[0:1], cams[1], cams[:, 0], cams.to(torch.float64), cams.reshape(4), cams.flatten(),
        Cameras.stack([cams, cams]), Cameras.cat([cams, cams], 1), cams.resized(8, 8), cams.cropped(2, 2, 10, 10),
    ]
    # Each derivation holds the expected tensors (not a silently empty shell).
    assert torch.equal(derived[0].c2w, cams.c2w[0:1]) and torch.equal(derived[2].K, cams.K[:, 0])
    assert derived[3].c2w.dtype == torch.float64
    assert derived[6].batch_shape == (2, 2, 2) and derived[7].batch_shape == (2, 4)
    assert (derived[8].width, derived[9].height) == (8, 10)
    # While user construction still goes through it.
    with pytest.raises(AssertionError, match="validator"):
        Cameras(cams.c2w, cams.K, 16, 16)


def test_user_construction_rejects_a_non_rotation(cams):
    c2w = cams.c2w.clone()
    c2w[0, 1, :3, :3] *= 1.5  # scaled: not orthonormal
    with pytest.raises(ShapeError, match="rotation"):
        Cameras(c2w, cams.K, 16, 16)
    with pytest.raises(ShapeError, match="rotation"):
        Cameras.from_w2c(torch.linalg.inv(c2w), cams.K, 16, 16)
    reflect = cams.c2w.clone()
    reflect[..., :3, 0] *= -1  # det -1
    with pytest.raises(ShapeError, match="det"):
        Cameras(reflect, cams.K, 16, 16)


def test_cheap_checks_of_derivations_remain(cams):
    with pytest.raises(ShapeError, match="image size"):
        cams.resized(0, 8)
    with pytest.raises(ShapeError, match="one image size"):
        Cameras.stack([cams, cams.resized(8, 8)])
    with pytest.raises(ShapeError, match="batch dimensions"):
        cams[0, 0, 1]  # would index into the matrices
