"""TRELLIS in recon3d (recon3d.methods.trellis): the SS-VAE and SS-flow stages lower their losses
on the synthetic set, TrellisModule samples a non-empty structure and writes a Gaussian .ply and a
mesh .glb that re-open, TRELLIS-S / -M differ only as specified, the frame map, the surface
voxeliser against the analytic sphere, the DINOv2 conditioning's token layout and crop, and the
pipeline.json reader's errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from recon3d.errors import ConfigError, DataError
from recon3d.geometry.voxelize import surface_voxels
from recon3d.methods.trellis import (
    TrellisModule,
    TrellisSSFlowModule,
    TrellisSSVAEModule,
    gaussians_to_world,
    trellis_axes,
    trellis_to_world_points,
    trellis_voxels_to_world,
    world_to_trellis_points,
)
from recon3d.models.trellis import SLatFlowModel
from recon3d.models.trellis.conditioning import TrellisImageCondition, trellis_preprocess
from recon3d.models.trellis.pipeline_config import TRELLIS_IMAGE_LARGE_SLAT_NORMALIZATION, read_pipeline_json
from recon3d.representations import Gaussians, SparseVoxels
from recon3d.representations.gaussians import quat_to_rotmat
from tests.methods._trellis_tiny import (
    DINO,
    gs_representation,
    randomize_zero_init,
    save_state,
    synthetic_batch,
    tiny_dino,
    tiny_gs_decoder,
    tiny_slat_flow,
    tiny_ss_decoder,
    tiny_ss_encoder,
    tiny_ss_flow,
    train_steps,
    write_model_files,
)


def _trellis(random_flows: bool = False, **kw) -> TrellisModule:
    torch.manual_seed(0)
    ss, slat = tiny_ss_flow(), tiny_slat_flow()
    if random_flows:
        randomize_zero_init(ss), randomize_zero_init(slat)
    args = dict(condition=tiny_dino(), ss_flow=ss, ss_decoder=tiny_ss_decoder(), slat_flow=slat, ss_encoder=tiny_ss_encoder(),
                ss_sampler={"steps": 2}, slat_sampler={"steps": 2})
    args.update(kw)
    return TrellisModule(**args)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Two synthetic objects (meshes, 2 input views with masks, surface points) at 16 px."""
    return synthetic_batch(tmp_path_factory.mktemp("trellis_cache"), resolution=16, num_target_views=1)


# ---------------------------------------------------------------------------------- stages
def test_ss_vae_stage_lowers_dice_on_synthetic_surfaces(batch):
    torch.manual_seed(0)
    model = TrellisSSVAEModule(tiny_ss_encoder(), tiny_ss_decoder(), resolution=8, lr=1e-2)
    occ = model.surface_occupancy(batch, 8)
    assert occ.shape == (2, 1, 8, 8, 8) and 0 < float(occ.mean()) < 0.6  # a surface shell, not a solid or nothing
    rec = model.reconstruct(batch)  # (an early-training decode may be empty: checked on the fresh model)
    assert isinstance(rec.representation, SparseVoxels) and rec.representation.resolution == 8
    losses = train_steps(model, batch, 8)
    assert all(math.isfinite(x) for x in losses)
    assert min(losses[-3:]) < 0.8 * losses[0], losses
    terms = model.training_losses(batch)
    assert set(terms) == {"loss", "dice", "kl", "iou"}
    # loss = dice + 1e-3 KL, recomputed from the logged terms
    assert torch.allclose(terms["loss"], terms["dice"] + 1e-3 * terms["kl"])


