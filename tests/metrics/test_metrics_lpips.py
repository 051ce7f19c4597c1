"""LPIPS: torchvision-layout trunks vs a direct functional recomputation, weight lookup, properties."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from recon3d.metrics import (
    LPIPS,
    AlexNetFeatures,
    EvaluationProtocol,
    LPIPSLoss,
    LPIPSNet,
    LPIPSWeightsNotFoundError,
    VGG16Features,
)
from recon3d.metrics.lpips import BACKBONE_FILES


def _tv_state(trunk_cls, seed=0):
    """A random state dict in torchvision's layout, classifier keys included (they must be ignored)."""
    torch.manual_seed(seed)
    sd = {k: v.clone() for k, v in trunk_cls().state_dict().items()}
    sd["classifier.1.weight"] = torch.randn(8, 4)
    return sd


def _functional_alex(sd, x):
    outs = []
    x = F.relu(F.conv2d(x, sd["features.0.weight"], sd["features.0.bias"], stride=4, padding=2))
    outs.append(x)
    x = F.max_pool2d(x, 3, 2)
    x = F.relu(F.conv2d(x, sd["features.3.weight"], sd["features.3.bias"], padding=2))
    outs.append(x)
    x = F.max_pool2d(x, 3, 2)
    for i in (6, 8, 10):
        x = F.relu(F.conv2d(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1))
        outs.append(x)
    return outs


def _functional_vgg(sd, x):
    outs, blocks = [], [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]
    for b, convs in enumerate(blocks):
        if b:
            x = F.max_pool2d(x, 2, 2)
        for i in convs:
            x = F.relu(F.conv2d(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1))
        outs.append(x)
    return outs


@pytest.mark.parametrize("net,cls,ref", [("alex", AlexNetFeatures, _functional_alex), ("vgg", VGG16Features, _functional_vgg)])
def test_trunk_matches_functional_recomputation(tmp_path, net, cls, ref):
    sd = _tv_state(cls)
    torch.save(sd, tmp_path / BACKBONE_FILES[net])
    lp = LPIPSNet(net, pretrained=True, weights_dir=tmp_path)  # heads come from torchmetrics' bundled copy
    x = torch.rand(2, 3, 64, 64)
    ours = lp.features(x)
    xs = (x * 2 - 1 - torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)) / torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    theirs = ref(sd, xs)
    assert len(ours) == 5
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the distance itself, recomputed by hand from the heads
    y = torch.rand(2, 3, 64, 64)
    fy = ref(sd, (y * 2 - 1 - lp.shift) / lp.scale)
    d = 0
    for k, (a, b) in enumerate(zip(theirs, fy)):
        a = a / (a.square().sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.square().sum(1, keepdim=True).sqrt() + 1e-10)
        w = lp.lins[k].model[1].weight
        d = d + F.conv2d((a - b) ** 2, w).mean((1, 2, 3))
    torch.testing.assert_close(lp(x, y), d, rtol=1e-5, atol=1e-6)


def test_missing_weights_refuse_with_file_names(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("RECON3D_LPIPS_DIR", raising=False)
    with pytest.raises(LPIPSWeightsNotFoundError, match="vgg16-397923af.pth") as e:
        LPIPS("vgg", weights_dir=tmp_path / "none")
    assert "hub/checkpoints" in str(e.value) and "pretrained=False" in str(e.value)
    with pytest.raises(LPIPSWeightsNotFoundError, match="alexnet-owt-7be5be79.pth"):
        LPIPSLoss("alex")
    with pytest.warns(UserWarning, match="vgg16-397923af.pth"):
        proto = EvaluationProtocol(image_metrics=("psnr", "lpips"), lpips_weights_dir=tmp_path)
    assert proto.image_metrics == ("psnr",)
    x = torch.rand(1, 2, 3, 16, 16)
    proto.update_views(["a"], x, x)
    assert "lpips" not in proto.compute()
    # explicit opt-in to random weights works
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = LPIPS("alex", allow_random=True)
    assert not m.pretrained


def _blur(x, k):
    if k == 0:
        return x
    w = torch.ones(3, 1, 2 * k + 1, 2 * k + 1) / (2 * k + 1) ** 2
    return F.conv2d(F.pad(x, (k, k, k, k), mode="replicate"), w, groups=3)


def test_properties_zero_symmetric_monotone():
    torch.manual_seed(0)
    m = LPIPSNet("alex", pretrained=False)
    g = torch.Generator().manual_seed(1)
    x = F.interpolate(torch.rand(2, 3, 16, 16, generator=g), size=64, mode="bilinear")
    y = torch.rand(2, 3, 64, 64, generator=g)
    assert torch.allclose(m(x, x), torch.zeros(2), atol=1e-7)
    torch.testing.assert_close(m(x, y), m(y, x))
    d = torch.stack([m(x, _blur(x, k)) for k in (0, 1, 2, 4, 8)])  # (5, 2)
    assert (d[1:] > d[:-1]).all(), d


def test_loss_is_differentiable_and_metric_accumulates():
    torch.manual_seed(0)
    loss = LPIPSLoss("vgg", pretrained=False, resize=32)
    x = torch.rand(1, 2, 3, 40, 40, requires_grad=True)
    y = torch.rand(1, 2, 3, 40, 40)
    out = loss(x, y)
    out.backward()
    assert out.ndim == 0 and x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())
    torch.manual_seed(0)
    met = LPIPS("vgg", pretrained=False, chunk=1)
    met.update(x.detach(), y)
    torch.testing.assert_close(met.compute(), loss.net(x.detach()[0], y[0]).mean(), rtol=1e-5, atol=1e-6)
