"""FlowEulerSampler against closed forms: Gaussian targets (the exact velocity of the sigma_min path),
both CFG spellings, interval, rescale, multi-condition modes, the hook, the time grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon3d.errors import ConfigError, ShapeError
from recon3d.models.flow import FlowEulerSampler, FlowStep, RectifiedFlowObjective, StepUpdate, time_grid
from recon3d.representations.voxels import SparseVoxels


def gaussian_velocity_coeffs(t, mu, s, sig):
    """For x0 ~ N(mu, s^2) (per element) and x_t = (1-t) x0 + (sig + (1-sig) t) eps, the marginal
    velocity E[(1-sig) eps - x0 | x_t = x] = alpha(t) x + beta(t):
    with a = 1-t, b = sig + (1-sig) t, V = a^2 s^2 + b^2 (the variance of x_t),
    E[x0|x] = mu + a s^2 / V (x - a mu), E[eps|x] = b / V (x - a mu), hence
    alpha = ((1-sig) b - a s^2) / V and beta = -alpha a mu - mu."""
    a, b = 1 - t, sig + (1 - sig) * t
    V = a * a * s * s + b * b
    alpha = ((1 - sig) * b - a * s * s) / V
    return alpha, -alpha * a * mu - mu


class GaussianModel:
    """v(x, t, cond) for per-object Gaussian targets: ``cond`` rows are (mu, s); an all-zero row
    (the default negative condition) means the unconditional Gaussian ``uncond``."""

    def __init__(self, sig, uncond=(0.0, 1.0)):
        self.sig, self.uncond, self.calls = sig, uncond, []

    def __call__(self, x, tt, cond):
        self.calls.append(cond)
        t = tt.double() / 1000.0
        c = cond.double()
        zero = (c == 0).all(1)
        mu = torch.where(zero, torch.tensor(self.uncond[0], dtype=torch.float64), c[:, 0])
        s = torch.where(zero, torch.tensor(self.uncond[1], dtype=torch.float64), c[:, 1])
        al, be = gaussian_velocity_coeffs(t, mu, s, self.sig)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return (al.view(shape) * x.double() + be.view(shape)).to(x.dtype)


def reference_moments(grid, w, cond, uncond, sig, euler=True, substeps=1):
    """Mean and std at t = 0 of N(0, 1) noise pushed through v = (1+w) v_c - w v_u (affine in x):
    ``euler`` follows the sampler's discrete steps exactly (float64); otherwise RK4 with
    ``substeps`` per grid interval integrates the continuous ODE of the moments."""
    mc, sc = cond
    mu_u, su = uncond

    def coeffs(t):
        ac, bc = gaussian_velocity_coeffs(t, mc, sc, sig)
        au, bu = gaussian_velocity_coeffs(t, mu_u, su, sig)
        return (1 + w) * ac - w * au, (1 + w) * bc - w * bu

    m, sd = 0.0, 1.0
    ts = [float(x) for x in grid]
    for t0, t1 in zip(ts[:-1], ts[1:]):
        if euler:
            al, be = coeffs(t0)
            m, sd = m - (t0 - t1) * (al * m + be), sd * (1 - (t0 - t1) * al)
            continue
        h = (t1 - t0) / substeps
        for j in range(substeps):
            t = t0 + j * h

            def f(tt, y):
                al, be = coeffs(tt)
                return np.array([al * y[0] + be, al * y[1]])  # d mean/dt, d std/dt (std scales with alpha)

            y = np.array([m, sd])
            k1 = f(t, y)
            k2 = f(t + h / 2, y + h / 2 * k1)
            k3 = f(t + h / 2, y + h / 2 * k2)
            k4 = f(t + h, y + h * k3)
            m, sd = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return m, abs(sd)


@pytest.mark.parametrize("w", [0.0, 2.0])
def test_euler_lands_on_the_gaussian_target_and_cfg_on_the_guided_ode(w):
    sig, steps = 1e-5, 512
    cond_p, uncond_p = (1.5, 0.6), (-0.5, 1.2)
    sampler = FlowEulerSampler(sigma_min=sig, steps=steps, rescale_t=1.5, cfg_strength=w)
    B, D = 2000, 16
    noise = sampler.noise_like(torch.empty(B, D, dtype=torch.float64), torch.Generator().manual_seed(0))
    cond = torch.tensor(cond_p, dtype=torch.float64).expand(B, 2)
    out = sampler.sample(GaussianModel(sig, uncond_p), noise, cond)
    x = out.samples
    # 1) Exact: the map is affine, x = A * noise + C, with A, C from the discrete Euler recursion.
    m_eu, sd_eu = reference_moments(out.times, w, cond_p, uncond_p, sig, euler=True)
    assert torch.allclose(x, sd_eu * noise + m_eu, atol=1e-9)
    # 2) The continuous ODE (RK4, 10 sub-steps per interval). Its std has a closed form: d log sd / dt
    # is (1 + w) alpha_c - w alpha_u and each alpha is d log std_t / dt of its own Gaussian path, so
    # sd(0) = std_c(0)^(1+w) / std_u(0)^w with std(0) = sqrt(s^2 + sig^2); without guidance the flow
    # transports N(0, 1) onto the target N(mu, s^2 + sig^2) exactly.
    m_ode, sd_ode = reference_moments(out.times, w, cond_p, uncond_p, sig, euler=False, substeps=10)
    sd_closed = np.hypot(cond_p[1], sig) ** (1 + w) / np.hypot(uncond_p[1], sig) ** w
    assert abs(sd_ode - sd_closed) < 1e-7
    if w == 0:
        assert abs(m_ode - cond_p[0]) < 1e-7
    # Euler (first order) on 512 steps: within 1 % of the ODE's end point.
    assert abs(m_eu - m_ode) < 0.01 and abs(sd_eu / sd_ode - 1) < 0.01
    # 3) The samples' moments (32k draws) within statistical tolerance of the continuous reference.
    se = sd_ode / np.sqrt(B * D)
    assert abs(float(x.mean()) - m_ode) < 5 * se + 0.01
    assert abs(float(x.std()) / sd_ode - 1) < 0.02


def test_both_cfg_conventions_give_identical_samples():
    noise = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    cond = torch.tensor([[1.0, 0.5]]).expand(64, 2)
    for w_t in (6.5, 0.1, -0.3):
        kw = dict(sigma_min=1e-5, steps=12, rescale_t=3.0, cfg_interval=(0.2, 0.9), guidance_rescale=0.5)
        a = FlowEulerSampler(cfg_strength=w_t, cfg_convention="trellis", **kw).sample(GaussianModel(1e-5), noise, cond)
        b = FlowEulerSampler(cfg_strength=1 + w_t, cfg_convention="reconviagen", **kw).sample(GaussianModel(1e-5), noise, cond)
        if w_t == 6.5:  # exactly representable weights: bit-identical
            assert torch.equal(a.samples, b.samples)
        assert torch.allclose(a.samples, b.samples, atol=1e-6, rtol=0)
    assert not FlowEulerSampler(cfg_strength=1.0, cfg_convention="reconviagen").guides
    assert not FlowEulerSampler(cfg_strength=0.0).guides


@pytest.mark.parametrize("sig", [0.0, 0.1])
def test_perfect_velocity_model_recovers_x0_in_one_step_and_matches_the_objective(sig):
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    obj = RectifiedFlowObjective(sigma_min=sig)

    def model(x, tt, cond):  # the exact conditional velocity for these x0, eps
        return obj.target(x0, eps)

    sampler = FlowEulerSampler(sigma_min=sig, steps=1)
    out = sampler.sample(model, eps, keep_trajectory=True)
    assert torch.allclose(out.x0[0], x0, atol=1e-12)
    # The sigma_min path ends at x0 + sig * eps (s(0) = sig), and one Euler step follows it exactly.
    assert torch.allclose(out.samples, x0 + sig * eps, atol=1e-12)
    # Mid-way: objective and sampler agree on x0 from the same (x_t, t, v).
    t = 0.37
    x_t = obj.diffuse(x0, torch.full((3,), t, dtype=torch.float64), eps)
    v = obj.target(x0, eps)
    assert torch.allclose(sampler.x0_from_velocity(x_t, t, v), obj.x0_from_velocity(x_t, t, v), atol=1e-14)
    assert torch.allclose(sampler.x0_from_velocity(x_t, t, v), x0, atol=1e-12)
    assert torch.allclose(sampler.velocity_from_x0(x_t, t, x0), v, atol=1e-10)


def test_guidance_interval_uses_the_conditional_prediction_outside():
    steps, lo, hi = 10, 0.35, 0.75
    sampler = FlowEulerSampler(steps=steps, cfg_strength=3.0, cfg_interval=(lo, hi))
    model = GaussianModel(1e-5)
    seen = []

    def hook(step: FlowStep):
        seen.append((step.t, step.guided, step.v_uncond is None, torch.equal(step.v, step.v_cond)))

    sampler.sample(model, torch.randn(4, 3), torch.tensor([[1.0, 0.5]]).expand(4, 2), hook=hook)
    grid = time_grid(steps)
    inside = [(lo <= t <= hi) for t in grid[:-1].tolist()]
    assert [s[1] for s in seen] == inside and 0 < sum(inside) < steps
    for _t, guided, no_uncond, plain in seen:
        assert guided == (not no_uncond) and plain == (not guided)
    assert len(model.calls) == steps + sum(inside)  # the unconditional model only inside


def test_guidance_rescale_matches_the_std_formula_and_zero_is_identity():
    sig, w = 1e-5, 3.0
    noise = torch.randn(3, 2, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cond = torch.tensor([[1.0, 0.3], [0.0, 2.0], [-1.0, 0.7]], dtype=torch.float64)
    plain = FlowEulerSampler(sigma_min=sig, steps=6, cfg_strength=w)
    ref = plain.sample(GaussianModel(sig), noise, cond).samples
    same = FlowEulerSampler(sigma_min=sig, steps=6, cfg_strength=w, guidance_rescale=0.0).sample(GaussianModel(sig), noise, cond).samples
    assert torch.equal(same, ref)

    phi = 0.7
    resc = FlowEulerSampler(sigma_min=sig, steps=6, cfg_strength=w, guidance_rescale=phi)
    records = []

    def hook(step):
        # Independent reference of ReconViaGen's formula, per object over all non-batch dims.
        x, t, vc, vu = step.x_t, step.t, step.v_cond, step.v_uncond
        s = sig + (1 - sig) * t
        v_cfg = (1 + w) * vc - w * vu
        x0c, x0g = (1 - sig) * x - s * vc, (1 - sig) * x - s * v_cfg
        ratio = torch.stack([x0c[i].std() / x0g[i].std() for i in range(3)]).view(3, 1, 1)
        x0 = phi * x0g * ratio + (1 - phi) * x0g
        records.append((step.v, ((1 - sig) * x - x0) / s))

    out = resc.sample(GaussianModel(sig), noise, cond, hook=hook).samples
    assert len(records) == 6 and not torch.allclose(out, ref)
    for v, v_ref in records:
        assert torch.allclose(v, v_ref, atol=1e-10)


def test_guidance_rescale_on_sparse_voxels_is_per_object():
    sig, w, phi = 1e-5, 2.0, 1.0
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.int32)
    sv = SparseVoxels(coords, torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), 4, 2)
    cond = torch.tensor([[1.0, 0.3], [-1.0, 1.5]])

    def model(x, tt, c):
        assert isinstance(x, SparseVoxels)
        b = x.coords[:, 0].long()
        dense = GaussianModel(sig)(x.feats, tt[b], c[b])  # each row with its own object's t and cond
        return x.replace(feats=dense)

    checks = []

    def hook(step):
        if step.index == 0:  # at t = 1 this model's x0 is each object's mean: std is round-off on both sides
            return
        x0 = step.x0.feats
        x0c = step.sampler.x0_from_velocity(step.x_t.feats, step.t, step.v_cond.feats)
        for a, b in [(0, 3), (3, 5)]:  # phi = 1: each object's x0 has the conditional std
            checks.append(abs(float(x0[a:b].std() / x0c[a:b].std()) - 1))

    out = FlowEulerSampler(sigma_min=sig, steps=4, cfg_strength=w, guidance_rescale=phi).sample(model, sv, cond, hook=hook)
    assert isinstance(out.samples, SparseVoxels) and len(checks) == 6 and max(checks) < 1e-5
    # The same run on packed features with a batch index gives the same numbers.
    packed = FlowEulerSampler(sigma_min=sig, steps=4, cfg_strength=w, guidance_rescale=phi).sample(
        lambda x, tt, c: model(sv.replace(feats=x), tt, c).feats, sv.feats, cond, batch_index=coords[:, 0])
    assert torch.allclose(packed.samples, out.samples.feats, atol=1e-6)


def test_multi_condition_modes_round_robin_and_mean():
    views = [torch.tensor([[m, 0.5]]).expand(2, 2) for m in (1.0, 2.0, 3.0)]
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    model = GaussianModel(1e-5)
    FlowEulerSampler(steps=7, multi_condition="stochastic").sample(model, noise, views)
    assert [float(c[0, 0]) for c in model.calls] == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0]

    w = 2.0
    seen = []

    def hook(step):
        c_preds = [GaussianModel(1e-5)(step.x_t, torch.full((2,), 1000 * step.t), v) for v in views]
        mean = sum(c_preds) / 3
        u = GaussianModel(1e-5)(step.x_t, torch.full((2,), 1000 * step.t), torch.zeros(2, 2))
        seen.append(torch.allclose(step.v_cond, mean, atol=1e-6) and torch.allclose(step.v, (1 + w) * mean - w * u, atol=1e-5))

    FlowEulerSampler(steps=5, cfg_strength=w, multi_condition="multidiffusion").sample(GaussianModel(1e-5), noise, views, hook=hook)
    assert seen == [True] * 5
    with pytest.raises(ConfigError, match="list of per-view"):
        FlowEulerSampler(multi_condition="stochastic").sample(model, noise, views[0])


def test_hook_can_replace_v_or_the_next_state_and_use_autograd():
    noise = torch.randn(2, 3)
    model = GaussianModel(1e-5)
    cond = torch.tensor([[1.0, 0.5]]).expand(2, 2)
    frozen = FlowEulerSampler(steps=4).sample(model, noise, cond, hook=lambda s: StepUpdate(v=torch.zeros_like(s.v)))
    assert torch.equal(frozen.samples, noise)
    jump = FlowEulerSampler(steps=4).sample(model, noise, cond, hook=lambda s: StepUpdate(x_prev=s.x0) if s.index == 3 else None)
    plain = FlowEulerSampler(steps=4).sample(model, noise, cond, keep_trajectory=True)
    assert torch.allclose(jump.samples, plain.x0[3], atol=1e-6)

    target = torch.full((2, 3), 1.0)

    def compensate(step):  # a few gradient steps on v so that x0(v) moves towards a target (RVC-like)
        v = step.v.clone().requires_grad_(True)
        opt = torch.optim.Adam([v], lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            loss = (step.sampler.x0_from_velocity(step.x_t, step.t, v) - target).abs().mean() + 0.2 * (v - step.v).abs().mean()
            loss.backward()
            opt.step()
        return StepUpdate(v=v)

    comp = FlowEulerSampler(steps=4).sample(model, noise, cond, hook=compensate)
    assert (comp.samples - target).abs().mean() < (plain.samples - target).abs().mean()
    with pytest.raises(ConfigError, match="exactly one"):
        FlowEulerSampler(steps=2).sample(model, noise, cond, hook=lambda s: StepUpdate())
    with pytest.raises(ConfigError, match="StepUpdate"):
        FlowEulerSampler(steps=2).sample(model, noise, cond, hook=lambda s: s.v)
    with pytest.raises(ShapeError, match="StepUpdate.v"):
        FlowEulerSampler(steps=2).sample(model, noise, cond, hook=lambda s: StepUpdate(v=torch.zeros(2, 4)))


def test_model_receives_t_times_1000_on_the_rescaled_grid():
    got = []
    FlowEulerSampler(steps=5, rescale_t=3.0).sample(lambda x, tt, c: got.append(tt) or torch.zeros_like(x), torch.zeros(3, 2))
    u = np.linspace(1, 0, 6)
    expect = 3 * u / (1 + 2 * u)
    assert all(g.dtype == torch.float32 and g.shape == (3,) for g in got)
    assert np.allclose([float(g[0]) for g in got], 1000 * expect[:-1], rtol=1e-6)


@pytest.mark.parametrize("steps, r", [(12, 3.0), (30, 5.0), (1, 1.0), (7, 0.5)])
def test_time_grid_equals_diffusers_scheduler(steps, r):
    ours = time_grid(steps, r)
    u = np.linspace(1, 0, steps + 1)
    assert torch.allclose(ours, torch.from_numpy(r * u / (1 + (r - 1) * u)), atol=0)
    theirs = time_grid(steps, r, backend="diffusers")
    assert theirs.shape == (steps + 1,) and float((ours - theirs).abs().max()) < 1e-6
    assert float(ours[0]) == 1.0 and float(ours[-1]) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": -1}, "steps"), ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"sigma_min": 1.0}, "sigma_min"),
    ({"sigma_min": -1e-3}, "sigma_min"), ({"rescale_t": 0.0}, "rescale_t"), ({"cfg_interval": (0.8, 0.2)}, "cfg_interval"),
    ({"cfg_interval": (-0.1, 0.5)}, "cfg_interval"), ({"cfg_interval": 0.5}, "cfg_interval"),
    ({"guidance_rescale": 1.5}, "guidance_rescale"), ({"cfg_convention": "diffusers"}, "cfg_convention"),
    ({"multi_condition": "random"}, "multi_condition"), ({"time_grid": "karras"}, "time_grid"),
    ({"cfg_strength": float("nan")}, "cfg_strength"),
])
def test_bad_sampler_options_raise_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match) as e:
        FlowEulerSampler(**kwargs)
    assert "\n" not in str(e.value)


def test_bad_sampling_inputs_raise_one_line():
    with pytest.raises(ConfigError, match="needs a cond"):
        FlowEulerSampler(cfg_strength=2.0).sample(GaussianModel(0.0), torch.randn(2, 3))
    with pytest.raises(ShapeError, match="model output"):
        FlowEulerSampler(steps=1).sample(lambda x, t, c: torch.zeros(2, 4), torch.randn(2, 3))
    with pytest.raises(ShapeError, match="cond: expected the leading batch size 2"):
        FlowEulerSampler(steps=1).sample(GaussianModel(0.0), torch.randn(2, 3), torch.ones(3, 2))