def test_ss_flow_stage_lowers_the_flow_loss(batch):
    torch.manual_seed(0)
    model = TrellisSSFlowModule(tiny_ss_flow(), tiny_ss_encoder(), tiny_dino(), p_uncond=0.0, lr=3e-3)
    assert not any(p.requires_grad for p in model.ss_encoder.parameters())
    assert not any(p.requires_grad for p in model.condition.parameters())
    # Average over fixed draws: the objective's t and noise come from per-object generators
    # seeded by the step, so a fixed step (no trainer: 0) gives the same draws each time.
    losses = train_steps(model, batch, 10)
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_ss_flow_stage_loads_the_ss_vae_encoder_from_its_checkpoint(batch, tmp_path):
    vae = TrellisSSVAEModule(tiny_ss_encoder(), tiny_ss_decoder(), resolution=8)
    path = save_state(vae, tmp_path / "ss_vae.safetensors")
    flow = TrellisSSFlowModule(tiny_ss_flow(), tiny_ss_encoder(), tiny_dino(), ss_encoder_weights=str(path))
    for k, v in vae.encoder.state_dict().items():
        assert torch.equal(flow.ss_encoder.state_dict()[k], v), k


# ---------------------------------------------------------------------------------- TrellisModule
def test_trellis_samples_a_structure_and_exports_ply_and_glb(batch, tmp_path):
    import trimesh
    from plyfile import PlyData

    model = _trellis().eval()
    rec = model.reconstruct(batch)
    vox = rec.get("voxels")
    assert vox.num_voxels > 0 and all(int(c) > 0 for c in vox.counts)
    g = rec.representation
    assert isinstance(g, Gaussians) and g.counts.tolist() == vox.counts.tolist()
    # the structure Gaussians sit at the voxel centres, inside recon3d's cube
    assert float(g.packed().means.abs().max()) <= 1.0
    files = model.export_reconstruction(rec.select(0), tmp_path)
    assert set(files) == {"gaussians.ply", "mesh.glb"}
    assert PlyData.read(files["gaussians.ply"])["vertex"].count == int(vox.counts[0])
    mesh = trimesh.load(files["mesh.glb"], force="mesh")
    assert len(mesh.faces) > 0 and float(abs(mesh.vertices).max()) <= 1.0 + 2.0 / 8
    out = model.render_reconstruction(rec, batch.targets.cameras)
    assert out["rgb"].shape[:2] == batch.targets.images.shape[:2] and torch.isfinite(out["rgb"]).all()
    # reproducible per object (seeded by the object ids)
    again = model.reconstruct(batch)
    assert torch.equal(again.get("slat").feats, rec.get("slat").feats)
    # `recon3d export --format ply` sets export_formats: the Gaussians alone
    model.export_formats = ("ply",)
    assert set(model.export_reconstruction(rec.select(1), tmp_path / "only")) == {"gaussians.ply"}


def _views(batch, which: list[int]):
    from dataclasses import replace

    inp = batch.inputs
    pick = lambda x: None if x is None else x[:, which]
    return replace(batch, inputs=replace(inp, images=inp.images[:, which], masks=pick(inp.masks), cameras=None))


def test_stochastic_and_multidiffusion_differ_only_as_specified(batch):
    model = _trellis(True, ss_sampler={"steps": 2, "cfg_strength": 2.0}, slat_sampler={"steps": 2, "cfg_strength": 1.0}).eval()
    slat = lambda b, mode: model.reconstruct(b, mode=mode).get("slat").feats
    one = _views(batch, [0])
    single = slat(one, "stochastic")
    # one view: both modes are single-image sampling
    assert torch.equal(slat(one, "multidiffusion"), single)
    # the same image twice: the mean of equal velocities and the round-robin both give it back
    same = _views(batch, [0, 0])
    assert torch.equal(slat(same, "stochastic"), single)
    assert torch.equal(slat(same, "multidiffusion"), single)
    # two different views: the modes differ
    two = _views(batch, [0, 1])
    s, m = model.reconstruct(two, mode="stochastic"), model.reconstruct(two, mode="multidiffusion")
    assert not torch.equal(s.get("voxels").coords, m.get("voxels").coords) or not torch.allclose(s.get("slat").feats, m.get("slat").feats)


