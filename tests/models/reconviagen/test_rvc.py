"""Rendering-aware velocity compensation (models/reconviagen/rvc.py, losses.py) on a tiny setup:
colour logits of 27 Gaussians decoded and rendered by the torch rasteriser, the exact velocity of
a Gaussian data distribution centred on wrong colours (benchmarks/bench_rvc.py's toy)."""

from __future__ import annotations

import logging

import pytest
import torch
from benchmarks.bench_rvc import GaussianDataFlow, setup, turned

from recon3d.data.batch import Views
from recon3d.data.cameras import Cameras
from recon3d.errors import ConfigError, ShapeError
from recon3d.models.flow import FlowEulerSampler
from recon3d.models.reconviagen import DreamSimDistance, RenderingLoss, RVCRefiner, VelocityCompensation
from recon3d.representations import SparseVoxels
from recon3d.representations.reconstruction import Reconstruction

TORCH = {"backend": "torch"}


def _loss(preset="official"):
    return RenderingLoss(preset, weights={"lpips": 0, "dreamsim": 0})  # no pretrained weights in the tests


@pytest.fixture(scope="module")
def toy():
    dec, z, mu, cams, images = setup(views=3, size=24)
    sampler = FlowEulerSampler(steps=6)
    noise = sampler.noise_like(z, [torch.Generator().manual_seed(1)])
    return dec, z, GaussianDataFlow(mu), cams, images, sampler, noise


def _hook(toy, cams=None, **kw):
    dec, _, _, c, images, _, _ = toy
    kw.setdefault("loss", _loss(kw.get("mode", "paper")))
    return VelocityCompensation(dec, images, c if cams is None else cams, render_opts=TORCH, **kw)


@pytest.mark.parametrize("mode,kw", [("official", {"steps": 2}), ("paper", {"alpha": 20.0})])
def test_rvc_lowers_the_input_view_loss_for_the_same_seed(toy, mode, kw):
    dec, z, flow, cams, images, sampler, noise = toy
    plain = sampler.sample(flow, noise).samples
    h = _hook(toy, mode=mode, loss=_loss("official"), **kw)
    out = sampler.sample(flow, noise, hook=h).samples
    before, after = h.evaluate(plain), h.evaluate(out)
    assert sum(r["applied"] for r in h.history) >= 2
    assert float(after.mean()) < float(before.mean()) - 0.01, (before, after)
    assert float(h.evaluate(z).max()) < 1e-4  # the true latent renders the inputs exactly: the loss is a real distance
    assert torch.isfinite(out).all()


def test_paper_correction_is_alpha_times_the_x0_gradient(toy):
    """v' - v = alpha dL/dx0, checked against central finite differences of the loss in x0."""
    dec, z, flow, cams, images, sampler, noise = toy
    captured = {}

    def spy(step):
        up = h(step)
        if up is not None and "x_t" not in captured:
            captured.update(x_t=step.x_t, t=step.t, v=step.v, v_new=up.v)
        return up

    h = _hook(toy, mode="paper", alpha=0.5, loss=_loss("official"))
    sampler.sample(flow, noise, hook=spy)
    x0 = sampler.x0_from_velocity(captured["x_t"], captured["t"], captured["v"]).double()
    grad = (captured["v_new"] - captured["v"]).double() / 0.5
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        d = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        eps = 1e-2
        f = lambda x: float(h.evaluate(x.float()).mean(1).sum())  # noqa: E731
        fd = (f(x0 + eps * d) - f(x0 - eps * d)) / (2 * eps)
        assert abs(fd - float((grad * d).sum())) <= 0.05 * abs(fd) + 1e-4, (fd, float((grad * d).sum()))


