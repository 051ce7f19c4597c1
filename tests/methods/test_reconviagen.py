"""ReconViaGen in recon3d (recon3d.methods.reconviagen): the SS-flow (GGC) and SLAT-flow (PVC)
stages lower their losses, ReconViaGenModule samples a non-empty structure and writes a Gaussian
.ply and a mesh .glb that re-open with predicted cameras, RVC lowers the input-view loss of the
final sample against plain sampling from the same noise, single-view / mask-less / bad inputs,
stage checkpoints (LoRA merged) load into the sampler."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from recon3d.errors import ConfigError, DataError
from recon3d.methods.reconviagen import (
    ReconViaGenModule,
    ReconViaGenSLatFlowModule,
    ReconViaGenSSFlowModule,
    derive_masks,
    load_stage_weights,
)
from recon3d.models.reconviagen import GlobalGeometryCondition, LinearPerViewCondition, PerViewCondition
from recon3d.models.trellis import SLatFlowModel, SparseStructureDecoder, SparseStructureEncoder, SparseStructureFlowModel
from recon3d.models.trellis.slat_decoders import SLatGaussianDecoder
from recon3d.models.vggt import VGGTNetwork
from recon3d.representations import Gaussians
from tests.methods._trellis_tiny import (
    randomize_zero_init,
    synthetic_batch,
    tiny_dino,
    tiny_gs_decoder,
    tiny_slat_encoder,
    tiny_slat_flow,
    tiny_ss_decoder,
    tiny_ss_encoder,
    tiny_ss_flow,
    train_steps,
)

VGGT_LAYERS = [0, 1, 2, 3]  # the tiny VGGT has 4 aggregator layers (paper: [4, 11, 17, 23] of 24)


def _vggt() -> VGGTNetwork:
    torch.manual_seed(0)
    return VGGTNetwork("tiny")  # width 32 -> tokens 64 wide


def _ggc() -> GlobalGeometryCondition:
    torch.manual_seed(1)
    return GlobalGeometryCondition(channels=16, vggt_channels=64, num_tokens=8, num_heads=2, mlp_ratio=2, layers=VGGT_LAYERS,
                                   init_std=0.02)


def _pvc() -> PerViewCondition:
    torch.manual_seed(2)
    return PerViewCondition(channels=16, vggt_channels=64, num_tokens=6, num_heads=2, mlp_ratio=2, layers=VGGT_LAYERS, init_std=0.02)


def _ss_flow() -> SparseStructureFlowModel:
    return tiny_ss_flow(seed=3)


def _slat_flow() -> SLatFlowModel:
    return tiny_slat_flow(seed=4)


def _encoder() -> SparseStructureEncoder:
    return tiny_ss_encoder(seed=5)


def _decoder() -> SparseStructureDecoder:
    return tiny_ss_decoder(seed=6, out_bias=0.5)  # logits mostly > 0: a non-empty structure from any latent


def _gs_decoder() -> SLatGaussianDecoder:
    dec = tiny_gs_decoder(2, seed=7, attn_mode="full", scaling_bias=0.04, opacity_bias=0.5)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():  # colours that depend on the latent (a fresh decoder's output layer is zero)
        dec.out_layer.weight.copy_(0.3 * torch.randn(dec.out_layer.weight.shape, generator=g))
    return dec


def _module(**kw) -> ReconViaGenModule:
    args = dict(vggt=_vggt(), ss_flow=_ss_flow(), ss_decoder=_decoder(), slat_flow=_slat_flow(), ggc=_ggc(), pvc=_pvc(),
                ss_encoder=_encoder(), ss_sampler={"steps": 2}, slat_sampler={"steps": 4}, lr=1e-2)
    args.update(kw)
    return ReconViaGenModule(**args)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Two synthetic objects: meshes, 2 input + 2 target views with masks and cameras, 28 px (VGGT tiny)."""
    return synthetic_batch(tmp_path_factory.mktemp("rvg_cache"), resolution=28, num_target_views=2, with_geometry=True)