def test_stochastic_cycles_the_views_round_robin_multidiffusion_sees_all(batch):
    """TRELLIS-S: SS-flow step k sees view k mod V alone (upstream's cond_indices); TRELLIS-M:
    each step evaluates every view and, with guidance, the zero condition once."""
    model = _trellis(True, ss_sampler={"steps": 3, "cfg_strength": 0.0}).eval()
    seen = []
    forward = model.ss_flow.forward

    def spy(x, t, cond):
        seen.append(cond.clone())
        return forward(x, t, cond)

    model.ss_flow.forward = spy
    b = _views(batch, [0, 1])
    conds = model.conditions(b)
    gens = [torch.Generator().manual_seed(0) for _ in range(2)]
    model.sample_structure(conds, gens, list(b.object_ids), mode="stochastic")
    assert len(seen) == 3
    for k, c in enumerate(seen):
        assert torch.equal(c, conds[k % 2])
    # TRELLIS-M with guidance: every step sees every view, then the zero condition once
    seen.clear()
    model.ss_sampler_params = {**model.ss_sampler_params, "cfg_strength": 2.0, "cfg_interval": (0.0, 1.0)}
    model.sample_structure(conds, gens, list(b.object_ids), mode="multidiffusion")
    assert len(seen) == 3 * 3
    for k in range(3):
        a, c, neg = seen[3 * k : 3 * k + 3]
        assert torch.equal(a, conds[0]) and torch.equal(c, conds[1]) and not bool(neg.any())


def test_empty_structure_is_one_error_naming_the_object(batch):
    model = _trellis().eval()
    with torch.no_grad():
        conv = model.ss_decoder.out_layer[2]
        conv.weight.zero_()
        conv.bias.fill_(-5.0)  # every logit -5: no occupied voxel
    with pytest.raises(DataError, match=batch.object_ids[0]) as err:
        model.reconstruct(batch)
    assert "empty" in str(err.value) and len(str(err.value).splitlines()) == 1


def test_bad_parts_and_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="slat_flow"):
        _trellis(slat_flow=SLatFlowModel(16, 4, 32, 16, 4, num_blocks=1, num_heads=2, patch_size=2, num_io_res_blocks=1,
                                         io_block_channels=[16]))
    with pytest.raises(ConfigError, match="ss_sampler"):
        _trellis(ss_sampler={"step": 3})
    with pytest.raises(ConfigError, match="slat_std"):
        _trellis(slat_std=[1.0, 1.0, 0.0, 1.0])
    with pytest.raises(ConfigError, match="needs"):
        TrellisModule(condition=tiny_dino())
    with pytest.raises(ConfigError, match="up_axis"):
        _trellis(up_axis="x")


# ---------------------------------------------------------------------------------- frames
@pytest.mark.parametrize("up", ["z", "y"])
def test_frame_map_is_a_scaled_rotation_taking_trellis_up_to_the_dataset_up(up):
    A = trellis_axes(up)
    assert torch.allclose(A @ A.T, torch.eye(3)) and abs(float(torch.det(A)) - 1) < 1e-6
    up_vec = torch.tensor([0.0, 0.0, 1.0]) if up == "z" else torch.tensor([0.0, 1.0, 0.0])
    assert torch.allclose(trellis_to_world_points(torch.tensor([0.0, 0.0, 0.5]), up), up_vec)  # top of TRELLIS's cube
    p = torch.rand(10, 3) - 0.5
    assert torch.allclose(world_to_trellis_points(trellis_to_world_points(p, up), up), p, atol=1e-6)
    # voxel cells: the recon3d cell of a TRELLIS voxel holds the mapped centre
    R = 8
    coords = torch.cat([torch.zeros(5, 1, dtype=torch.int32), torch.randint(0, R, (5, 3), dtype=torch.int32)], 1)
    v = SparseVoxels(coords, torch.zeros(5, 1), R, 1)
    centre_t = (coords[:, 1:].double() + 0.5) / R - 0.5
    assert torch.allclose(trellis_voxels_to_world(v, up).centers().double(), trellis_to_world_points(centre_t, up), atol=1e-6)
    # Gaussians: covariance rotates with the frame, Sigma_w = 4 A Sigma_t A^T
    q = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    g = Gaussians(torch.rand(5, 3) - 0.5, q, torch.rand(5, 3) + 0.1, torch.rand(5), torch.rand(5, 3), counts=[5])
    w = gaussians_to_world(g, up)
    cov = lambda x: quat_to_rotmat(x.quats) @ torch.diag_embed(x.scales**2) @ quat_to_rotmat(x.quats).transpose(-1, -2)
    assert torch.allclose(cov(w), 4 * A @ cov(g) @ A.T, atol=1e-5)