def test_a_view_with_a_planted_wrong_camera_is_dropped(toy):
    dec, z, flow, cams, images, sampler, noise = toy
    bad = turned(cams, 2, 180.0)  # looks away from the object
    h = _hook(toy, cams=bad, mode="official", steps=1)
    out = sampler.sample(flow, noise, hook=h).samples
    applied = [r for r in h.history if r["applied"]]
    assert applied
    for r in applied:
        assert r["kept"].tolist() == [[True, True, False]], r["losses"]
        assert float(r["losses"][0, 2]) > 0.8 > float(r["losses"][0, :2].max())
    # the good views still improve
    ref = _hook(toy, mode="official", steps=1)
    plain = sampler.sample(flow, noise).samples
    assert float(ref.evaluate(out)[0, :2].mean()) < float(ref.evaluate(plain)[0, :2].mean())


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_all_views_dropped_gives_the_plain_sample_finite_and_one_warning(toy, mode, caplog):
    dec, z, flow, cams, images, sampler, noise = toy
    plain = sampler.sample(flow, noise).samples
    h = _hook(toy, mode=mode, steps=2, drop_threshold=-1.0)
    with caplog.at_level(logging.WARNING, logger="recon3d.models.reconviagen.rvc"):
        out = sampler.sample(flow, noise, hook=h).samples
    active = [r for r in h.history if h.active_at(r["t"])]
    assert torch.isfinite(out).all()
    assert torch.equal(out, plain)
    assert h.all_dropped == len(active) >= 2
    assert not any(r["applied"] for r in h.history)
    assert len([m for m in caplog.messages if "drop_threshold" in m]) == 1


def test_start_t_boundary_paper_strict_official_inclusive(toy):
    dec, z, flow, cams, images, _, _ = toy
    sampler = FlowEulerSampler(steps=4)  # grid 1, 0.75, 0.5, 0.25, 0
    noise = sampler.noise_like(z, [torch.Generator().manual_seed(1)])
    for mode, want in (("paper", [0.25]), ("official", [0.5, 0.25])):
        h = _hook(toy, mode=mode, steps=1)
        sampler.sample(flow, noise, hook=h)
        assert [r["t"] for r in h.history if r["applied"]] == want