def _one(batch, views=(0,), masks=True, cameras=True):
    inp = batch.inputs
    v = list(views)
    return replace(batch, inputs=replace(inp, images=inp.images[:1, v], masks=inp.masks[:1, v] if masks else None,
                                         cameras=inp.cameras[:1, v] if cameras else None, depths=None, normals=None),
                   targets=replace(batch.targets, images=batch.targets.images[:1], masks=batch.targets.masks[:1],
                                   cameras=batch.targets.cameras[:1], depths=None, normals=None),
                   object_ids=batch.object_ids[:1], background=batch.background[:1] if batch.background is not None else None,
                   geometry=batch.geometry)


# ---------------------------------------------------------------------------------- stages
def test_ss_flow_stage_lowers_its_loss_training_the_ggc_not_vggt(batch):
    m = ReconViaGenSSFlowModule(_ss_flow(), _ggc(), _vggt(), _encoder(), flow_finetune="full", lr=1e-2)
    vggt0 = {k: v.clone() for k, v in m.vggt.state_dict().items()}
    ggc0 = m.ggc.multiview_cond_tokens.detach().clone()
    losses = train_steps(m, batch, 4)
    assert min(losses[-2:]) < losses[0], losses
    assert all(torch.equal(v, m.vggt.state_dict()[k]) for k, v in vggt0.items())  # frozen
    assert not torch.equal(ggc0, m.ggc.multiview_cond_tokens)  # the condition net trains
    assert m.objective.p_uncond == 0.3 and m.objective.dropout == "object"  # paper default
    off = ReconViaGenSSFlowModule(_ss_flow(), _ggc(), _vggt(), _encoder(), flow_finetune="full", objective="official",
                                  random_views=True)
    assert (off.objective.p_uncond, off.objective.dropout, off.objective.t_per) == (0.1, "batch", "batch")
    views = off.train_views(batch, [torch.Generator().manual_seed(s) for s in range(2)])
    assert 1 <= len(views) <= 2 and views == sorted(set(views))


def test_slat_flow_stage_with_per_view_conditions_lowers_its_loss(batch):
    enc = tiny_slat_encoder(seed=9)
    with torch.no_grad():  # latents that vary over the voxels (a fresh encoder's output layer is zero)
        enc.out_layer.weight.normal_(0, 0.5)
    m = ReconViaGenSLatFlowModule(_slat_flow(), enc, tiny_dino(), _pvc(), _vggt(), flow_finetune="full", lr=1e-2,
                                  slat_mean=[0.0] * 4, slat_std=[1.0] * 4)
    w0 = [p.detach().clone() for n, p in m.flow.named_parameters() if ".view_weight." in n]
    assert w0, "paper mode installs the per-view weight MLPs"
    losses = train_steps(m, batch, 5)
    assert min(losses[-2:]) < losses[0], losses
    assert any(not torch.equal(a, p) for a, p in zip(w0, [p for n, p in m.flow.named_parameters() if ".view_weight." in n]))
    assert m.pvc.view_cond_tokens.grad is not None


def test_lora_stage_checkpoint_is_merged_into_the_sampler(batch, tmp_path):
    flow = randomize_zero_init(_ss_flow(), scale=0.1)  # a stand-in for released weights: LoRA acts on them
    m = ReconViaGenSSFlowModule(flow, _ggc(), _vggt(), _encoder(), flow_finetune="lora", lora_rank=4, lora_alpha=8.0, lr=1e-2)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("ggc.") for n in trainable)
    train_steps(m, batch, 2)
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert ckpt["reconviagen_lora"]["flow"] == {"r": 4, "alpha": 8.0, "targets": ["to_q", "to_kv", "to_out", "to_qkv"]}
    torch.save(ckpt, tmp_path / "ss.ckpt")
    fresh, ggc = _ss_flow(), _ggc()
    assert load_stage_weights({"flow.": fresh, "ggc.": ggc}, str(tmp_path / "ss.ckpt")) == ["flow.", "ggc."]
    assert not any(".lora_" in k for k in fresh.state_dict())  # merged: plain weights
    x, t, c = torch.randn(2, 4, 4, 4, 4), torch.tensor([500.0, 200.0]), torch.randn(2, 8, 16)
    m.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(x, t, c), m.flow(x, t, c), atol=1e-5)
        assert torch.equal(ggc.multiview_cond_tokens, m.ggc.multiview_cond_tokens)