# ---------------------------------------------------------------------------------- voxeliser
def test_surface_voxels_of_a_sphere_match_the_analytic_shell():
    import trimesh

    s = trimesh.creation.icosphere(subdivisions=3, radius=0.7)
    R, h = 24, 2.0 / 24
    occ = surface_voxels(torch.as_tensor(s.vertices), torch.as_tensor(s.faces), R)
    idx = torch.stack(torch.meshgrid(*[torch.arange(R)] * 3, indexing="ij"), -1).double()
    centres = (idx + 0.5) * h - 1
    d = (centres.norm(dim=-1) - 0.7).abs()
    # every marked voxel is within a half diagonal of the (polyhedral) sphere; every voxel whose
    # centre is within 0.3 voxel of it is marked
    assert bool((d[occ] <= h * math.sqrt(3) / 2 + 0.01).all())
    assert bool(occ[d < 0.3 * h].all())
    # a shell: the centre and the corners are empty
    assert not occ[R // 2, R // 2, R // 2] and not occ[0, 0, 0]


# ---------------------------------------------------------------------------------- conditioning
def test_condition_tokens_are_cls_registers_patches_after_a_plain_layer_norm():
    torch.manual_seed(0)
    cond = TrellisImageCondition(config={**DINO, "image_size": 518})
    images = torch.rand(1, 3, 40, 40)
    tok = cond(images)
    assert tok.shape == (1, 1 + 4 + 37 * 37, 16)  # TRELLIS: 1 cls + 4 registers + 1,369 patches at 518
    # non-affine LayerNorm (eps 1e-5) of the last block's output, by hand in float64
    with torch.no_grad():
        pre = cond.backbone(pixel_values=cond.prepare(images), output_hidden_states=True).hidden_states[-1].double()
    ref = (pre - pre.mean(-1, keepdim=True)) / torch.sqrt(pre.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(tok.double(), ref, atol=1e-4)
    # the backbone's own affine norm is not used: changing it leaves the tokens
    with torch.no_grad():
        cond.backbone.layernorm.weight.mul_(3.0)
    assert torch.equal(cond(images), tok)
    assert cond.patch_features(images).shape == (1, 16, 37, 37)


def test_preprocess_crops_the_opaque_box_by_1_2_and_premultiplies_on_black():
    H = 60
    mask = torch.zeros(1, 1, H, H)
    mask[..., 20:40, 10:30] = 1.0  # a 20 x 20 object
    rgb = torch.tensor([0.2, 0.6, 0.4]).view(1, 3, 1, 1).expand(1, 3, H, H)
    white = rgb * mask + (1 - mask)  # composited on white, as recon3d's views
    out = trellis_preprocess(white, mask, torch.ones(3), size=48)
    # box side int(19 * 1.2) = 22 pixels around the object's centre: the object covers 20/22 of it
    # (PIL's crop rounds the half-integer box: here [8, 30) x [18, 40))
    fg = out[0, 1] > 0.3  # green channel 0.6 inside, 0 outside: half-way
    frac = float(fg.float().mean())
    assert abs(frac - (20 / 22) ** 2) < 0.03, frac
    # premultiplied: object colour inside, black (not white) outside
    assert torch.allclose(out[0, :, 24, 24], torch.tensor([0.2, 0.6, 0.4]), atol=1e-3)
    assert float(out[0, :, 0, 0].abs().max()) < 1e-6


# ---------------------------------------------------------------------------------- pipeline.json
def _pipeline(**over) -> dict:
    sampler = {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5},
               "params": {"steps": 25, "cfg_strength": 7.5, "cfg_interval": [0.5, 1.0], "rescale_t": 3.0}}
    args = {"models": {"sparse_structure_decoder": "ckpts/ss_dec", "sparse_structure_flow_model": "ckpts/ss_flow",
                       "slat_flow_model": "ckpts/slat_flow"},
            "sparse_structure_sampler": sampler, "slat_sampler": {**sampler, "params": {**sampler["params"], "cfg_strength": 3.0}},
            "slat_normalization": TRELLIS_IMAGE_LARGE_SLAT_NORMALIZATION, "image_cond_model": "dinov2_vitl14_reg"}
    args.update(over)
    return {"name": "TrellisImageTo3DPipeline", "args": args}


def test_pipeline_json_is_read_and_its_errors_name_file_and_key(tmp_path):
    p = tmp_path / "pipeline.json"
    p.write_text(json.dumps(_pipeline()))
    cfg = read_pipeline_json(tmp_path)
    assert cfg.slat_sampler.params["cfg_strength"] == 3.0 and cfg.sparse_structure_sampler.params["cfg_interval"] == (0.5, 1.0)
    assert cfg.model_json("slat_flow_model") == (tmp_path / "ckpts/slat_flow.json").resolve()
    assert len(cfg.slat_mean) == 8
    bad = _pipeline()
    del bad["args"]["slat_normalization"]
    p.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"pipeline.json: missing key args\.'slat_normalization'"):
        read_pipeline_json(p)
    p.write_text(json.dumps({**_pipeline(), "name": "TrellisTextTo3DPipeline"}))
    with pytest.raises(ConfigError, match="unknown pipeline class 'TrellisTextTo3DPipeline'"):
        read_pipeline_json(p)
    bad = _pipeline()
    bad["args"]["slat_sampler"]["name"] = "FlowHeunSampler"
    p.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="slat_sampler.name names an unknown sampler class 'FlowHeunSampler'"):
        read_pipeline_json(p)
    with pytest.raises(ConfigError, match="not found"):
        read_pipeline_json(tmp_path / "nowhere")


