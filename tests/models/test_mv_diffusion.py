"""recon3d's multi-view diffusion model, its cross-view attention and the SDEdit schedule."""

from __future__ import annotations

import math
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch

from recon3d.data.batch import Views
from recon3d.errors import ConfigError, ShapeError
from recon3d.models.multiview.attention import MultiViewAttnProcessor
from recon3d.models.multiview.diffusion import MultiViewDiffusion
from recon3d.models.multiview.generator import MultiViewGenerator
from recon3d.models.multiview.sdedit import sdedit_start, sdedit_timesteps

TINY = dict(num_views=4, resolution=16, block_out_channels=(16, 32), attention_heads=2, cross_attention_dim=32,
            norm_num_groups=8, token_patch=4, num_inference_steps=3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MultiViewDiffusion(**TINY).eval()
    return m


def _gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


# ---------------------------------------------------------------------------------------------- SDEdit schedule
STRENGTHS = (0.0, 0.02, 0.1, 0.3, 0.5, 0.7, 0.95, 0.99, 1.0)


def test_sdedit_timesteps_keep_the_last_int_ns_steps():
    # The img2img rule written out from its definition (fast; the call into diffusers' own
    # get_timesteps below is marked slow only because importing the pipeline pulls in transformers).
    for N in (1, 7, 10, 40, 50):
        full = _ddim()
        full.set_timesteps(N)
        for s in STRENGTHS:
            n = int(N * s)
            got = sdedit_timesteps(_ddim(), N, s)
            assert got.tolist() == (full.timesteps.tolist()[N - n :] if n else []), (N, s)
            assert all(a > b for a, b in zip(got.tolist(), got.tolist()[1:]))  # descending: noisiest first


@pytest.mark.slow
@pytest.mark.parametrize("scheduler_name", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_sdedit_timesteps_equal_diffusers_img2img(scheduler_name):
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline

    cls = getattr(diffusers, scheduler_name)
    for N in (1, 7, 10, 40, 50):
        for s in STRENGTHS:
            ours = cls(num_train_timesteps=1000)
            got = sdedit_timesteps(ours, N, s)
            ref_sched = cls(num_train_timesteps=1000)
            ref_sched.set_timesteps(N)  # the pipeline sets the schedule before get_timesteps
            want, n = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=ref_sched), N, s, "cpu")
            assert torch.equal(got, want), (N, s)
            assert len(got) == n == int(N * s)
            assert getattr(ours, "begin_index", None) == getattr(ref_sched, "begin_index", None)


def test_int_equals_ceil_at_table3_strengths():
    # The research note's claim: for N = 40, int(N s) == ceil(N s) at every Table 3 strength
    # (exact arithmetic: 40 * k / 20 is an integer for k = 2 ... 20).
    for k in range(2, 21, 2):
        s = Fraction(k, 20)  # 0.1 ... 1.0
        assert math.floor(40 * s) == math.ceil(40 * s)
    assert [len(sdedit_timesteps(_ddim(), 40, k / 20)) for k in range(2, 21, 2)] == [4 * j for j in range(1, 11)]


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, steps_offset=1)


def test_sdedit_start_is_eq4():
    sched = _ddim()
    ts = sdedit_timesteps(sched, 10, 0.5)
    x, eps = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1, torch.randn(2, 3, 4, 4, dtype=torch.float64)
    abar = sched.alphas_cumprod.double()[int(ts[0])]
    want = abar.sqrt() * x + (1 - abar).sqrt() * eps  # x_t = alpha_t x + sigma_t eps
    torch.testing.assert_close(sdedit_start(sched, x, eps, ts, 0.5), want)
    assert torch.equal(sdedit_start(sched, x, eps, sdedit_timesteps(sched, 10, 0.0), 0.0), x)
    assert torch.equal(sdedit_start(sched, x, eps, sdedit_timesteps(sched, 10, 1.0), 1.0), eps)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "high"])