# ---------------------------------------------------------------------------------- sampling
def test_sampling_gives_voxels_files_and_predicted_cameras(batch, tmp_path):
    import trimesh
    from plyfile import PlyData

    model = _module(gaussian_decoder=_gs_decoder()).eval()
    rec = model.reconstruct(batch)
    vox = rec.get("voxels")
    assert vox.num_voxels > 0 and all(int(c) > 0 for c in vox.counts)
    g = rec.representation
    assert isinstance(g, Gaussians) and g.counts.tolist() == [2 * int(c) for c in vox.counts]  # 2 Gaussians per voxel
    assert rec.cameras is not None and tuple(rec.cameras.batch_shape) == (2, 2)
    # predicted camera 0 is put on the true camera 0 (the camera-0 + scale registration)
    assert torch.allclose(rec.cameras.c2w[:, 0], batch.inputs.cameras.c2w[:, 0], atol=1e-4)
    files = model.export_reconstruction(rec.select(0), tmp_path)
    assert set(files) == {"gaussians.ply", "mesh.glb"}
    assert PlyData.read(files["gaussians.ply"])["vertex"].count == int(g.counts[0])
    assert len(trimesh.load(files["mesh.glb"], force="mesh").faces) > 0
    again = model.reconstruct(batch)  # per-object seeds
    assert torch.equal(again.get("slat").feats, rec.get("slat").feats)


@pytest.mark.slow  # ~4 s on 2 cores: two SLAT samplings with 3 rendered RVC steps
def test_rvc_lowers_the_input_view_loss_against_plain_sampling_from_the_same_noise(batch):
    model = _module(gaussian_decoder=_gs_decoder(), rvc={"alpha": 30.0, "start_t": 0.8, "drop_threshold": 2.0},
                    rvc_cameras="inputs", rvc_reference=True, slat_sampler={"steps": 4, "rescale_t": 1.0})
    train_steps(model, batch, 2)  # "a model trained a little"
    rec = model.eval().reconstruct(_one(batch, (0, 1)))
    r = rec.get("rvc")
    assert [h["applied"] for h in r["history"]] == [False, True, True, True]  # t = 1, 0.75, 0.5, 0.25 vs start_t 0.8
    assert float(r["view_loss"].mean()) < float(r["view_loss_without_rvc"].mean()) - 1e-3, r
    # planted wrong threshold: every view dropped -> no correction, finite, counted
    model.rvc = {"alpha": 30.0, "start_t": 0.8, "drop_threshold": 0.0}
    r0 = model.reconstruct(_one(batch, (0, 1))).get("rvc")
    assert r0["all_dropped"] == 3 and torch.allclose(r0["view_loss"], r0["view_loss_without_rvc"], atol=1e-5)


def test_a_single_view_without_mask_works_and_derived_masks_match_the_true_ones(batch):
    model = _module().eval()
    one = _one(batch, (0,), masks=False, cameras=False)
    rec = model.reconstruct(one)
    assert rec.get("voxels").num_voxels > 0 and tuple(rec.cameras.batch_shape) == (1, 1)
    derived = derive_masks(batch.inputs.images, batch.background) > 0.5
    true = batch.inputs.masks > 0.5
    iou = float((derived & true).sum() / (derived | true).sum())
    assert iou > 0.9, iou


