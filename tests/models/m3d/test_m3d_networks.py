"""M3D networks: SAM shapes, torchvision-name ResNet loading, M3DNetwork forward/backward and ablations."""

from __future__ import annotations

import pytest
import torch

from recon3d.data.cameras import orbit_cameras
from recon3d.errors import CheckpointError, ConfigError, ShapeError
from recon3d.models.m3d import (
    DepthEncoder,
    M3DNetwork,
    ResNet18DeepEncoder,
    ResNetShallowEncoder,
    SelectiveAttentionDeepEncoder,
    SelectiveAttentionModule,
    load_torchvision_resnet,
)

TINY = dict(shallow_layers=2, roi_size=16, sam_dim=32, sam_depths=(2, 2), sam_heads=4, deep_width=8, global_dim=16,
            hidden=32, num_layers=4, feature_size=16)


def test_selective_attention_module_shapes_and_layer_split():
    sam = SelectiveAttentionModule(dim=16, depths=(4, 2), num_heads=2, d_state=4, scan_directions=4)
    kinds = [[type(b).__name__ for b in stage] for stage in sam.stages]
    assert kinds == [["MixerBlock"] * 2 + ["AttentionBlock"] * 2, ["MixerBlock", "AttentionBlock"]]
    x = torch.randn(2, 16, 5, 7, requires_grad=True)
    y = sam(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ShapeError):
        sam(torch.randn(2, 8, 5, 7))
    default = SelectiveAttentionModule(dim=32, num_heads=4)  # paper sizes: N1 = 8, N2 = 4
    assert [len(s) for s in default.stages] == [8, 4]
    with pytest.raises(ConfigError):
        SelectiveAttentionModule(dim=15, depths=(2,))