def test_trellis_module_loads_its_networks_from_a_pipeline_folder(tmp_path):
    ck = tmp_path / "ckpts"
    ck.mkdir()
    torch.manual_seed(1)
    nets = {"ss_dec": tiny_ss_decoder(), "ss_flow": tiny_ss_flow(), "slat_flow": tiny_slat_flow(),
            "gs_dec": randomize_zero_init(tiny_gs_decoder(4, seed=2))}
    args = {"ss_dec": {"name": "SparseStructureDecoder", "args": {"out_channels": 1, "latent_channels": 4, "num_res_blocks": 1,
                                                                  "channels": [16, 8], "num_res_blocks_middle": 1, "use_fp16": True}},
            "ss_flow": {"name": "SparseStructureFlowModel", "args": {
                "resolution": 4, "in_channels": 4, "model_channels": 32, "cond_channels": 16, "out_channels": 4, "num_blocks": 1,
                "num_heads": 2, "mlp_ratio": 2, "patch_size": 1, "qk_rms_norm": True, "use_fp16": True}},
            "slat_flow": {"name": "SLatFlowModel", "args": {
                "resolution": 8, "in_channels": 4, "model_channels": 32, "cond_channels": 16, "out_channels": 4, "num_blocks": 1,
                "num_heads": 2, "mlp_ratio": 2, "patch_size": 2, "num_io_res_blocks": 1, "io_block_channels": [16],
                "qk_rms_norm": True, "use_fp16": True}},
            "gs_dec": {"name": "SLatGaussianDecoder", "args": {
                "resolution": 8, "model_channels": 32, "latent_channels": 4, "num_blocks": 1, "num_heads": 2, "mlp_ratio": 2,
                "window_size": 4, "representation_config": gs_representation(num_gaussians=4), "use_fp16": True}}}
    for name, net in nets.items():
        write_model_files(ck, name, net, args[name])
    norm = {"mean": [0.5, -1.0, 0.0, 2.0], "std": [1.0, 2.0, 0.5, 1.5]}
    pipe = _pipeline(slat_normalization=norm)
    pipe["args"]["models"]["slat_decoder_gs"] = "ckpts/gs_dec"
    (tmp_path / "pipeline.json").write_text(json.dumps(pipe))
    model = TrellisModule(condition=tiny_dino(), pipeline=str(tmp_path))
    for name, part in (("ss_dec", model.ss_decoder), ("ss_flow", model.ss_flow), ("slat_flow", model.slat_flow),
                       ("gs_dec", model.gaussian_decoder)):
        for k, v in nets[name].state_dict().items():
            assert torch.equal(part.state_dict()[k], v), (name, k)
    # the fixed networks are frozen parts (checkpoints re-read them), the SS flow trains
    assert {"ss_decoder", "slat_flow", "gaussian_decoder"} <= set(model.frozen_pretrained()) and "ss_flow" not in model.frozen_pretrained()
    assert model.ss_sampler_params["steps"] == 25 and model.slat_sampler_params["cfg_strength"] == 3.0
    assert model.slat_std.tolist() == norm["std"] and model.slat_mean.tolist() == norm["mean"]
    # a json naming a class recon3d does not know: one line naming the file
    (ck / "ss_dec.json").write_text(json.dumps({"name": "SparseStructureDecoderV9", "args": {}}))
    with pytest.raises(ConfigError, match=r"ss_dec.json.*unknown TRELLIS model class 'SparseStructureDecoderV9'"):
        TrellisModule(condition=tiny_dino(), pipeline=str(tmp_path))


