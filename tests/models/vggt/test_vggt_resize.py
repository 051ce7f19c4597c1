"""VGGTNetwork(resize=True): sizes that are not multiples of the patch size are resized to the
nearest valid size with one warning per input size; valid sizes pass through untouched."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from recon3d.errors import ConfigError, ShapeError
from recon3d.models.vggt import VGGTNetwork
from recon3d.models.vggt.aggregator import resize_to_patch_multiple, valid_size


def _net(**kw):
    torch.manual_seed(0)
    return VGGTNetwork("tiny", heads=("camera", "depth"), **kw).eval()


def test_valid_size_rounds_each_side_to_the_nearest_positive_multiple():
    assert valid_size(30, 40, 14) == (28, 42)
    assert valid_size(21, 20, 14) == (28, 14)  # 1.5 rounds to even (2), 1.43 to 1
    assert valid_size(3, 5, 14) == (14, 14)  # never 0
    assert valid_size(518, 392, 14) == (518, 392)


def test_resize_warns_once_per_size_and_matches_a_manual_resize():
    net, ref = _net(resize=True), _net()
    x = torch.rand(1, 2, 3, 30, 40, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match=r"images: 30x40 is not a multiple of the patch size 14; resized to 28x42") as rec:
        out = net(x)
    assert len([w for w in rec if "patch size" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same size again: no second warning
        out2 = net(x)
    manual = F.interpolate(x[0], size=(28, 42), mode="bilinear", align_corners=False, antialias=True)[None]
    want = ref(manual)
    assert out["image_size"] == (28, 42) and out["depth"].shape == (1, 2, 28, 42, 1)
    assert torch.equal(out["pose_enc"], want["pose_enc"]) and torch.equal(out["depth"], want["depth"])
    assert torch.equal(out2["depth"], out["depth"])
    with pytest.warns(UserWarning, match=r"33x33 .* resized to 28x28"):  # a new size warns again
        net(torch.rand(1, 2, 3, 33, 33))


def test_valid_sizes_pass_through_and_values_stay_in_range():
    net, ref = _net(resize=True), _net()
    x = torch.rand(1, 2, 3, 28, 42)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = net(x)
    assert resize_to_patch_multiple(x, 14) is x
    assert torch.equal(out["depth"], ref(x)["depth"]) and "image_size" not in ref(x)
    y = resize_to_patch_multiple(torch.rand(2, 3, 3, 45, 17), 14)
    assert y.shape == (2, 3, 3, 42, 14) and y.min() >= 0 and y.max() <= 1


def test_without_resize_the_error_names_the_option_and_bad_values_are_refused():
    with pytest.raises(ShapeError, match=r"30x40 \(nearest valid size 28x42; .*resize=True"):
        _net()(torch.rand(1, 2, 3, 30, 40))
    with pytest.raises(ShapeError, match=r"images: expected a \[B, S, 3, H, W\]"):
        _net(resize=True)(torch.rand(2, 3, 30, 40))
    with pytest.raises(ConfigError, match="resize: expected True or False"):
        VGGTNetwork("tiny", resize="yes")