def test_sparse_voxel_states(toy):
    """A SLAT-like SparseVoxels state: the hook corrects its features and keeps its coords."""
    dec, z, flow, cams, images, sampler, _ = toy
    n = dec.size
    coords = torch.cat([torch.zeros(n, 1, dtype=torch.int32), torch.stack(torch.meshgrid(*[torch.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3).int()], 1)
    noise = SparseVoxels(coords, sampler.noise_like(z, [torch.Generator().manual_seed(1)])[0], 3, 1)
    model = lambda x, tt, c: x.replace(feats=flow(x.feats[None], tt)[0])  # noqa: E731
    decode = lambda x0: dec(x0.feats[None])  # noqa: E731
    h = VelocityCompensation(decode, images, cams, loss=_loss(), mode="official", steps=1, render_opts=TORCH)
    out = sampler.sample(model, noise, hook=h).samples
    plain = sampler.sample(model, noise).samples
    assert isinstance(out, SparseVoxels) and torch.equal(out.coords, noise.coords)
    assert float(h.evaluate(out).mean()) < float(h.evaluate(plain).mean())


def test_rvc_refiner_renoises_and_lowers_the_view_loss(toy):
    dec, z, flow, cams, images, sampler, noise = toy
    plain = sampler.sample(flow, noise).samples
    rec = Reconstruction(["a"], dec(plain), extras={"latent": plain}, cameras=cams)
    ref = RVCRefiner(flow, sampler, dec, cond_key=None, mode="official", steps=2, loss=_loss(), render_opts=TORCH)
    with torch.inference_mode():  # as in Lightning's predict loop
        out = ref.refine(rec, Views(images, cams))
    r = out.extras["rvc"]
    assert r["start_step"] == 3  # first grid time below 0.5 inclusive (official): 1 - 3/6
    assert float(r["view_loss_after"].mean()) < float(r["view_loss_before"].mean())
    assert out.extras["latent"].shape == plain.shape
    assert "rvc_view_loss" in ref.summary(out)
    with pytest.raises(ConfigError, match="extras"):
        ref.refine(Reconstruction(["a"], dec(plain)), Views(images, cams))


def test_bad_inputs_name_the_argument(toy):
    dec, z, flow, cams, images, sampler, noise = toy
    with pytest.raises(ConfigError, match="mode"):
        VelocityCompensation(dec, images, cams, mode="nope")
    with pytest.raises(ShapeError, match="cameras"):
        VelocityCompensation(dec, images, cams[:, :2])
    with pytest.raises(ShapeError, match="images"):
        VelocityCompensation(dec, images[0], cams)
    with pytest.raises(ConfigError, match="weights"):
        RenderingLoss(weights={"psnr": 1})


def test_rendering_loss_terms_and_missing_weights_warn_once(caplog, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no LPIPS backbone anywhere
    monkeypatch.delenv("RECON3D_LPIPS_DIR", raising=False)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    loss = RenderingLoss("official")
    with caplog.at_level(logging.WARNING, logger="recon3d.models.reconviagen.losses"):
        v1, v2 = loss(a, b), loss(a, b)
    assert len([m for m in caplog.messages if "LPIPS" in m]) == 1 and len([m for m in caplog.messages if "DreamSim" in m]) == 1
    assert loss.active == ("l1", "ssim") and loss.name == "official: l1 + ssim"
    from recon3d.metrics.image import ssim

    want = (a - b).abs().flatten(1).mean(1) + (1 - ssim(a, b))
    torch.testing.assert_close(v1, want.float())
    torch.testing.assert_close(v1, v2)
    with pytest.raises(Exception, match="require"):
        RenderingLoss("paper", require=("lpips",))(a, b)


def test_dreamsim_term_from_a_local_vit_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=16)
    torch.manual_seed(0)
    transformers.ViTModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    d = DreamSimDistance(tmp_path / "vit", size=32)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 40, 40, generator=g), torch.rand(2, 3, 40, 40, generator=g)
    out = d(a, b)
    # independent: the folder's model on resized, ImageNet-normalised inputs, CLS token, 1 - cosine
    m = transformers.ViTModel.from_pretrained(tmp_path / "vit").eval()
    norm = lambda x: (torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)  # noqa: E731
                      - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ea, eb = m(pixel_values=norm(a)).last_hidden_state[:, 0], m(pixel_values=norm(b)).last_hidden_state[:, 0]
    torch.testing.assert_close(out, 1 - torch.nn.functional.cosine_similarity(ea, eb, dim=-1), atol=1e-5, rtol=1e-4)
    assert float(d(a, a).abs().max()) < 1e-5
    a.requires_grad_(True)
    d(a, b).sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    loss = RenderingLoss("paper", weights={"lpips": 0}, dreamsim=str(tmp_path / "vit"), dreamsim_size=32)
    assert loss.resolve() == ("ssim", "dreamsim")


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_an_objects_correction_does_not_depend_on_its_batch_neighbour(toy, mode):
    """Object 0's sample with RVC is the same alone and next to an object whose views are all dropped."""
    dec, z, flow, cams, images, sampler, noise = toy
    alone = _hook(toy, mode=mode, steps=1, alpha=20.0)
    a = sampler.sample(flow, noise, hook=alone).samples
    other = sampler.noise_like(z, [torch.Generator().manual_seed(7)])
    imgs2 = torch.cat([images, torch.ones_like(images)])  # object 1: white images on a black render -> all views dropped
    mu2 = torch.cat([flow.mu, flow.mu])
    h = VelocityCompensation(dec, imgs2, Cameras.cat([cams, cams]), loss=_loss(mode), mode=mode, steps=1, alpha=20.0, render_opts=TORCH)
    both = sampler.sample(GaussianDataFlow(mu2), torch.cat([noise, other]), hook=h).samples
    torch.testing.assert_close(both[:1], a, atol=1e-5, rtol=1e-5)
    applied = [r for r in h.history if r["applied"]]
    assert applied and all(r["kept"][1].sum() == 0 and r["kept"][0].all() for r in applied)
    assert h.all_dropped == 0  # some view of the batch was kept at every step