def _torchvision_resnet34_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with torchvision's resnet34 key names and shapes, written out by hand."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def bn(prefix: str, c: int) -> None:
        sd[f"{prefix}.weight"] = torch.rand(c, generator=g)
        sd[f"{prefix}.bias"] = torch.rand(c, generator=g)
        sd[f"{prefix}.running_mean"] = torch.rand(c, generator=g)
        sd[f"{prefix}.running_var"] = torch.rand(c, generator=g) + 0.5
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(7)

    sd["conv1.weight"] = torch.randn(64, 3, 7, 7, generator=g)
    bn("bn1", 64)
    cin = 64
    for li, (cout, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for j in range(n):
            p = f"layer{li}.{j}"
            sd[f"{p}.conv1.weight"] = torch.randn(cout, cin if j == 0 else cout, 3, 3, generator=g)
            bn(f"{p}.bn1", cout)
            sd[f"{p}.conv2.weight"] = torch.randn(cout, cout, 3, 3, generator=g)
            bn(f"{p}.bn2", cout)
            if j == 0 and li > 1:
                sd[f"{p}.downsample.0.weight"] = torch.randn(cout, cin, 1, 1, generator=g)
                bn(f"{p}.downsample.1", cout)
        cin = cout
    sd["fc.weight"] = torch.randn(1000, 512, generator=g)
    sd["fc.bias"] = torch.randn(1000, generator=g)
    return sd


@pytest.fixture(scope="module")
def resnet34_file(tmp_path_factory):
    sd = _torchvision_resnet34_state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet34.pth"
    torch.save(sd, path)
    return sd, path


@pytest.mark.parametrize("block", ["basic", "enhanced"])
def test_resnet_loads_torchvision_names_strictly(tmp_path, block, resnet34_file):
    sd, path = resnet34_file
    enc = ResNetShallowEncoder(block, num_layers=4)  # stem + layer1..3
    ignored = load_torchvision_resnet(enc, path)
    assert all(k.startswith(("layer4.", "fc.")) for k in ignored) and "fc.weight" in ignored
    own = enc.state_dict()
    assert set(own) <= set(sd)
    for k, v in own.items():
        torch.testing.assert_close(v, sd[k])
    assert enc.out_channels == 64 + 64 + 128 + 256
    out = enc.eval()(torch.rand(1, 3, 32, 40))
    assert out.shape == (1, enc.out_channels, 16, 20)
    # a missing key is an error naming the file
    stem = {k: v for k, v in sd.items() if k.startswith(("conv1.", "bn1.")) and k != "bn1.running_var"}
    torch.save(stem, tmp_path / "stem.pth")
    with pytest.raises(CheckpointError, match="stem.pth.*bn1.running_var"):
        load_torchvision_resnet(ResNetShallowEncoder(block, num_layers=1), tmp_path / "stem.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_torchvision_resnet(enc, tmp_path / "nope.pth")


def _cams(b, w=32, h=24):
    return orbit_cameras(torch.linspace(0, 90, b), torch.full((b,), 15.0), 2.5, 40, w, h)


@pytest.mark.parametrize("name", ["baseline", "m3d"])
def test_m3d_network_forward_backward(name):
    torch.manual_seed(0)
    net = M3DNetwork.preset(name, **TINY)
    b, n = 2, 40
    image, depth = torch.rand(b, 3, 24, 32), torch.rand(b, 1, 24, 32)
    pts = (torch.rand(b, n, 3) - 0.5).requires_grad_()
    boxes = torch.tensor([[4.0, 3.0, 20.0, 18.0], [0.0, 0.0, 32.0, 24.0]])
    out = net(image, depth, _cams(b), pts, boxes, torch.eye(9)[:b])
    assert out["sdf"].shape == (b, n) and out["rgb"].shape == (b, n, 3) and out["feature"].shape == (b, n, 16)
    assert out["uv"].shape == (b, n, 2) and ((out["rgb"] >= 0) & (out["rgb"] <= 1)).all()
    (out["sdf"].abs().mean() + out["rgb"].mean()).backward()
    assert pts.grad is not None and torch.isfinite(pts.grad).all()
    no_grad = [k for k, p in net.named_parameters() if p.grad is None]
    assert not [k for k in no_grad if not k.startswith("decoder.layers.")], no_grad[:5]


def test_presets_swap_modules_and_official_pixel_features():
    parts = {name: M3DNetwork.preset(name, **TINY) for name in ("baseline", "exp1", "exp2", "m3d")}
    assert not parts["baseline"].shallow.layer1[0].enhanced and parts["exp1"].shallow.layer1[0].enhanced
    assert parts["exp1"].depth is None and isinstance(parts["exp2"].depth, DepthEncoder)
    assert isinstance(parts["exp2"].deep, ResNet18DeepEncoder) and isinstance(parts["m3d"].deep, SelectiveAttentionDeepEncoder)
    shallow = ResNetShallowEncoder("enhanced", num_layers=2)
    official = M3DNetwork(shallow, ResNet18DeepEncoder(128, 16, 16, width=8), DepthEncoder(32), pixel_features="depth",
                          hidden=32, num_layers=4, feature_size=8)
    assert official.fusion is None and official.decoder.point_features == 32
    out = official(torch.rand(1, 3, 24, 32), torch.rand(1, 1, 24, 32), _cams(1), torch.rand(1, 5, 3))
    assert out["sdf"].shape == (1, 5)
    with pytest.raises(ShapeError, match="depth"):
        parts["m3d"](torch.rand(1, 3, 24, 32), None, _cams(1), torch.rand(1, 5, 3))
    with pytest.raises(ConfigError):
        M3DNetwork(shallow, ResNet18DeepEncoder(128, 16, 16, width=8), None, pixel_features="depth")


def test_decoder_geometric_init_is_a_sphere():
    net = M3DNetwork.preset("exp2", **TINY)
    pts = torch.tensor([[[0.0, 0.0, 0.0], [0.9, 0.0, 0.0], [0.0, 0.0, 0.3]]])
    out = net(torch.rand(1, 3, 24, 32), torch.rand(1, 1, 24, 32), _cams(1), pts)
    sdf = out["sdf"][0]
    assert sdf[0] < 0 < sdf[1]  # inside at the origin, outside beyond the initial radius 0.6