def test_paper_config_uses_trellis_image_large_sizes():
    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/trellis.yaml").read_text())["model"]["init_args"]
    assert cfg["ss_flow"]["init_args"]["model_channels"] == 1024 and cfg["ss_flow"]["init_args"]["num_blocks"] == 24
    assert cfg["slat_flow"]["init_args"]["resolution"] == 64 and cfg["slat_flow"]["init_args"]["io_block_channels"] == [128]
    assert cfg["ss_decoder"]["init_args"]["channels"] == [512, 128, 32]
    assert cfg["slat_mean"] == TRELLIS_IMAGE_LARGE_SLAT_NORMALIZATION["mean"]


# ---------------------------------------------------------------------------------- TRELLIS's decoders
def test_gaussian_decoder_output_lands_around_its_voxels_in_recon3d_frame(batch):
    model = _trellis(gaussian_decoder=randomize_zero_init(tiny_gs_decoder(4, seed=2))).eval()
    rec = model.reconstruct(batch)
    vox, g = rec.get("voxels"), rec.representation.packed()
    assert g.counts.tolist() == (vox.counts * 4).tolist()
    # TRELLIS: |offset| <= 0.5 * voxel_size(1.5) / R in its unit cube, so in recon3d's cube every
    # Gaussian is within 2 * 0.75 / R of its voxel's centre (voxel-major order, 4 per voxel)
    centres = vox.centers().repeat_interleave(4, 0)
    assert float((g.means - centres).abs().max()) <= 1.5 / 8 + 1e-6
    assert g.sh_degree == 0 and torch.isfinite(model.render_reconstruction(rec, batch.targets.cameras)["rgb"]).all()


def test_decoder_sizes_must_match_the_slat_flow():
    with pytest.raises(ConfigError, match="gaussian_decoder: resolution 16 differs from slat_flow.resolution 8"):
        from recon3d.models.trellis import SLatGaussianDecoder

        _trellis(gaussian_decoder=SLatGaussianDecoder(16, 32, 4, 1, num_heads=2, window_size=4))


