"""recon3d's SLAT VAE (encoder, Gaussian and mesh decoders) against upstream TRELLIS.

``official_manifest.json`` / ``tiny_parity.safetensors`` were written by
``scripts/make_trellis_manifest.py`` from upstream's own ``SLatEncoder`` / ``SLatGaussianDecoder``
/ ``SLatMeshDecoder`` (released args on meta, tiny presets with randomised weights over spconv on
the CPU); the Gaussian activations there come from upstream's ``Gaussian`` class. The hand
computations below are independent of both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from recon3d.errors import CheckpointError, ConfigError
from recon3d.models.trellis import TRELLIS_PRESETS, build_trellis_model, load_trellis_model
from recon3d.models.trellis.slat_decoders import hammersley_points
from recon3d.models.trellis.sparse_blocks import SparseTransformerBlock
from recon3d.representations import SparseVoxels

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "trellis"
MANIFEST = json.loads((FIX / "official_manifest.json").read_text())
PAPER = ("slat_enc_swin8_B_64l8_fp16", "slat_dec_gs_swin8_B_64l8gs32_fp16", "slat_dec_mesh_swin8_B_64l8m256c_fp16")
TINY = ("slat_enc_tiny", "slat_dec_gs_tiny", "slat_dec_mesh_tiny")


def _layout(model):
    return {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}


def _fixture(name):
    fix = load_file(str(FIX / "tiny_parity.safetensors"))
    weights = {k.split("/weights/", 1)[1]: v.float() for k, v in fix.items() if k.startswith(f"{name}/weights/")}
    inputs = {k.split("/input/", 1)[1]: v for k, v in fix.items() if k.startswith(f"{name}/input/")}
    extra = {k.split("/", 1)[1]: v for k, v in fix.items() if k.startswith(f"{name}/") and "/weights/" not in k and "/input/" not in k}
    return weights, inputs, extra


def _loaded(name, **over):
    p = TRELLIS_PRESETS[name]
    weights, inputs, extra = _fixture(name)
    model = build_trellis_model(p["name"], {**p["args"], **over}).eval()
    model.load_state_dict(weights, strict=True)
    x = SparseVoxels(inputs["coords"], inputs["feats"], p["args"]["resolution"], 2)
    return model, x, extra


@pytest.mark.parametrize("preset", PAPER + TINY)
def test_state_dict_equals_upstream_manifest(preset):
    p = TRELLIS_PRESETS[preset]
    assert MANIFEST["configs"][preset]["args"] == p["args"] and MANIFEST["configs"][preset]["name"] == p["name"]
    with torch.device("meta"):
        model = build_trellis_model(p["name"], p["args"], use_fp16=None)
    ref = {k: (v["shape"], v["dtype"]) for k, v in MANIFEST["configs"][preset]["keys"].items()}
    assert _layout(model) == ref


def test_paper_layout():
    enc = MANIFEST["configs"]["slat_enc_swin8_B_64l8_fp16"]["keys"]
    assert enc["input_layer.weight"] == {"shape": [768, 1024], "dtype": "float32"}
    assert enc["blocks.11.attn.to_qkv.weight"] == {"shape": [2304, 768], "dtype": "float16"}
    assert enc["out_layer.weight"]["shape"] == [16, 768]
    gs = MANIFEST["configs"]["slat_dec_gs_swin8_B_64l8gs32_fp16"]["keys"]
    assert gs["out_layer.weight"]["shape"] == [448, 768] and gs["offset_perturbation"] == {"shape": [32, 3], "dtype": "float32"}
    mesh = MANIFEST["configs"]["slat_dec_mesh_swin8_B_64l8m256c_fp16"]["keys"]
    assert mesh["upsample.0.skip_connection.conv.weight"] == {"shape": [192, 1, 1, 1, 768], "dtype": "float16"}
    assert mesh["upsample.1.act_layers.0.weight"] == {"shape": [192], "dtype": "float32"}
    assert mesh["out_layer.weight"]["shape"] == [101, 96]


def test_manifest_checks_pass():
    c = MANIFEST["checks"]
    for name in TINY:
        assert c[f"{name}_forward_max_abs_diff"] <= 1e-5 * max(1.0, c[f"{name}_output_abs_max"])
    assert c["slat_dec_gs_tiny_offset_perturbation_max_abs_diff"] < 1e-6


def test_encoder_matches_upstream():
    model, x, extra = _loaded("slat_enc_tiny")
    with torch.no_grad():
        z, mean, logvar = model(x, sample_posterior=False, return_raw=True)
    ref = extra["output"]
    assert ref.abs().max() > 1.0 and torch.equal(z.feats, mean)
    torch.testing.assert_close(torch.cat([mean, logvar], 1), ref, rtol=1e-5, atol=1e-5)
    # posterior sample: mean + exp(logvar / 2) * eps with the generator's eps
    with torch.no_grad():
        s = model(x, generator=torch.Generator().manual_seed(5)).feats
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(s, mean + torch.exp(0.5 * logvar) * eps, rtol=1e-6, atol=1e-6)


def test_gaussian_decoder_matches_upstream_output_and_activations():
    model, x, extra = _loaded("slat_dec_gs_tiny")
    with torch.no_grad():
        h = model(x)
        acts = model.activations(h)
    torch.testing.assert_close(h.feats, extra["output"], rtol=1e-5, atol=1e-5)
    for k in ("world", "features_dc", "scaling", "rotation", "opacity"):
        torch.testing.assert_close(acts[k], extra[f"activations/{k}"], rtol=1e-5, atol=1e-5, msg=k)


def test_mesh_decoder_matches_upstream_cube_features():
    model, x, extra = _loaded("slat_dec_mesh_tiny", conv_backend="torch")
    with torch.no_grad():
        out = model(x)
    ref = extra["output"]
    assert out.resolution == 32 and out.num_voxels == 64 * x.num_voxels and out.num_channels == 101
    assert torch.equal(out.coords, extra["output_coords"])
    scale = float(ref.abs().max())
    torch.testing.assert_close(out.feats, ref, rtol=0, atol=2e-6 * scale)


def test_offset_perturbation_is_the_hammersley_buffer():
    p = TRELLIS_PRESETS["slat_dec_gs_tiny"]
    m = build_trellis_model(p["name"], p["args"])
    weights, _, _ = _fixture("slat_dec_gs_tiny")
    torch.testing.assert_close(m.offset_perturbation, weights["offset_perturbation"], rtol=0, atol=1e-6)
    assert "offset_perturbation" in m.state_dict()
    # hand values: point g of G = (g / G, radical inverse base 2, base 3)
    h = hammersley_points(8)
    assert h[0].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(h[3], torch.tensor([3 / 8, 0.75, 1 / 9], dtype=torch.float64))
    torch.testing.assert_close(h[6], torch.tensor([6 / 8, 0.375, 2 / 9], dtype=torch.float64))
    assert math.isclose(float(m.offset_perturbation[3, 1]), math.atanh((2 * 0.75 - 1) / 1.5), rel_tol=1e-6)


def test_gaussian_activations_match_hand_computation():
    """Fixed raw outputs for one voxel at c = (3, 0, 5) on 16^3, 2 Gaussians: TRELLIS's
    activations written out with ``math`` (float64), released representation config."""
    args = {**TRELLIS_PRESETS["slat_dec_gs_tiny"]["args"]}
    args["representation_config"] = {**args["representation_config"], "num_gaussians": 2}
    m = build_trellis_model("SLatGaussianDecoder", args)
    assert m.out_channels == 2 * 14
    o = torch.linspace(-1.5, 1.3, 28, dtype=torch.float64)
    h = SparseVoxels(torch.tensor([[0, 3, 0, 5]], dtype=torch.int32), o[None].float(), 16, 1)
    a = m.activations(h)
    R, v, k = 16, 1.5, 9e-4
    hp = [[0.0, 0.0, 0.0], [0.5, 0.5, 1 / 3]]
    c = (3, 0, 5)
    for g in range(2):
        for ax in range(3):
            pert = math.atanh((2 * hp[g][ax] - 1) / v)
            xyz = (c[ax] + 0.5) / R + math.tanh(float(o[3 * g + ax]) + pert) * 0.5 * v / R
            assert math.isclose(float(a["xyz"][g, ax]), xyz, abs_tol=1e-6)
            assert math.isclose(float(a["world"][g, ax]), xyz - 0.5, abs_tol=1e-6)
            assert math.isclose(float(a["features_dc"][g, 0, ax]), float(o[6 + 3 * g + ax]), abs_tol=1e-6)
            sb = 4e-3 + math.log(1 - math.exp(-4e-3))  # softplus^-1(0.004)
            sp = math.log1p(math.exp(float(o[12 + 3 * g + ax]) + sb))
            assert math.isclose(float(a["scaling"][g, ax]), math.sqrt(sp**2 + k**2), rel_tol=1e-5)
        q = [0.1 * float(o[18 + 4 * g + j]) + (1.0 if j == 0 else 0.0) for j in range(4)]
        n = math.sqrt(sum(t * t for t in q))
        for j in range(4):
            assert math.isclose(float(a["rotation"][g, j]), q[j] / n, abs_tol=1e-6)
        logit = math.log(0.1 / 0.9)
        assert math.isclose(float(a["opacity"][g, 0]), 1 / (1 + math.exp(-(float(o[26 + g]) + logit))), abs_tol=1e-6)


def test_to_gaussians_scales_trellis_box_to_recon3d():
    model, x, _ = _loaded("slat_dec_gs_tiny")
    with torch.no_grad():
        h = model(x)
        a = model.activations(h)
        gs = model.to_gaussians(h)
        gs3 = model.to_gaussians(h, scale=3.0)
    G = model.num_gaussians
    assert gs.is_packed and gs.counts.tolist() == [G * n for n in x.counts.tolist()] and gs.sh_degree == 0
    torch.testing.assert_close(gs.means, 2 * a["world"])
    torch.testing.assert_close(gs.scales, 2 * a["scaling"])
    torch.testing.assert_close(gs3.means, 3 * a["world"])
    torch.testing.assert_close(gs.quats, a["rotation"])
    torch.testing.assert_close(gs.opacities, a["opacity"][:, 0])
    # offsets reach at most 0.75 voxel (tanh * 0.5 * 1.5): inside [-1, 1]^3 plus that margin
    assert gs.means.abs().max() <= 1 + 2 * 0.75 / 16 + 1e-6
    # each voxel's Gaussians stay within 0.75 voxel of its centre (voxel-major order)
    centre = ((x.coords[:, 1:].float() + 0.5) / 16 - 0.5).repeat_interleave(G, 0)
    assert (a["world"] - centre).abs().max() <= 0.75 / 16 + 1e-6


def _dense_window_attention(block, x, window, shift):
    """float64 reference: every voxel attends to the voxels of its object with the same
    ``(coords + shift) // window``, by an explicit (N, N) mask."""
    attn = block.attn
    f = F.layer_norm(x.feats.double(), (x.num_channels,), eps=1e-6)
    qkv = F.linear(f, attn.to_qkv.weight.double(), attn.to_qkv.bias.double()).reshape(x.num_voxels, 3, attn.num_heads, -1)
    q, k, v = qkv.unbind(1)
    if attn.qk_rms_norm:
        d = q.shape[-1]
        q = F.normalize(q, dim=-1) * attn.q_rms_norm.gamma.double() * d**0.5
        k = F.normalize(k, dim=-1) * attn.k_rms_norm.gamma.double() * d**0.5
    c = x.coords.long()
    w = torch.cat([c[:, :1], torch.div(c[:, 1:] + shift, window, rounding_mode="floor")], 1)
    mask = (w[:, None, :] == w[None, :, :]).all(-1)  # (N, N)
    s = torch.einsum("nhd,mhd->hnm", q, k) / q.shape[-1] ** 0.5
    s = s.masked_fill(~mask, float("-inf"))
    o = torch.einsum("hnm,mhd->nhd", s.softmax(-1), v).reshape(x.num_voxels, -1)
    return F.linear(o, attn.to_out.weight.double(), attn.to_out.bias.double())