def test_strength_outside_unit_interval_is_one_line(model, bad):
    views = Views(torch.rand(1, 4, 3, 16, 16))
    for call in (lambda: model.refine(views, torch.rand(1, 3, 16, 16), bad), lambda: sdedit_timesteps(_ddim(), 10, bad)):
        with pytest.raises(ConfigError) as e:
            call()
        assert "strength" in str(e.value) and "[0, 1]" in str(e.value) and len(str(e.value).splitlines()) == 1


# ---------------------------------------------------------------------------------------------- refine ends
def test_refine_at_zero_returns_the_inputs_exactly(model):
    views = Views(torch.rand(2, 4, 3, 16, 16))
    out = model.refine(views, torch.rand(2, 3, 16, 16), 0.0, generator=_gens(2))
    assert torch.equal(out.images, views.images)
    assert out.cameras.batch_shape == (2, 4)


def test_refine_at_one_starts_from_pure_noise(model):
    image = torch.rand(1, 3, 16, 16)
    a, b = Views(torch.rand(1, 4, 3, 16, 16)), Views(torch.rand(1, 4, 3, 16, 16))
    ra, rb = (model.refine(v, image, 1.0, generator=_gens(1, 7)) for v in (a, b))
    assert torch.equal(ra.images, rb.images)  # the renders leave no trace at s = 1
    # ... and it is the sampler's own start: generate() with the same seed gives the same views
    torch.testing.assert_close(ra.images, model.generate(image, generator=_gens(1, 7)).images, atol=1e-6, rtol=0)
    # control: at s = 0.5 the renders matter
    ha, hb = (model.refine(v, image, 0.5, generator=_gens(1, 7)) for v in (a, b))
    assert (ha.images - hb.images).abs().max() > 1e-3


def test_refine_refuses_views_of_the_wrong_layout(model):
    with pytest.raises(ShapeError, match="4 views"):
        model.refine(Views(torch.rand(1, 6, 3, 16, 16)), torch.rand(1, 3, 16, 16), 0.5)