def test_trellis_with_both_trellis_decoders_exports_ply_and_glb(batch, tmp_path):
    import trimesh
    from plyfile import PlyData

    from recon3d.models.trellis import SLatMeshDecoder

    torch.manual_seed(4)
    mesh_dec = SLatMeshDecoder(8, 256, 4, 1, num_heads=4, mlp_ratio=1, window_size=4, representation_config={"use_color": True})
    model = _trellis(gaussian_decoder=tiny_gs_decoder(4, seed=2), mesh_decoder=mesh_dec).eval()
    with torch.no_grad():  # a small structure (a 3^3 block per object): the mesh decoder subdivides every voxel 64 x
        conv = model.ss_decoder.out_layer[2]
        conv.weight.zero_()
        conv.bias.fill_(-1.0)
    orig = model.ss_decoder.forward

    def block(z):
        out = orig(z)
        out[:, :, 2:5, 2:5, 2:5] = 1.0
        return out

    model.ss_decoder.forward = block
    rec = model.reconstruct(batch)
    assert rec.get("voxels").counts.tolist() == [27, 27]
    files = model.export_reconstruction(rec.select(0), tmp_path)
    assert PlyData.read(files["gaussians.ply"])["vertex"].count == 27 * 4
    mesh = trimesh.load(files["mesh.glb"], force="mesh")
    # the mesh decoder's surface stays within the structure's cells (voxels 2..4 of 8: [-0.5, 0.25] in recon3d's cube)
    assert len(mesh.faces) > 0 and mesh.vertices.min() >= -0.5 - 0.1 and mesh.vertices.max() <= 0.25 + 0.1


def test_bench_trellis_tables_run_at_tiny_sizes():
    from benchmarks import bench_trellis

    ss = bench_trellis.ss_flow_rows((2, 4), width=16, cond_tokens=4, repeats=1)
    assert [r["tokens"] for r in ss] == [8, 64] and all(r["eval"] > 0 and r["train"] > 0 for r in ss)
    sl = bench_trellis.slat_flow_rows((64, 128), width=16, cond_tokens=4, repeats=1)
    assert [r["voxels"] for r in sl] == [64, 128] and all(0 < r["tokens"] <= r["voxels"] for r in sl)
    # the shell voxels are distinct cells of the 64^3 grid
    xyz = bench_trellis._shell_voxels(500)
    assert torch.unique(xyz, dim=0).shape[0] == 500 and int(xyz.max()) < 64


@pytest.mark.slow  # transformers' save_pretrained + from_pretrained: ~4 s on the shared 2 cores
def test_dinov2_from_a_folder_is_a_frozen_part_left_out_of_checkpoints(tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    hf = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**DINO))
    hf.save_pretrained(str(tmp_path))
    cond = TrellisImageCondition(pretrained_path=str(tmp_path), image_size=28)
    for k, v in hf.state_dict().items():
        assert torch.equal(cond.backbone.state_dict()[k], v), k
    model = _trellis(condition=cond)
    assert "condition.backbone" in model.frozen_pretrained()
    with pytest.raises(Exception, match="not a directory"):
        TrellisImageCondition(pretrained_path=str(tmp_path / "missing"))


def test_part_weights_load_the_stages_checkpoints_into_trellis_module(tmp_path):
    torch.manual_seed(5)
    vae = TrellisSSVAEModule(tiny_ss_encoder(), tiny_ss_decoder(), resolution=8)
    flow_stage = TrellisSSFlowModule(randomize_zero_init(tiny_ss_flow()), tiny_ss_encoder(), tiny_dino())
    files = {}
    for name, m in (("vae", vae), ("flow", flow_stage)):
        files[name] = save_state(m, tmp_path / f"{name}.safetensors")
    model = _trellis(part_weights={"ss_flow": {"path": str(files["flow"]), "prefix": "flow."},
                                   "ss_decoder": {"path": str(files["vae"]), "prefix": "decoder."}})
    for k, v in flow_stage.flow.state_dict().items():
        assert torch.equal(model.ss_flow.state_dict()[k], v), k
    for k, v in vae.decoder.state_dict().items():
        assert torch.equal(model.ss_decoder.state_dict()[k], v), k
    # the decoder is a fixed part now (left out of checkpoints); the SS flow still trains
    assert "ss_decoder" in model.frozen_pretrained() and "ss_flow" not in model.frozen_pretrained()
    assert all(p.requires_grad for p in model.ss_flow.parameters())
    with pytest.raises(ConfigError, match="unknown part 'decoder'"):  # checked before any file is read
        _trellis(part_weights={"ss_decoder": {"path": str(files["vae"]), "prefix": "decoder."}, "decoder": "x"})