@pytest.mark.parametrize("shift", [0, 2])
def test_swin_attention_against_dense_masked_reference(shift):
    g = torch.Generator().manual_seed(4)
    rows = []
    for b, n in enumerate((60, 25)):
        cells = torch.randperm(8**3, generator=g)[:n].sort().values
        rows.append(torch.stack([torch.full((n,), b), cells // 64, cells // 8 % 8, cells % 8], 1))
    coords = torch.cat(rows).int()
    x = SparseVoxels(coords, torch.randn(coords.shape[0], 16, generator=g), 8, 2)
    block = SparseTransformerBlock(16, 2, 2, attn_mode="windowed", window_size=4, shift_window=shift, qk_rms_norm=True,
                                   backend="torch")
    with torch.no_grad():
        for q in block.parameters():
            q.copy_(torch.randn(q.shape, generator=g) * 0.3 + (1.0 if q.ndim == 2 and q.shape[0] == 2 else 0.0))
        got = block.attn(x.replace(feats=F.layer_norm(x.feats, (16,), eps=1e-6))).feats
        ref = _dense_window_attention(block, x, 4, shift)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # the windows matter: full attention per object gives something else
    full = SparseTransformerBlock(16, 2, 2, attn_mode="full", qk_rms_norm=True, backend="torch")
    full.load_state_dict(block.state_dict())
    with torch.no_grad():
        other = full.attn(x.replace(feats=F.layer_norm(x.feats, (16,), eps=1e-6))).feats
    assert (other - got).abs().max() > 1e-2


def test_swin_blocks_alternate_shift():
    p = TRELLIS_PRESETS["slat_enc_swin8_B_64l8_fp16"]
    with torch.device("meta"):
        m = build_trellis_model(p["name"], p["args"])
    assert [(b.attn.attn_mode, b.attn.window_size, b.attn.shift_window) for b in m.blocks[:3]] == [
        ("windowed", 8, 0), ("windowed", 8, 4), ("windowed", 8, 0)]
    with pytest.raises(ConfigError, match="attn_mode.*'shift_window'"):
        build_trellis_model("SLatEncoder", {**TRELLIS_PRESETS["slat_enc_tiny"]["args"], "attn_mode": "shift_window"})


def _sphere_cubes(radius=0.3, res=32, deform=0.0, color=0.3):
    """Cube features of a sphere SDF (TRELLIS units) on the solid ball and a band outside it, as the
    mesh decoder's output at ``res^3``: sdf at the 8 corners (+1/res so that the decoder's bias
    cancels). Vertices of no cube read as outside (SDF 1), so the interior must be covered."""
    ax = torch.arange(res)
    c = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    centre = (c.float() + 0.5) / res - 0.5
    c = c[centre.norm(dim=-1) - radius < 3 / res]
    corners = torch.tensor([[j & 1, (j >> 1) & 1, j >> 2] for j in range(8)])
    p = (c[:, None] + corners[None]).float() / res - 0.5
    sdf = p.norm(dim=-1) - radius + 1 / res  # (n, 8)
    feats = torch.cat([sdf, torch.full((c.shape[0], 24), deform), torch.zeros(c.shape[0], 21),
                       torch.full((c.shape[0], 48), color)], 1)
    coords = torch.cat([torch.zeros(c.shape[0], 1, dtype=torch.long), c], 1).int()
    return SparseVoxels(coords, feats, res, 1)


def test_mesh_extraction_on_a_known_sdf():
    p = TRELLIS_PRESETS["slat_dec_mesh_tiny"]
    m = build_trellis_model(p["name"], p["args"])
    mesh = m.to_meshes(_sphere_cubes())
    v, f = mesh.verts[0], mesh.faces[0]
    assert v.shape[0] > 500 and f.shape[1] == 3
    # recon3d's box: radius 0.3 in TRELLIS units -> 0.6; linear interpolation on a 1/32 grid
    assert (v.norm(dim=-1) - 0.6).abs().max() < 0.01
    # outward winding: face normals point away from the centre
    n = torch.linalg.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    assert ((n * v[f].mean(1)).sum(-1) > 0).float().mean() > 0.99
    torch.testing.assert_close(mesh.vertex_colors[0], torch.full_like(v, 0.3))
    # a uniform deformation d moves every vertex by (1 - 1e-8) / (2 * 32) * tanh(d) per axis (x2 scale)
    moved = m.to_meshes(_sphere_cubes(deform=0.7)).verts[0]
    torch.testing.assert_close(moved - v, torch.full_like(v, 2 * (1 - 1e-8) / 64 * math.tanh(0.7)), rtol=0, atol=1e-5)
    # no zero crossing: an empty mesh for that object, not an error
    far = _sphere_cubes()
    far = far.replace(feats=torch.cat([far.feats[:, :8].abs() + 1, far.feats[:, 8:]], 1))
    empty = m.to_meshes(far)
    assert empty.verts[0].shape == (0, 3) and empty.faces[0].shape == (0, 3)


def test_decode_end_to_end_shapes():
    model, x, _ = _loaded("slat_dec_mesh_tiny", conv_backend="torch")
    with torch.no_grad():
        meshes = model.decode(x)
    assert meshes.batch_size == 2 and meshes.vertex_colors is not None
    gs_model, gx, _ = _loaded("slat_dec_gs_tiny")
    with torch.no_grad():
        gs = gs_model.decode(gx)
    assert gs.batch_size == 2 and gs.means.shape == (gs_model.num_gaussians * gx.num_voxels, 3)


@pytest.mark.parametrize("preset", TINY)
def test_official_json_loads_strictly_as_float32(tmp_path, preset):
    p = TRELLIS_PRESETS[preset]
    args = {**p["args"], "use_fp16": True}
    with torch.device("meta"):
        half = _layout(build_trellis_model(p["name"], args, use_fp16=None))
    assert any(d == "float16" for _, d in half.values())
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(s, generator=g).to(getattr(torch, d)) for k, (s, d) in half.items()}
    elastic = "Elastic" + p["name"]  # the training-time name in released jsons
    (tmp_path / f"{preset}.json").write_text(json.dumps({"name": elastic, "args": args}))
    save_file(state, str(tmp_path / f"{preset}.safetensors"))
    model = load_trellis_model(tmp_path / f"{preset}.json")
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, state[k].float()), k
    # one clear line naming the first mismatches; nothing is loaded
    del state["out_layer.bias"]
    state["blocks.0.attn.to_qkv.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / f"{preset}.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. \['out_layer\.bias'\]\).*blocks\.0\.attn\.to_qkv\.weight \(3, 3\)") as e:
        load_trellis_model(tmp_path / f"{preset}.json")
    assert "\n" not in str(e.value)


def test_bad_representation_config():
    args = {**TRELLIS_PRESETS["slat_dec_gs_tiny"]["args"], "representation_config": {"num_gaussians": 4}}
    with pytest.raises(ConfigError, match=r"representation_config: missing \['lr', 'perturb_offset'"):
        build_trellis_model("SLatGaussianDecoder", args)
    with pytest.raises(ConfigError, match="multiple of 32"):
        build_trellis_model("SLatMeshDecoder", {**TRELLIS_PRESETS["slat_dec_mesh_tiny"]["args"], "model_channels": 128})


def test_decoders_are_differentiable_for_render_supervision():
    """Training by rendering needs gradients from the Gaussians / mesh vertices to the decoder."""
    model, x, _ = _loaded("slat_dec_gs_tiny")
    gs = model.decode(x)
    (gs.means.square().sum() + gs.scales.sum() + gs.opacities.sum() + gs.colors.sum()).backward()
    assert model.out_layer.weight.grad.abs().sum() > 0 and model.input_layer.weight.grad.abs().sum() > 0
    p = TRELLIS_PRESETS["slat_dec_mesh_tiny"]
    m = build_trellis_model(p["name"], p["args"])
    cubes = _sphere_cubes()
    cubes = cubes.replace(feats=cubes.feats.clone().requires_grad_(True))
    mesh = m.to_meshes(cubes)
    mesh.verts[0].square().sum().backward()
    g = cubes.feats.grad
    assert g[:, :8].abs().sum() > 0 and g[:, 8:32].abs().sum() > 0  # through the SDF and the deformation
