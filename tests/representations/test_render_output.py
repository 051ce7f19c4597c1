"""RenderOutput: one name per quantity, mapping access, concatenation, shape checks."""

from __future__ import annotations

import pytest
import torch

from recon3d.errors import ShapeError
from recon3d.representations import RenderOutput


def _out(B=1, W=4, N=3):
    return RenderOutput(torch.rand(B, 2, 3, 5, W), torch.rand(B, 2, 1, 5, W), extras={"means2d": torch.rand(B * 2, N, 2)})


def test_mapping_access_uses_the_one_names():
    o = _out()
    assert o.keys() == ["rgb", "alpha", "means2d"] and "depth" not in o and o.get("depth") is None
    assert o["alpha"] is o.alpha and o["means2d"] is o.extras["means2d"]
    with pytest.raises(KeyError, match="opacity"):
        o["opacity"]
    assert RenderOutput.from_dict({"rgb": o.rgb, "alpha": o.alpha, "x": 1}).extras == {"x": 1}


def test_cat_along_objects():
    a, b = _out(N=3), _out(N=3)
    c = RenderOutput.cat([a, b])
    assert torch.equal(c.rgb, torch.cat([a.rgb, b.rgb])) and c.depth is None
    assert torch.equal(c.extras["means2d"], torch.cat([a.extras["means2d"], b.extras["means2d"]]))
    ragged = RenderOutput.cat([a, _out(N=5)])
    assert isinstance(ragged.extras["means2d"], list) and [m.shape[1] for m in ragged.extras["means2d"]] == [3, 5]


def test_shape_checks_name_the_quantity():
    with pytest.raises(ShapeError, match="alpha"):
        RenderOutput(torch.rand(1, 2, 3, 5, 4), torch.rand(1, 2, 1, 5, 5))
    with pytest.raises(ShapeError, match="rgb"):
        RenderOutput(torch.rand(2, 3, 5, 4))
    with pytest.raises(ShapeError, match="extras"):
        RenderOutput(torch.rand(1, 1, 3, 2, 2), extras={"alpha": 1})
