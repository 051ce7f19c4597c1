"""MVBoost's input-view optimisation (:class:`InputViewRefiner`) on CPU at 32x32.

The synthetic object is a Gaussian set built here: an ellipsoid of two shells (surface + inner,
so the front is opaque) with a smooth colour pattern. Its "reconstruction" θ* is the same set
with a smooth colour error and jittered positions, as a feed-forward model's would be; the
user's input image is the true object's render. No LPIPS weights exist on a CI machine, so the
optimisation tests use the SSIM + L1 fallback (``loss: ssim_l1``, said in each test); the LPIPS
path is tested with a randomly initialised AlexNet saved in torchvision's layout (real LPIPS
numbers need the real weights, which no test here can have).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from recon3d.data.batch import Views
from recon3d.data.cameras import Cameras, orbit_cameras
from recon3d.errors import ConfigError, DataError
from recon3d.metrics.image import psnr, ssim
from recon3d.metrics.lpips import AlexNetFeatures, LPIPSNet, LPIPSWeightsNotFoundError
from recon3d.models.refiners import InputViewRefiner
from recon3d.render import render
from recon3d.representations import Gaussians, Meshes
from recon3d.representations.reconstruction import Reconstruction

S = 32  # image size
FOVY = 40.0
R = 2.5  # camera distance
TRUE_AZ, TRUE_EL = 30.0, 15.0


def _shell(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points on an ellipsoid (Fibonacci lattice) and their colours ``(n, 3)``."""
    i = torch.arange(n) + 0.5
    phi, th = torch.acos(1 - 2 * i / n), math.pi * (1 + 5**0.5) * i
    p = torch.stack([torch.cos(th) * torch.sin(phi), torch.sin(th) * torch.sin(phi), torch.cos(phi)], -1) * torch.tensor([0.8, 0.55, 0.45])
    col = 0.5 + 0.4 * torch.stack([torch.sin(3 * p[:, 0] + 0.5), torch.cos(4 * p[:, 1]), torch.sin(5 * p[:, 2] + 1)], -1)
    return p, col


