"""VGGTModule (ReconViaGen's VGGT LoRA stage) and VGGT's training loss on CPU at the tiny size:

- the loss terms against hand computations on small tensors (iteration weights 0.6^(n-1-i),
  the confidence term, the finite-difference and normal gradient terms, the target normalisation);
- the LoRA stage lowers its loss with only the adapters moving; adapter targets with / without
  the DINO blocks; the adapter-only file round-trips;
- reconstruct: predicted cameras and Gaussians mapped into the world by camera 0 + scale;
- pose metrics end to end: the Trainer's test loop on a VGGTModule whose camera prediction is
  replaced by the true rig with a planted 40° error writes RRE / TE / Acc@15/30 to metrics.json.

The conformance suite runs configs/vggt_cpu.yaml (``-k vggt``)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from scipy.spatial.transform import Rotation

from recon3d.adapters import lora_layers
from recon3d.data.cameras import Cameras, look_at
from recon3d.data.datamodule import ReconDataModule
from recon3d.data.synthetic import SyntheticDataset
from recon3d.errors import ConfigError, DataError, ShapeError
from recon3d.methods.vggt import VGGTModule, similarity_to_world
from recon3d.models.vggt import VGGTNetwork
from recon3d.models.vggt.cameras import quat_to_matrix, relative_to_first
from recon3d.models.vggt.loss import camera_loss, normal_loss, regression_loss, vggt_targets
from recon3d.representations import Gaussians

DEPTH = 4  # tiny preset: 4 frame + 4 global blocks; DINO 2 blocks


def _module(**kw) -> VGGTModule:
    torch.manual_seed(0)
    args = dict(network=VGGTNetwork("tiny"), rank=4, alpha=8.0, lr=1e-2, min_valid_points=10, adapter_file=None)
    args.update(kw)
    return VGGTModule(**args)


def _datamodule(cache: Path, **kw) -> ReconDataModule:
    ds = SyntheticDataset(num_objects=3, views_per_object=6, resolution=28, num_surface_points=64, num_sdf_points=64,
                          mesh_resolution=0, cache_dir=str(cache))
    args = dict(num_val_objects=0, num_test_objects=0, num_input_views=3, num_target_views=2, batch_size=2,
                with_geometry=False, input_resolution=28, target_resolution=28)
    args.update(kw)
    return ReconDataModule(ds, **args)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("vggt_data")


@pytest.fixture(scope="module")
def batch(cache):
    return next(iter(_datamodule(cache).train_dataloader()))


def _rig(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    eyes = torch.randn(n, 3, generator=g, dtype=dtype)
    eyes = 2.5 * eyes / eyes.norm(dim=-1, keepdim=True)
    return look_at(eyes, torch.zeros(n, 3, dtype=dtype) + 0.1 * torch.randn(n, 3, generator=g, dtype=dtype)).to(dtype)


# ---------------------------------------------------------------------- loss terms by hand
def test_camera_loss_weights_iterations_by_0_6_powers_and_tasks_1_1_half():
    g = torch.Generator().manual_seed(0)
    n, B, S = 3, 2, 2
    preds = [torch.randn(B, S, 9, generator=g, dtype=torch.float64) for _ in range(n)]
    gt = torch.randn(B, S, 9, generator=g, dtype=torch.float64)
    out = camera_loss(preds, gt)
    T = R = Fv = 0.0
    for i in range(n):
        w = 0.6 ** (n - 1 - i)
        d = [[[abs(float(preds[i][b, s, k] - gt[b, s, k])) for k in range(9)] for s in range(S)] for b in range(B)]
        T += w * sum(d[b][s][k] for b in range(B) for s in range(S) for k in range(3)) / (B * S * 3)
        R += w * sum(d[b][s][k] for b in range(B) for s in range(S) for k in range(3, 7)) / (B * S * 4)
        Fv += w * sum(d[b][s][k] for b in range(B) for s in range(S) for k in range(7, 9)) / (B * S * 2)
    T, R, Fv = T / n, R / n, Fv / n
    assert float(out["T"]) == pytest.approx(T) and float(out["R"]) == pytest.approx(R) and float(out["FoV"]) == pytest.approx(Fv)
    assert float(out["camera"]) == pytest.approx(T + R + 0.5 * Fv)
    # objects whose frame 0 lacks valid pixels do not count; none valid: a zero that keeps the graph
    only1 = camera_loss(preds, gt, torch.tensor([False, True]))
    assert float(only1["T"]) == pytest.approx(float(camera_loss([p[1:] for p in preds], gt[1:])["T"]))
    p = preds[0].clone().requires_grad_(True)
    none = camera_loss([p], gt, torch.tensor([False, False]))
    assert float(none["camera"]) == 0.0 and none["camera"].requires_grad


def test_confidence_and_gradient_terms_match_a_hand_computation():
    g = torch.Generator().manual_seed(1)
    H, W = 3, 5
    pred = torch.rand(1, 1, H, W, 1, generator=g, dtype=torch.float64)
    gt = torch.rand(1, 1, H, W, 1, generator=g, dtype=torch.float64)
    conf = 1 + torch.rand(1, 1, H, W, generator=g, dtype=torch.float64)
    mask = torch.ones(1, 1, H, W, dtype=torch.bool)
    mask[0, 0, 1, 2] = False
    mask[0, 0, 0, 0] = False
    out = regression_loss(pred, gt, mask, conf, "grad", valid_range=None)
    px = [(r, c) for r in range(H) for c in range(W) if mask[0, 0, r, c]]
    reg = [abs(float(pred[0, 0, r, c, 0] - gt[0, 0, r, c, 0])) for r, c in px]
    cf = [float(conf[0, 0, r, c]) for r, c in px]
    assert float(out["reg"]) == pytest.approx(sum(reg) / len(reg))
    assert float(out["conf"]) == pytest.approx(sum(e * c - 0.2 * math.log(c) for e, c in zip(reg, cf)) / len(reg))
    total = 0.0
    for s in range(4):  # strides 1, 2, 4, 8
        st = 2 ** s
        rows, cols = list(range(0, H, st)), list(range(0, W, st))
        m = {(i, j): bool(mask[0, 0, r, c]) for i, r in enumerate(rows) for j, c in enumerate(cols)}
        d = {(i, j): float(pred[0, 0, r, c, 0] - gt[0, 0, r, c, 0]) * m[i, j] for i, r in enumerate(rows) for j, c in enumerate(cols)}
        acc = 0.0
        for (i, j), v in d.items():
            if (i, j + 1) in d and m[i, j] and m[i, j + 1]:
                acc += abs(d[i, j + 1] - v)
            if (i + 1, j) in d and m[i, j] and m[i + 1, j]:
                acc += abs(d[i + 1, j] - v)
        n = sum(m.values())
        total += acc / n if n else 0.0  # stride 8: the one sampled pixel is masked, a zero term
    assert float(out["grad"]) == pytest.approx(total / 4)


def test_normal_term_is_one_minus_cos_of_the_tilt_between_planes():
    theta = math.radians(25.0)
    v, u = torch.meshgrid(torch.arange(6.0, dtype=torch.float64), torch.arange(7.0, dtype=torch.float64), indexing="ij")
    gt = torch.stack([u, v, torch.ones_like(u)], -1)[None]  # the plane z = 1, normal +z
    R = torch.from_numpy(Rotation.from_rotvec([theta, 0, 0]).as_matrix())
    pred = gt @ R.T  # the plane tilted by theta about x: every normal turns by theta
    mask = torch.ones(1, 6, 7, dtype=torch.bool)
    assert float(normal_loss(pred, gt, mask)) == pytest.approx(1 - math.cos(theta), abs=1e-9)
    assert float(normal_loss(gt, gt, mask)) == pytest.approx(0.0, abs=1e-7)
    out = regression_loss(pred[:, None], gt[:, None], mask[:, None], torch.ones(1, 1, 6, 7, dtype=torch.float64), "normal", valid_range=None)
    # strides 1 and 2 give 1 - cos; at stride 4 the 2 x 2 grid has fewer than 10 valid normals: 0, as upstream
    assert float(out["grad"]) == pytest.approx(2 / 3 * (1 - math.cos(theta)), abs=1e-9)


def test_targets_put_frame_zero_at_identity_and_divide_by_the_mean_point_distance():
    c2w = _rig(3, 2, torch.float32)
    K = torch.tensor([[30.0, 0, 14], [0, 30.0, 14], [0, 0, 1]]).expand(1, 3, 3, 3)
    cams = Cameras(c2w[None], K, 28, 28)
    g = torch.Generator().manual_seed(3)
    depth = 2 + torch.rand(1, 3, 1, 28, 28, generator=g)
    depth[..., :5, :] = 0  # empty rows
    tg = vggt_targets(cams, depth)
    assert torch.allclose(tg["pose_enc"][0, 0, :7], torch.tensor([0, 0, 0, 0, 0, 0, 1.0]), atol=1e-5)
    # independent: world points by Cameras.unproject, into camera 0's frame, mean norm over valid pixels
    v, u = torch.meshgrid(torch.arange(28.0) + 0.5, torch.arange(28.0) + 0.5, indexing="ij")
    pix = torch.stack([u, v], -1).reshape(1, 1, -1, 2).expand(1, 3, -1, -1)
    world = cams.unproject(pix, depth[:, :, 0].reshape(1, 3, -1))
    in0 = cams[:, :1].world_to_camera(world.reshape(1, 1, -1, 3)).reshape(1, 3, 28, 28, 3)
    valid = depth[:, :, 0] > 0
    scale = in0.norm(dim=-1)[valid].mean()
    assert float(tg["scale"][0]) == pytest.approx(float(scale), rel=1e-4)
    torch.testing.assert_close(tg["points"][valid], in0[valid] / scale, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tg["depth"][..., 0][valid], depth[:, :, 0][valid] / scale)
    rel = relative_to_first(cams)
    torch.testing.assert_close(tg["pose_enc"][..., :3], rel.w2c[..., :3, 3] / scale, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(quat_to_matrix(tg["pose_enc"][..., 3:7]), rel.w2c[..., :3, :3], atol=1e-5, rtol=0)
    # a similarity of the world (rotation, translation, scale 3) changes no target
    A = torch.from_numpy(Rotation.from_rotvec([0.3, -0.5, 0.2]).as_matrix()).float()
    M = torch.eye(4)
    M[:3, :3], M[:3, 3] = A, torch.tensor([0.5, -1.0, 2.0])
    moved = M @ c2w[None]
    moved[..., :3, 3] = moved[..., :3, 3] * 3
    tg2 = vggt_targets(Cameras(moved, K, 28, 28), depth * 3)
    torch.testing.assert_close(tg2["pose_enc"], tg["pose_enc"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tg2["points"], tg["points"], atol=1e-4, rtol=1e-4)


def test_similarity_to_world_undoes_a_similarity_of_the_true_rig():
    true_c2w = _rig(4, 5)
    K = torch.tensor([[40.0, 0, 14], [0, 40.0, 14], [0, 0, 1]], dtype=torch.float64).expand(1, 4, 3, 3)
    true = Cameras(true_c2w[None], K, 28, 28)
    # the "prediction": the rig in a rotated, shifted and 0.3-scaled frame
    A = torch.from_numpy(Rotation.from_rotvec([1.0, 0.2, -0.4]).as_matrix())
    pred_c2w = true_c2w.clone()
    pred_c2w[:, :3, :3] = A @ true_c2w[:, :3, :3]
    pred_c2w[:, :3, 3] = 0.3 * (true_c2w[:, :3, 3] @ A.T) + torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    T = similarity_to_world(Cameras(pred_c2w[None], K, 28, 28), true).double()[0]
    mapped = T @ pred_c2w
    # T's linear part is (1 / 0.3) times a rotation: centres land on the true ones, rotations too after 0.3 x
    torch.testing.assert_close(mapped[:, :3, 3], true_c2w[:, :3, 3], atol=1e-4, rtol=0)
    torch.testing.assert_close(mapped[:, :3, :3] * 0.3, true_c2w[:, :3, :3], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- the LoRA stage
def test_adapter_targets_are_the_aggregator_attention_with_dino_as_an_option():
    model = _module()
    want = {f"aggregator.{k}_blocks.{i}.attn.{p}" for k in ("frame", "global") for i in range(DEPTH) for p in ("qkv", "proj")}
    assert set(lora_layers(model.net)) == want
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"net.{t}.lora_{ab}.default.weight" for t in want for ab in "AB"}
    with_dino = _module(lora_dino=True)
    dino = {f"aggregator.patch_embed.blocks.{i}.attn.{p}" for i in range(2) for p in ("qkv", "proj")}
    assert set(lora_layers(with_dino.net)) == want | dino
    with pytest.raises(ConfigError, match=r"model.pattern \(module names in VGGTNetwork\)"):
        _module(pattern=r"no\.such\.layer")


def test_lora_stage_lowers_the_loss_with_only_adapter_weights_moving(batch, tmp_path):
    model = _module()
    before = {k: v.clone() for k, v in model.base_state_dict().items()}
    opt = model.configure_optimizers()
    model.train()
    losses = []
    for _ in range(6):  # a random tiny base: rank-4 adapters at lr 1e-2 take ~30 % off in 6 steps
        terms = model.training_losses(batch)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(float(terms["loss"].detach()))
    assert {"camera", "T", "R", "FoV", "depth_conf", "depth_reg", "depth_grad", "point_conf", "point_reg", "point_grad"} <= set(terms)
    model.train()
    with torch.no_grad():
        final = float(model.training_losses(batch)["loss"])
    assert final < 0.8 * losses[0], losses
    after = model.base_state_dict()
    assert after.keys() == before.keys() and len(before) > 100
    assert not [k for k in before if not torch.equal(before[k], after[k])]
    # the adapter-only file round-trips into a fresh module (same seed: same frozen base)
    path = model.save_adapters(tmp_path / "adapters.safetensors")
    fresh = _module(adapters=str(path))
    for k, v in model.adapter_state_dict().items():
        assert torch.equal(fresh.adapter_state_dict()[k], v), k
    # ... and into a bare network from the file's own header (how a later stage reads it)
    from recon3d.adapters import add_lora, load_lora, lora_state_dict, read_lora_config

    bare = add_lora(VGGTNetwork("tiny"), read_lora_config(path))
    load_lora(bare, path)
    assert lora_state_dict(bare).keys() == model.adapter_state_dict().keys()


def test_training_needs_depths_and_patch_multiples(batch):
    model = _module()
    from dataclasses import replace

    no_depth = replace(batch, inputs=replace(batch.inputs, depths=None))
    with pytest.raises(DataError, match="VGGTModule .*inputs.depths"):
        model.training_losses(no_depth)
    small = replace(batch, inputs=replace(batch.inputs, images=batch.inputs.images[..., :27, :27]))
    with pytest.raises(ShapeError, match="multiples of 14, got 27x27; set data.input_resolution"):
        model.training_losses(small)
    with pytest.raises(ConfigError, match="model.points_from"):
        _module(points_from="mesh")


def test_reconstruct_gives_world_cameras_and_masked_point_gaussians(batch):
    model = _module().eval()
    with torch.no_grad():
        rec = model.reconstruct(batch)
    B, S = batch.inputs.images.shape[:2]
    assert rec.cameras.batch_shape == (B, S) and rec.extras["frame"] == "world"
    # the alignment puts predicted camera 0 on the true one
    torch.testing.assert_close(rec.cameras.c2w[:, 0], batch.inputs.cameras.c2w[:, 0], atol=1e-4, rtol=0)
    g = rec.representation
    assert isinstance(g, Gaussians) and g.is_packed
    fg = (batch.inputs.masks[:, :, 0] >= 0.5).flatten(1).sum(1)
    assert (g.counts <= fg).all() and (g.counts > 0).all()
    assert g.colors.min() >= 0 and g.colors.max() <= 1
    # the points are the extras' depth unprojected with the (world) predicted cameras, at the mask's pixels
    H, W = batch.inputs.images.shape[-2:]
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    pix = torch.stack([u, v], -1).reshape(1, 1, -1, 2).expand(B, S, -1, -1).float()
    allpts = rec.cameras.unproject(pix, rec.extras["depth"].reshape(B, S, -1))
    keep0 = (batch.inputs.masks[0, :, 0] >= 0.5).reshape(-1)
    torch.testing.assert_close(g[0].means, allpts[0].reshape(-1, 3)[keep0], atol=1e-4, rtol=1e-4)
    out = model.render_reconstruction(rec, batch.targets.cameras)
    assert out["rgb"].shape == batch.targets.images.shape and torch.isfinite(out["rgb"]).all()


# ---------------------------------------------------------------------- pose metrics end to end
def test_recon3d_test_loop_reports_pose_metrics_of_predicted_cameras(cache, tmp_path):
    import lightning as L

    from recon3d.metrics import EvaluationProtocol

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _module(evaluation=EvaluationProtocol(image_metrics=["psnr"], geometry_preset="gtr"))
    planted = math.radians(40.0)
    real = model.reconstruct

    def reconstruct(batch):
        # the camera prediction replaced by the true rig in frame 0's camera frame at another
        # scale (as VGGT predicts it), with view 2 turned by 40 degrees about a world axis
        rel = relative_to_first(batch.inputs.cameras)
        c2w = rel.c2w.clone()
        c2w[..., :3, 3] *= 0.37
        P = torch.from_numpy(Rotation.from_rotvec([0.0, planted, 0.0]).as_matrix()).to(c2w)
        c2w[:, 2, :3, :3] = P @ c2w[:, 2, :3, :3]
        planted_cams = Cameras(c2w, rel.K, rel.width, rel.height)
        pv = model.predict_views

        def predict_views(images):
            out = pv(images)
            out["cameras"] = planted_cams
            return out

        model.predict_views = predict_views
        try:
            return real(batch)
        finally:
            del model.predict_views

    model.reconstruct = reconstruct
    dm = _datamodule(cache, num_test_objects=2, batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(str(tmp_path), name="", version="run"),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.test(model, datamodule=dm, verbose=False)
    table = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    # 3 views: pairs (0, 2) and (1, 2) are 40 degrees off, (0, 1) exact; centres untouched
    # float32 cameras: arccos near 1 resolves ~0.03 degrees on the exact pair
    assert table["metrics"]["rre"] == pytest.approx(80.0 / 3, abs=0.05)
    assert table["metrics"]["te"] == pytest.approx(0.0, abs=1e-4)
    assert table["metrics"]["acc@15"] == pytest.approx(1 / 3) and table["metrics"]["acc@30"] == pytest.approx(1 / 3)
    assert len(table["per_object"]) == 2 and all("rre" in r and "psnr" in r for r in table["per_object"])


def test_official_weights_load_strictly_before_the_adapters(tmp_path):
    from recon3d.errors import CheckpointError

    torch.manual_seed(7)
    released = VGGTNetwork("tiny").state_dict()
    released["track_head.fnet.weight"] = torch.zeros(2)  # upstream's track head: skipped by name
    torch.save(released, tmp_path / "model.pt")
    model = _module(official_weights=str(tmp_path / "model.pt"))
    sd = model.net.state_dict()
    assert torch.equal(sd["aggregator.camera_token"], released["aggregator.camera_token"])
    # an adapted projection keeps the released weight as peft's base layer
    assert torch.equal(sd["aggregator.global_blocks.1.attn.qkv.base_layer.weight"], released["aggregator.global_blocks.1.attn.qkv.weight"])
    torch.save({f"module.{k}": v for k, v in released.items()}, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="expected aggregator"):
        _module(official_weights=str(tmp_path / "wrong.pt"))


def test_merged_adapters_compute_the_adapted_network_and_resize_reconstructs_other_sizes(batch):
    import torch.nn.functional as F

    from recon3d.data.batch import Views

    model = _module()
    opt = model.configure_optimizers()
    model.train()
    model.training_losses(batch)["loss"].backward()
    opt.step()  # B != 0 now: the adapters change the outputs
    model.eval()
    images = batch.inputs.images
    with torch.no_grad():
        adapted = model.predict_views(images)["pose_enc"]
        model.merge_adapters()
        merged = model.predict_views(images)["pose_enc"]
    assert not lora_layers(model.net)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    # a network with resize=True takes 30 x 30 inputs (resized to 28 inside, one warning); cameras at 30 x 30
    sized = _module(network=VGGTNetwork("tiny", resize=True)).eval()
    B, S = images.shape[:2]
    up = lambda x: F.interpolate(x.flatten(0, 1), size=(30, 30), mode="bilinear", align_corners=False).unflatten(0, (B, S))  # noqa: E731
    views = Views(up(images).clamp(0, 1), batch.inputs.cameras.resized(30, 30), up(batch.inputs.masks).clamp(0, 1))
    from dataclasses import replace

    with pytest.warns(UserWarning, match="30x30 is not a multiple of the patch size 14; resized to 28x28"), torch.no_grad():
        rec = sized.reconstruct(replace(batch, inputs=views))
    assert (rec.cameras.width, rec.cameras.height) == (30, 30) and (rec.representation.counts > 0).all()


def test_an_exact_prediction_reconstructs_the_true_points_and_cameras_in_the_world(batch):
    from recon3d.models.vggt.cameras import pose_encoding_to_cameras

    # the "prediction": the training targets (frame 0's camera frame, VGGT's scale)
    tg = vggt_targets(batch.inputs.cameras, batch.inputs.depths)
    H, W = batch.inputs.images.shape[-2:]
    model = _module().eval()
    pv = model.predict_views

    def exact(images):
        out = pv(images)
        out["cameras"] = pose_encoding_to_cameras(tg["pose_enc"], H, W)
        out["depth"] = tg["depth"] + (tg["depth"] == 0).float()  # empty pixels: any depth (masked out)
        return out

    model.predict_views = exact
    with torch.no_grad():
        rec = model.reconstruct(batch)
    torch.testing.assert_close(rec.cameras.c2w, batch.inputs.cameras.c2w, atol=1e-4, rtol=0)
    B, S = batch.inputs.images.shape[:2]
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    pix = torch.stack([u, v], -1).reshape(1, 1, -1, 2).expand(B, S, -1, -1).float()
    world = batch.inputs.cameras.unproject(pix, batch.inputs.depths[:, :, 0].reshape(B, S, -1))
    for b in range(B):
        keep = (batch.inputs.masks[b, :, 0] >= 0.5).reshape(-1)
        torch.testing.assert_close(rec.representation[b].means, world[b].reshape(-1, 3)[keep], atol=1e-3, rtol=1e-4)


def test_bf16_autocast_trains_and_reconstructs_with_float32_geometry(batch):
    model = _module()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = model.training_losses(batch)  # targets' frames in float32: valid rotations
        terms["loss"].backward()
        model.eval()
        with torch.no_grad():
            rec = model.reconstruct(batch)
    assert all(torch.isfinite(v) for v in terms.values())
    assert rec.representation.means.dtype == torch.float32 and rec.cameras.c2w.dtype == torch.float32


def test_quantile_filter_keeps_values_below_the_nearest_rank_quantile():
    import numpy as np

    from recon3d.models.vggt.loss import quantile_filter

    v = torch.rand(3000, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 10
    v[:5] = 1e4  # outliers, clamped at 100 first
    k = int(round(0.98 * (v.numel() - 1))) + 1
    thr = np.sort(np.minimum(v.numpy(), 100))[k - 1]
    kept = quantile_filter(v, 0.98)
    ref = np.minimum(v.numpy(), 100)
    assert kept.numel() == int((ref < thr).sum()) and float(kept.max()) < thr
    assert float(kept.mean()) == pytest.approx(float(ref[ref < thr].mean()))
    assert torch.equal(quantile_filter(v[:1000], 0.98), v[:1000])  # <= 1000 values: unchanged
    assert torch.equal(quantile_filter(v, None), v)