def test_bad_inputs_and_options_are_one_line_errors(batch):
    one = _one(batch, (0,), masks=False)
    blank = replace(one, inputs=replace(one.inputs, images=torch.ones_like(one.inputs.images)))
    with pytest.raises(DataError, match="mask_tol"):
        _module().eval().reconstruct(blank)
    with pytest.raises(Exception, match="multiples of 14"):
        _module().eval().reconstruct(replace(one, inputs=replace(one.inputs, images=one.inputs.images[..., :27, :27], cameras=None)))
    with pytest.raises(ConfigError, match="gaussian_decoder"):
        _module(rvc={"alpha": 0.1})
    with pytest.raises(ConfigError, match="unknown VelocityCompensation"):
        _module(gaussian_decoder=_gs_decoder(), rvc={"alhpa": 0.1})
    with pytest.raises(ConfigError, match="cond_channels"):
        _module(pvc=PerViewCondition(channels=8, vggt_channels=64, num_tokens=4, num_heads=2, layers=VGGT_LAYERS))
    with pytest.raises(ConfigError, match="VGGT's token width"):
        _module(ggc=GlobalGeometryCondition(channels=16, vggt_channels=32, num_tokens=4, num_heads=2, layers=VGGT_LAYERS))
    with pytest.raises(ConfigError, match="DINOv2"):
        _module(pvc=LinearPerViewCondition(channels=16, vggt_channels=64, layers=VGGT_LAYERS))
    with pytest.raises(ConfigError, match="sampler_preset"):
        _module(sampler_preset="demo")
    model = _module(gaussian_decoder=_gs_decoder(), rvc={"alpha": 0.1}, rvc_cameras="inputs").eval()
    with pytest.raises(DataError, match="inputs.cameras"):
        model.reconstruct(_one(batch, (0,), cameras=False))


@pytest.mark.slow  # ~6 s on 2 cores: plain sampling, orbit renders through VGGT, one PnP round, RVC sampling
def test_rvc_at_nearest_render_cameras_runs_under_inference_mode_and_reports_them(batch):
    model = _module(gaussian_decoder=_gs_decoder(), rvc={"alpha": 1.0, "drop_threshold": 2.0}, rvc_cameras="nearest_render",
                    n_renders=4, pose_refine={"rounds": 1}).eval()
    with torch.inference_mode():  # Lightning's predict loop
        rec = model.reconstruct(_one(batch, (0, 1)))
    info = rec.get("rvc")["cameras"]
    assert info["source"] == "nearest_render" and tuple(info["nearest_render"].shape) == (1, 2)
    assert int(info["nearest_render"].min()) >= 0 and int(info["nearest_render"].max()) < 4
    # the reported input cameras are the object-frame ones RVC used: each is one of the orbit poses
    # (or its PnP refinement; a failed refinement keeps the orbit pose, as recorded)
    from recon3d.models.reconviagen import NearestRenderStart

    orbit = NearestRenderStart(4, model.render_radius, model.render_fov).orbit(28, 28)
    for v in range(2):
        if info["pose_fallback"][0][v]:
            assert torch.allclose(rec.cameras.c2w[0, v], orbit.c2w[int(info["nearest_render"][0, v])], atol=1e-5)
    assert torch.isfinite(rec.get("rvc")["view_loss"]).all()


def test_ggc_only_row_conditions_the_slat_flow_on_dino_tokens_trellis_m_style(batch):
    from recon3d.models.flow import FlowEulerSampler

    model = _module(pvc=None, condition=tiny_dino()).eval()
    rec = model.reconstruct(batch)
    assert rec.get("voxels").num_voxels > 0
    c = model.conditions(batch)
    assert isinstance(c["slat"], list) and len(c["slat"]) == 2 and c["slat"][0].shape == (2, 9, 16)  # cls + 4 registers + 2 x 2 patches
    sampler, cond = model._sampler(model.slat_sampler_params, c["slat"])
    assert isinstance(sampler, FlowEulerSampler) and sampler.multi_condition == "multidiffusion" and cond is c["slat"]
    assert model._sampler(model.slat_sampler_params, c["slat"][:1])[0].multi_condition is None  # one view: single-image
