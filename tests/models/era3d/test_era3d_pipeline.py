"""Era3D sampling and SDEdit with a tiny pipeline in the released layout (tiny UNet/VAE/CLIP, random weights)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from recon3d.data.batch import Views
from recon3d.errors import CheckpointError, ConfigError, ShapeError
from recon3d.models.era3d.pipeline import (
    ERA3D_AZIMUTHS,
    ERA3D_LGM_VIEWS,
    ERA3D_VIEW_NAMES,
    Era3DGenerator,
    era3d_cameras,
    era3d_ddim_scheduler,
    prepare_era3d_input,
)
from recon3d.models.era3d.unet import Era3DUNet

V, R, STEPS = 6, 16, 3  # tiny UNet: 8x8 latents; tiny VAE: one downsampling -> 16x16 images


def _components(seed: int = 0):
    from diffusers import AutoencoderKL, DDPMScheduler
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = Era3DUNet("tiny")
    for p in unet.parameters():  # upstream zero-inits attn_mv.to_out: give every branch a say
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, sample_size=R)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          image_size=32, patch_size=8, projection_dim=16))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=16)
    noising = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    prompts = torch.randn(2 * V, 7, 16)
    return dict(unet=unet, vae=vae, image_encoder=clip, feature_extractor=processor, image_normalizer=normalizer,
                image_noising_scheduler=noising, scheduler=era3d_ddim_scheduler(), prompt_embeds=prompts)


@pytest.fixture(scope="module")
def gen():
    return Era3DGenerator(**_components(), num_inference_steps=STEPS).eval()


def _image(b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, R, R, generator=g)


def _record_unet(gen):
    calls = []

    def hook(module, args, output):
        calls.append({"sample": args[0].clone(), "t": int(args[1]), "context": args[2].clone(), "class_labels": args[3].clone(),
                      "eps": output[0].clone()})
    return calls, gen.unet.register_forward_hook(hook)


def test_defaults_are_era3d_test_config():
    g = Era3DGenerator(**_components())
    assert (g.num_inference_steps, g.guidance_scale, g.eta, g.noise_level) == (40, 3.0, 1.0, 0)
    s = g.scheduler.config
    assert (s.beta_start, s.beta_end, s.beta_schedule, s.timestep_spacing, s.steps_offset, s.prediction_type) == (
        0.00085, 0.012, "linear", "leading", 1, "epsilon")
    g.scheduler.set_timesteps(40)
    assert g.scheduler.timesteps[0] == 976 and g.scheduler.timesteps[-1] == 1


def test_generate_end_to_end_gives_six_orthographic_views(gen):
    views = gen.generate(_image(2), generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert views.images.shape == (2, V, 3, R, R) and views.normals.shape == (2, V, 3, R, R)
    assert views.images.min() >= 0 and views.images.max() <= 1 and torch.isfinite(views.images).all()
    views.validate("views", batched=True)
    cams = views.cameras
    assert cams.is_orthographic and tuple(cams.batch_shape) == (2, V) and (cams.width, cams.height) == (R, R)
    # world normals: unit length or 0 (empty)
    norms = views.normals.norm(dim=2)
    assert ((norms - 1).abs() < 1e-4).logical_or(norms == 0).all()
    # per-object generators: object 1's views do not depend on object 0's input
    alone = gen.generate(_image(2)[1:], generator=[torch.Generator().manual_seed(1)])
    torch.testing.assert_close(alone.images[0], views.images[1], atol=1e-5, rtol=0)


def test_cameras_follow_blenders_layout():
    cams = era3d_cameras(batch_size=1, resolution=512)
    assert ERA3D_AZIMUTHS == (0, 45, 90, 180, 270, 315) and ERA3D_VIEW_NAMES[0] == "front"
    assert [ERA3D_VIEW_NAMES[i] for i in ERA3D_LGM_VIEWS] == ["front", "right", "back", "left"]
    for i, az in enumerate(ERA3D_AZIMUTHS):
        a = math.radians(az)
        eye = torch.tensor([3 * math.cos(a), 3 * math.sin(a), 0.0])
        c2w = cams.c2w[0, i]
        torch.testing.assert_close(c2w[:3, 3], eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(c2w[:3, 2], -eye / 3, atol=1e-6, rtol=0)  # looks at the origin
        torch.testing.assert_close(c2w[:3, 1], torch.tensor([0.0, 0.0, -1.0]), atol=1e-6, rtol=0)  # image down = world -Z
    # ortho scale 1.0: a point 0.5 world units right of the origin lands on the image's right edge
    right = cams.c2w[0, 0, :3, 0]
    pix, _ = cams[0, 0:1].project((0.5 * right)[None, None])
    torch.testing.assert_close(pix[0, 0], torch.tensor([512.0, 256.0]), atol=1e-3, rtol=0)


def test_normal_maps_become_world_normals():
    cams = era3d_cameras(1, 4)
    maps = torch.ones(1, V, 3, 4, 4)                                   # white: empty
    maps[0, 0, :, 0, 0] = torch.tensor([0.5, 0.5, 1.0])                # OpenGL +z: towards the input camera
    maps[0, 0, :, 0, 1] = torch.tensor([1.0, 0.5, 0.5])                # OpenGL +x: the input view's right
    maps[0, 0, :, 0, 2] = torch.tensor([0.5, 1.0, 0.5])                # OpenGL +y: up
    n = Era3DGenerator._world_normals(maps, cams)
    torch.testing.assert_close(n[0, 0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6, rtol=0)   # camera 0 sits on +X
    torch.testing.assert_close(n[0, 0, :, 0, 1], cams.c2w[0, 0, :3, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(n[0, 0, :, 0, 2], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6, rtol=0)   # world up
    assert n[0, 0, :, 1:].abs().max() == 0 and n[0, 1:].abs().max() == 0


def test_cfg_batch_order_and_zero_unconditional_conditioning(gen):
    calls, handle = _record_unet(gen)
    steps = []
    real_step = gen.scheduler.step
    gen.scheduler.step = lambda eps, t, x, **kw: (steps.append(eps.clone()), real_step(eps, t, x, **kw))[1]
    try:
        gen.generate(_image(1), generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
        del gen.scheduler.step
    assert len(calls) == STEPS and [c["t"] for c in calls] == [int(t) for t in gen.scheduler.timesteps]
    bv = V
    with torch.no_grad():
        image_latent = gen._encode(_image(1))[0]
    pn, pc = gen.prompt_embeds.chunk(2)
    for c, eps_seen in zip(calls, steps):
        x, cls, ctx = c["sample"], c["class_labels"], c["context"]
        assert x.shape == (4 * bv, 8, 8, 8)
        un, n, uc, col = x.split(bv)
        # the noisy latents are shared by each conditional/unconditional pair (scale_model_input is identity for DDIM)
        assert torch.equal(un[:, :4], n[:, :4]) and torch.equal(uc[:, :4], col[:, :4])
        # unconditional rows: zero VAE latent and zero class labels (CLIP embedding AND noise-level embedding)
        assert un[:, 4:].abs().max() == 0 and uc[:, 4:].abs().max() == 0
        assert cls[:bv].abs().max() == 0 and cls[2 * bv:3 * bv].abs().max() == 0
        for rows in (n, col):
            torch.testing.assert_close(rows[:, 4:], image_latent.expand(bv, -1, -1, -1), atol=1e-6, rtol=0)
        # conditional class labels: CLIP embedding (noised at level 0) then the level-0 embedding [cos 0 = 1..., sin 0 = 0...]
        assert cls[bv:2 * bv, 16:24].eq(1).all() and cls[bv:2 * bv, 24:].eq(0).all() and cls[bv:2 * bv, :16].abs().min() > 0
        # same prompt embeddings in both branches: [normal, normal, colour, colour]
        for got, want in zip(ctx.split(bv), (pn, pn, pc, pc)):
            assert torch.equal(got, want)
        # guidance uncond + 3 (cond - uncond), normals then colours
        e_un, e_n, e_uc, e_c = c["eps"].split(bv)
        want = torch.cat([e_un + 3.0 * (e_n - e_un), e_uc + 3.0 * (e_c - e_uc)])
        torch.testing.assert_close(eps_seen, want, atol=1e-6, rtol=0)


def test_sdedit_s1_is_pure_noise_start(gen):
    image = _image(1)
    views_a = gen.generate(image, generator=torch.Generator().manual_seed(5))
    renders_b = Views(images=torch.rand(1, V, 3, R, R, generator=torch.Generator().manual_seed(9)), cameras=gen.cameras(1))
    out_a = gen.refine(views_a, image, 1.0, generator=torch.Generator().manual_seed(3))
    out_b = gen.refine(renders_b, image, 1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out_a.images, out_b.images, atol=0, rtol=0)  # independent of the renders
    fresh = gen.generate(image, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out_a.images, fresh.images, atol=1e-6, rtol=0)  # = a sample from pure noise


def test_sdedit_s0_is_vae_round_trip_and_partial_strength_runs_the_last_steps(gen):
    image = _image(1)
    renders = Views(images=torch.rand(1, V, 3, R, R, generator=torch.Generator().manual_seed(2)), cameras=gen.cameras(1))
    calls, handle = _record_unet(gen)
    try:
        out0 = gen.refine(renders, image, 0.0, generator=torch.Generator().manual_seed(0))
        assert calls == []
        with torch.no_grad():
            want = ((gen.vae.decode(gen.vae.encode(renders.images[0] * 2 - 1).latent_dist.mode()).sample) / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(out0.images[0], want, atol=1e-5, rtol=0)
        assert out0.normals is None and out0.cameras.is_orthographic
        gen.scheduler.set_timesteps(STEPS)
        schedule = [int(t) for t in gen.scheduler.timesteps]
        out = gen.refine(renders, image, 0.7, generator=torch.Generator().manual_seed(0))  # int(3 * 0.7) = 2 steps
        assert [c["t"] for c in calls] == schedule[1:]
        # the colour half starts from the render noised at the first kept step; the normal half from pure noise
        first = calls[0]["sample"][:, :4]
        with torch.no_grad():
            clean = gen._encode(renders.images[0])
        alpha = gen.scheduler.alphas_cumprod[schedule[1]]
        colour_start = first[3 * V:]
        noise_c = (colour_start - alpha.sqrt() * clean) / (1 - alpha).sqrt()
        assert abs(float(noise_c.std()) - 1) < 0.15 and abs(float(noise_c.mean())) < 0.15
        assert out.images.shape == (1, V, 3, R, R)
    finally:
        handle.remove()


def test_bad_inputs_are_one_line(gen):
    image = _image(1)
    renders = Views(images=torch.rand(1, V, 3, R, R), cameras=gen.cameras(1))
    with pytest.raises(ConfigError, match="strength"):
        gen.refine(renders, image, 1.5)
    with pytest.raises(ShapeError, match="6 views"):
        gen.refine(Views(images=torch.rand(1, 4, 3, R, R)), image, 0.5)
    with pytest.raises(ShapeError, match="input view"):
        gen.generate(torch.rand(1, 4, R, R))
    with pytest.raises(ShapeError, match="prompt_embeds"):
        Era3DGenerator(**{**_components(), "prompt_embeds": torch.zeros(V, 7, 16)})


def test_prepare_input_crops_to_420_of_512_on_white():
    rgba = torch.zeros(1, 4, 300, 200)
    rgba[0, :3, 50:250, 40:140] = torch.tensor([0.2, 0.4, 0.6])[:, None, None]
    rgba[0, 3, 50:250, 40:140] = 1.0
    out = prepare_era3d_input(rgba)
    assert out.shape == (1, 3, 512, 512)
    obj = (out[0] - 1).abs().sum(0) > 0.05
    ys, xs = torch.nonzero(obj, as_tuple=True)
    # bbox 200 x 100 minus upstream's dropped last row/column (199 x 99) -> longer side 420
    assert abs(int(ys.max() - ys.min() + 1) - 420) <= 2 and abs(int(xs.max() - xs.min() + 1) - int(420 / 199 * 99)) <= 2
    assert abs(float(ys.float().mean()) - 255.5) < 2 and abs(float(xs.float().mean()) - 255.5) < 2
    assert torch.equal(out[0, :, 0, 0], torch.ones(3))  # white background
    with pytest.raises(ShapeError, match="alpha channel is empty"):
        prepare_era3d_input(torch.zeros(4, 8, 8))


def test_from_pretrained_reads_a_local_folder_and_names_missing_files(tmp_path):
    parts = _components(seed=1)
    with pytest.raises(CheckpointError, match=r"unet/config.json: not found"):
        Era3DGenerator.from_pretrained(tmp_path)
    unet_dir = tmp_path / "unet"
    unet_dir.mkdir()
    cfg = parts["unet"].config
    options = {"in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "block_out_channels": list(cfg.block_out_channels),
               "layers_per_block": cfg.layers_per_block, "attention_head_dim": list(cfg.num_heads), "cross_attention_dim": 16,
               "projection_class_embeddings_input_dim": 32, "norm_num_groups": 8, "use_linear_projection": True,
               "upcast_attention": False, "num_views": 6, "sample_size": 8, "num_regress_blocks": 1, "class_embed_type": "projection",
               "projection_camera_embeddings_input_dim": 4, "regress_elevation": True, "regress_focal_length": True,
               "down_block_types": ["CrossAttnDownBlockMV2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlockMV2D"],
               "selfattn_block": "self_rowwise", "mvcd_attention": True}
    (unet_dir / "config.json").write_text(json.dumps(options))
    save_file({k: v.half().contiguous() for k, v in parts["unet"].state_dict().items()}, str(unet_dir / "diffusion_pytorch_model.fp16.safetensors"))
    parts["vae"].save_pretrained(tmp_path / "vae")
    parts["image_encoder"].save_pretrained(tmp_path / "image_encoder")
    parts["feature_extractor"].save_pretrained(tmp_path / "feature_extractor")
    parts["image_normalizer"].save_pretrained(tmp_path / "image_normalizer")
    parts["image_noising_scheduler"].save_pretrained(tmp_path / "image_noising_scheduler")
    parts["scheduler"].save_pretrained(tmp_path / "scheduler")
    with pytest.raises(CheckpointError, match=r"normal_embeds.pt: not found: copy mvdiffusion/data/fixed_prompt_embeds_6view"):
        Era3DGenerator.from_pretrained(tmp_path)
    (tmp_path / "fixed_prompt_embeds_6view").mkdir()
    pn, pc = parts["prompt_embeds"].chunk(2)
    torch.save(pn.half(), tmp_path / "fixed_prompt_embeds_6view" / "normal_embeds.pt")
    torch.save(pc.half(), tmp_path / "fixed_prompt_embeds_6view" / "clr_embeds.pt")
    gen = Era3DGenerator.from_pretrained(tmp_path, num_inference_steps=2)
    for k, v in parts["unet"].state_dict().items():
        assert torch.equal(gen.unet.state_dict()[k], v.half().float()), k
    torch.testing.assert_close(gen.prompt_embeds, parts["prompt_embeds"].half().float())
    views = gen.generate(_image(1), generator=torch.Generator().manual_seed(0))
    assert views.images.shape == (1, V, 3, R, R) and views.cameras.is_orthographic
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"vae: no weight file"):
        Era3DGenerator.from_pretrained(tmp_path)