# ---------------------------------------------------------------------------------------------- generate
def test_generate_views_and_cameras(model):
    from recon3d.data.synthetic import SyntheticDataset

    assert isinstance(model, MultiViewGenerator)
    out = model.generate(torch.rand(3, 3, 24, 24), generator=_gens(3))  # resized to 16²
    assert out.images.shape == (3, 4, 3, 16, 16) and 0 <= out.images.min() and out.images.max() <= 1
    cams = out.cameras
    assert cams.batch_shape == (3, 4) and (cams.width, cams.height) == (16, 16) and cams.projection == "perspective"
    # closed form: centres on the orbit at azimuth 90 k, elevation 0, radius 2.9, looking at the origin
    az = torch.deg2rad(torch.tensor([0.0, 90.0, 180.0, 270.0]))
    centres = 2.9 * torch.stack([az.cos(), az.sin(), torch.zeros(4)], -1)
    torch.testing.assert_close(cams.c2w[0, :, :3, 3], centres, atol=1e-5, rtol=0)
    torch.testing.assert_close(cams.c2w[0, :, :3, 2], -centres / 2.9, atol=1e-5, rtol=0)  # OpenCV +z forward
    f = 8 / math.tan(math.radians(49.1) / 2)
    torch.testing.assert_close(cams.K[0, :, 0, 0], torch.full((4,), f), atol=1e-4, rtol=0)
    # the synthetic set's fixed layout with the same numbers renders exactly these cameras
    ds = SyntheticDataset(num_objects=1, views_per_object=4, resolution=16, fov_deg=49.1, elevation_range=(0.0, 0.0),
                          camera_layout="fixed")
    torch.testing.assert_close(ds.cameras(0).c2w, cams.c2w[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(ds.cameras(0).K, cams.K[1], atol=1e-6, rtol=0)


def test_per_object_generators_make_samples_batch_independent(model):
    images = torch.rand(2, 3, 16, 16)
    both = model.generate(images, generator=_gens(2, 3)).images
    alone = model.generate(images[1:], generator=_gens(1, 4)).images
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- guidance
def test_cfg_closed_form(model):
    torch.manual_seed(1)
    x, t = torch.randn(2, 4, 3, 16, 16), torch.tensor([500, 120])
    cond_img = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        cond = model.predict_noise(x, t, cond_img)
        uncond = model.predict_noise(x, t, cond_img, keep=torch.zeros(2, dtype=torch.bool))
        assert (cond - uncond).abs().max() > 1e-3  # the condition matters (else the checks below are vacuous)
        torch.testing.assert_close(model.guided_noise(x, t, cond_img, 1.0), cond, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.guided_noise(x, t, cond_img, 0.0), uncond, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.guided_noise(x, t, cond_img, 3.0), uncond + 3.0 * (cond - uncond), atol=1e-4, rtol=0)
        # the unconditional branch is the zero condition, not a black image's
        zero = model.predict_noise(x, t, torch.zeros_like(cond_img))
        assert (zero - uncond).abs().max() > 1e-4


def test_unconditional_branch_sees_a_zero_condition(model):
    seen = []
    h = model.unet.register_forward_pre_hook(lambda mod, args, kwargs: seen.append((args[0], kwargs["encoder_hidden_states"])),
                                             with_kwargs=True)
    try:
        with torch.no_grad():
            model.guided_noise(torch.randn(2, 4, 3, 16, 16), torch.tensor([300, 300]), torch.rand(2, 3, 16, 16) * 2 - 1)
    finally:
        h.remove()
    sample, tokens = seen[0]
    n = 2 * 4  # uncond rows first: B objects x V views
    assert torch.equal(sample[:n, 3:], torch.zeros_like(sample[:n, 3:])) and torch.equal(tokens[:n], torch.zeros_like(tokens[:n]))
    assert sample[n:, 3:].abs().max() > 0 and tokens[n:].abs().max() > 0


# ---------------------------------------------------------------------------------------------- cross-view attention
def test_cross_view_attention_mixes_views_not_objects(model):
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(2)
    x, t, c = torch.randn(2, 4, 3, 16, 16), torch.tensor([400, 400]), torch.rand(2, 3, 16, 16) * 2 - 1
    y = x.clone()
    y[0, 2] = torch.randn(3, 16, 16)  # change view 2 of object 0 only
    with torch.no_grad():
        a, b = model.predict_noise(x, t, c), model.predict_noise(y, t, c)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4  # view 0 sees view 2
    torch.testing.assert_close(a[1], b[1], atol=1e-6, rtol=0)  # object 1 sees nothing of object 0
    # control: with diffusers' per-image processor the views are independent
    single = MultiViewDiffusion(**TINY).eval()
    single.load_state_dict(model.state_dict())
    single.unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        a1, b1 = single.predict_noise(x, t, c), single.predict_noise(y, t, c)
    torch.testing.assert_close(a1[0, [0, 1, 3]], b1[0, [0, 1, 3]], atol=1e-6, rtol=0)


def test_processor_against_references():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(3)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    h = torch.randn(6, 5, 16)  # 3 objects x 2 views x 5 tokens
    with torch.no_grad():
        # V = 1 is diffusers' own processor
        torch.testing.assert_close(MultiViewAttnProcessor(1)(attn, h), AttnProcessor2_0()(attn, h), atol=1e-6, rtol=0)
        got = MultiViewAttnProcessor(2)(attn, h).double()
        # float64 reference: per object, softmax attention over its 2 x 5 tokens, per head
        W = {n: getattr(attn, n).weight.double() for n in ("to_q", "to_k", "to_v")}
        x = h.double().reshape(3, 10, 16)
        q, k, v = (x @ W[n].T for n in ("to_q", "to_k", "to_v"))
        q, k, v = (z.reshape(3, 10, 2, 8).permute(0, 2, 1, 3) for z in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
        o = (w @ v).permute(0, 2, 1, 3).reshape(3, 10, 16)
        ref = (o @ attn.to_out[0].weight.double().T + attn.to_out[0].bias.double()).reshape(6, 5, 16)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    with pytest.raises(ShapeError, match="whole number of objects"):
        MultiViewAttnProcessor(4)(attn, h)