def _object(n: int = 150) -> Gaussians:
    p1, c1 = _shell(n)
    p2, c2 = _shell(n // 2)
    p = torch.cat([p1, 0.75 * p2])
    q = torch.zeros(p.shape[0], 4)
    q[:, 0] = 1
    scale = 0.09 * math.sqrt(300 / n)
    return Gaussians(p[None], q[None], torch.full((1, p.shape[0], 3), scale), torch.full((1, p.shape[0]), 0.95), torch.cat([c1, 0.8 * c2])[None])


def _perturbed(gt: Gaussians, jitter: float = 0.02) -> Gaussians:
    """θ*: a smooth colour error (in logit space) and jittered positions."""
    p = gt.means[0]
    err = 0.8 * torch.stack([torch.sin(2 * p[:, 1] + 1), torch.sin(3 * p[:, 2]), torch.cos(2 * p[:, 0])], -1)
    g = torch.Generator().manual_seed(1)
    return Gaussians(gt.means + jitter * torch.randn(gt.means.shape, generator=g), gt.quats, gt.scales, gt.opacities,
                     torch.sigmoid(torch.logit(gt.colors) + err[None]))


def _cams(az, el, r=R) -> Cameras:
    return orbit_cameras(torch.tensor(az, dtype=torch.float32), torch.tensor(el, dtype=torch.float32), r, FOVY, S, S).reshape(1, -1)


def _render(g: Gaussians, cams: Cameras):
    return render(g, cams, "white", backend="torch")


@pytest.fixture(scope="module")
def scene():
    gt = _object()
    cam = _cams([TRUE_AZ], [TRUE_EL])
    out = _render(gt, cam)
    return gt, Views(out.rgb, cam, out.alpha)


def _fast(**kw) -> InputViewRefiner:
    args = dict(loss="ssim_l1", backend="torch", pose_search=False, steps=2, reg_views=0)
    args.update(kw)
    return InputViewRefiner(**args)


@pytest.mark.slow
def test_input_view_loss_drops_10x_while_heldout_views_hold(scene):
    # SSIM + L1 (loss: ssim_l1): the fallback, since no LPIPS weights exist on a CI machine.
    gt, views = scene
    theta = _perturbed(gt)
    # The defaults otherwise: W on colour, opacity and scale; 100 steps; regulariser 0.5 over 6 views.
    refiner = InputViewRefiner(loss="ssim_l1", backend="torch", pose_search=False)
    refined = refiner.refine(Reconstruction(["obj"], theta), views)
    g = refined.representation
    # The test's own numbers: render θ* and θ↑ at the input camera and score them against the image.
    target = views.images[0]
    loss = lambda x: float(0.2 * (1 - ssim(x, target)) + 0.8 * (x - target).abs().flatten(1).mean(1))  # noqa: E731
    before, after = loss(_render(theta, views.cameras).rgb[0]), loss(_render(g, views.cameras).rgb[0])
    assert before / after >= 10, (before, after)
    rec = refined.get("input_view")
    assert rec["loss"] == "ssim_l1"
    assert rec["before"][0]["loss"] == pytest.approx(before, rel=1e-4) and rec["after"][0]["loss"] == pytest.approx(after, rel=1e-4)
    assert rec["loss_history"][0][0] == pytest.approx(before, rel=1e-4) and rec["loss_history"][0][-1] == pytest.approx(after, rel=1e-4)
    # Held-out views (none of them the regulariser's): PSNR against the true object's renders.
    held = _cams([75.0, 120.0, -15.0, 210.0], [0.0, 30.0, 40.0, 10.0])
    truth = _render(gt, held).rgb
    drop = psnr(_render(theta, held).rgb, truth) - psnr(_render(g, held).rgb, truth)
    assert (drop < 1.0).all(), drop
    s = refiner.summary(refined)
    assert s["input_view_loss"].startswith("ssim_l1 ") and "->" in s["input_view_psnr"] and s["input_view_lpips"].startswith("n/a")


def test_zero_offset_is_the_reconstruction_and_params_are_the_only_change(scene):
    gt, views = scene
    theta = _perturbed(gt)
    same = _fast(steps=0).refine(Reconstruction(["obj"], theta), views).representation
    for k in ("means", "quats", "scales", "opacities", "colors"):
        torch.testing.assert_close(getattr(same, k), getattr(theta, k), atol=2e-6, rtol=1e-5)
    moved = _fast(steps=3, params=("colors",)).refine(Reconstruction(["obj"], theta), views).representation
    assert not torch.allclose(moved.colors, theta.colors)
    for k in ("means", "quats", "scales", "opacities"):
        torch.testing.assert_close(getattr(moved, k), getattr(theta, k), atol=2e-6, rtol=1e-5)


@pytest.mark.slow
def test_pose_search_recovers_azimuth_and_elevation(scene):
    # θ* is the true object, so eq. 7's minimum is the true pose; the input camera is off by
    # -12° azimuth, +9° elevation and 8% radius, between grid points.
    gt, views = scene
    start = _cams([TRUE_AZ + 12.0], [TRUE_EL - 9.0], R * 1.08)
    refiner = InputViewRefiner(loss="ssim_l1", backend="torch", steps=0, reg_views=0, azimuth_range=(-20, 20), azimuth_steps=5,
                               elevation_range=(-15, 15), elevation_steps=4, radius_range=(0.9, 1.0), radius_steps=2, pose_steps=25)
    refined = refiner.refine(Reconstruction(["obj"], gt), Views(views.images, start, views.masks))
    rec = refined.get("input_view")
    pose, search = rec["pose"][0], rec["pose_search"][0]
    assert abs(pose["azimuth"] - TRUE_AZ) < 1.0 and abs(pose["elevation"] - TRUE_EL) < 1.0, pose
    assert abs(pose["radius"] / R - 1) < 0.01, pose
    assert search["grid_size"] == 5 * 4 * 2 + 1
    assert search["loss"] <= search["grid_best_loss"] <= search["start_loss"]
    # The recorded camera is the one the numbers were scored at (the test renders it itself).
    cam = Cameras(rec["c2w"][None], rec["K"][None], S, S)
    x = _render(gt, cam).rgb[0]
    own = float(0.2 * (1 - ssim(x, views.images[0])) + 0.8 * (x - views.images[0]).abs().mean())
    assert own == pytest.approx(search["loss"], rel=1e-4)


def test_refuses_a_reconstruction_without_gaussians(scene):
    _, views = scene
    mesh = Meshes([torch.rand(4, 3)], [torch.tensor([[0, 1, 2], [0, 2, 3]])])
    with pytest.raises(ConfigError, match="holds no Gaussians") as err:
        _fast().refine(Reconstruction(["obj"], mesh), views)
    assert "\n" not in str(err.value) and "Meshes" in str(err.value)


def test_lpips_fallback_is_said_once(scene, tmp_path, monkeypatch, caplog):
    gt, views = scene
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no torchvision weights anywhere
    monkeypatch.delenv("RECON3D_LPIPS_DIR", raising=False)
    refiner = _fast(loss="auto", lpips_weights_dir=str(tmp_path / "none"))
    rec = Reconstruction(["obj"], _perturbed(gt))
    with caplog.at_level(logging.WARNING, logger="recon3d.models.refiners.input_view"):
        first = refiner.refine(rec, views)
        refiner.refine(rec, views)
    said = [r for r in caplog.records if "falls back to SSIM + L1" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert "vgg16-397923af.pth" in said[0].getMessage() and "lpips_weights_dir" in said[0].getMessage()
    assert first.get("input_view")["loss"] == "ssim_l1"
    with pytest.raises(LPIPSWeightsNotFoundError, match="loss: lpips"):
        _fast(loss="lpips", lpips_weights_dir=str(tmp_path / "none")).refine(rec, views)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recon3d.models.refiners.input_view"):
        _fast(loss="ssim_l1").refine(rec, views)
    assert not caplog.records


def test_lpips_is_the_loss_when_weights_exist(scene, tmp_path):
    # Random AlexNet weights in torchvision's layout (heads: the copy torchmetrics ships): the
    # code path of real weights, not real LPIPS values.
    gt, views = scene
    torch.manual_seed(0)
    torch.save(AlexNetFeatures().state_dict(), tmp_path / "alexnet-owt-7be5be79.pth")
    refiner = _fast(loss="auto", lpips_net="alex", lpips_weights_dir=str(tmp_path), steps=3)
    theta = _perturbed(gt)
    refined = refiner.refine(Reconstruction(["obj"], theta), views)
    rec = refined.get("input_view")
    assert rec["loss"] == "lpips"
    net = LPIPSNet("alex", weights_dir=str(tmp_path))
    own = float(net(_render(theta, views.cameras).rgb[0], views.images[0])[0])
    assert rec["before"][0]["lpips"] == pytest.approx(own, rel=1e-4)
    assert rec["before"][0]["loss"] == pytest.approx(own, rel=1e-4)
    assert "->" in refiner.summary(refined)["input_view_lpips"]


def test_works_under_inference_mode_with_packed_gaussians_in_extras(scene):
    gt, views = scene
    theta = _perturbed(gt)
    with torch.inference_mode():  # as Lightning's predict loop runs it
        packed = Gaussians.from_list([theta, theta])
        both = Views(views.images.expand(2, -1, -1, -1, -1).clone(), Cameras.cat([views.cameras, views.cameras]), views.masks.expand(2, -1, -1, -1, -1).clone())
        mesh = Meshes([torch.rand(3, 3)] * 2, [torch.tensor([[0, 1, 2]])] * 2)
        rec = Reconstruction(["a", "b"], mesh, extras={"gaussians": packed})
        refined = _fast(steps=3, reg_views=2).refine(rec, both)
        out = refined.extras["gaussians"]
        assert refined.representation is mesh and out.is_packed and out.counts.tolist() == packed.counts.tolist()
        # Both objects got the same input, so the same refinement; the record splits per object.
        torch.testing.assert_close(out[0].colors, out[1].colors)
        assert not torch.allclose(out[0].colors, theta.colors[0])
        one = refined.select(1).get("input_view")
        assert len(one["loss_history"]) == 1 and one["c2w"].shape == (1, 4, 4)


def test_input_image_without_mask(scene):
    gt, _ = scene
    rec = Reconstruction(["obj"], _perturbed(gt))
    cam = _cams([TRUE_AZ], [TRUE_EL], 4.0)  # far enough that the object leaves the border free
    out = _render(gt, cam)
    views = Views(out.rgb, cam, out.alpha)
    # A render on white: the border is the render background, so no mask is needed.
    _fast().refine(rec, Views(views.images, views.cameras))
    # A cluttered background and no alpha: one DataError line saying what to give.
    g = torch.Generator().manual_seed(0)
    noisy = views.images * views.masks + torch.rand(views.images.shape, generator=g) * (1 - views.masks)
    with pytest.raises(DataError, match="no mask and no clear background") as err:
        _fast().refine(rec, Views(noisy, views.cameras))
    assert "\n" not in str(err.value) and "'obj'" in str(err.value) and "matte: none" in str(err.value)
    with pytest.raises(DataError, match="no mask"):
        _fast(matte="mask").refine(rec, Views(views.images, views.cameras))
    _fast(matte="none").refine(rec, Views(noisy, views.cameras))  # told to fit the image as it is


def test_bad_options_are_one_line():
    for kw, key in ((dict(loss="mse"), "loss"), (dict(params=("colors", "sh")), "params"), (dict(azimuth_range=(10, -10)), "azimuth_range"),
                    (dict(lrs={"colour": 0.1}), "lrs"), (dict(background="random"), "background"), (dict(azimuth_steps=0), "azimuth_steps")):
        with pytest.raises(ConfigError, match=key):
            InputViewRefiner(**kw)


@pytest.mark.slow
def test_export_through_a_methods_refiners(tmp_path):
    # The plug-in Gaussian method of the conformance suite, untrained: its reconstruction's
    # Gaussians go through the refiner in the method's export path (predict / recon3d export).
    plyfile = pytest.importorskip("plyfile")
    from tests.methods.plugin.gaussian_fit import GaussianFitModule

    from recon3d.data.datamodule import ReconDataModule
    from recon3d.data.synthetic import SyntheticDataset

    ds = SyntheticDataset(num_objects=2, views_per_object=3, resolution=24, num_surface_points=16, num_sdf_points=16,
                          mesh_resolution=0, cache_dir=str(tmp_path / "cache"))
    dm = ReconDataModule(ds, num_val_objects=0, num_test_objects=0, num_input_views=2, num_target_views=1, batch_size=1)
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    model = GaussianFitModule(num_gaussians=32)
    model.refiners = [_fast(steps=3, reg_views=2, pose_search=True, azimuth_steps=2, elevation_steps=1, radius_steps=1, pose_steps=1)]
    with torch.inference_mode():  # as Lightning's predict loop runs it
        files = model.export_object(batch, 0, tmp_path / "obj")
    plain, refined = plyfile.PlyData.read(files["gaussians.ply"]), plyfile.PlyData.read(files["gaussians_input_view.ply"])
    assert plain["vertex"].count == refined["vertex"].count == 32
    assert files["input_view_loss"].startswith("ssim_l1 ") and "->" in files["heldout_psnr"]  # the second input view is held out
