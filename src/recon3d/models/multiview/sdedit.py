"""SDEdit for multi-view diffusion (MVBoost eq. 4-5, Algorithm 1): the shared schedule logic.

MVBoost refines the renders ``x^pi`` of a reconstruction by noising them to a timestep
``t = s T`` (eq. 4, ``x_t = alpha_t x + sigma_t eps``) and denoising them with the generator's
own conditioning and guidance (eq. 5). With a discrete sampler of ``N`` steps, recon3d follows
diffusers' img2img convention (``StableDiffusionImg2ImgPipeline.get_timesteps``):

- ``scheduler.set_timesteps(N)`` gives the descending sampling timesteps ``tau_0 > ... > tau_{N-1}``;
- the **last** ``n = int(N * s)`` of them are kept (so ``n = 0`` for ``s < 1 / N``);
- the render is noised with ``scheduler.add_noise`` at the first kept timestep and the loop runs
  over the kept ones only.

For ``N = 40`` (Era3D) ``int(40 s)`` equals ``ceil(40 s)`` at every strength of MVBoost's
Table 3 (0.1 ... 1.0, in exact arithmetic).

Two ends, stated once for every generator (recon3d's own model and Era3D):

- ``s = 0``: no step is kept; the inputs come back unchanged (up to the encoder/decoder round
  trip of a latent model; exactly, in pixel space).
- ``s = 1``: "start from pure noise" (Algorithm 1: ``t = sT = T``). The first sampling timestep is
  not ``T`` itself (Era3D's ``leading`` spacing starts at 976 of 1000, where ``sqrt(alpha_bar)`` is
  still 0.046), so ``add_noise`` there would leave a trace of the render; :func:`sdedit_start`
  instead returns ``noise * scheduler.init_noise_sigma``, the sampler's own starting point, and the
  result does not depend on the renders.
"""

from __future__ import annotations

import math

import torch

from recon3d.errors import ConfigError

__all__ = ["check_strength", "sdedit_timesteps", "sdedit_start"]


def check_strength(strength: float, name: str = "strength") -> float:
    """``strength`` as a float in ``[0, 1]``; anything else is one :class:`ConfigError` line."""
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number in [0, 1], got {strength!r}") from None
    if not (math.isfinite(s) and 0.0 <= s <= 1.0):
        raise ConfigError(f"{name}: expected a number in [0, 1] (0 = keep the views, 1 = start from pure noise), got {strength!r}")
    return s


def sdedit_timesteps(scheduler, num_steps: int, strength: float) -> torch.Tensor:
    """The timesteps an SDEdit pass at ``strength`` runs, in sampling (descending) order.

    Calls ``scheduler.set_timesteps(num_steps)`` and, where the scheduler has it,
    ``set_begin_index`` at the first kept step, exactly as diffusers' img2img pipelines do, so
    ``scheduler.step`` can then be called over the returned timesteps as in a normal loop.

    Args:
        scheduler: a diffusers scheduler (DDIM, DDPM, Euler ...); modified in place.
        num_steps: ``N``, the sampler's number of inference steps (>= 1).
        strength: ``s`` in ``[0, 1]`` (:func:`check_strength`).

    Returns:
        ``(n * scheduler.order,)`` timesteps with ``n = int(N * s)``: the last ``n`` steps of the
        ``N``-step schedule (empty for ``n = 0``).
    """
    s = check_strength(strength)
    if int(num_steps) != num_steps or num_steps < 1:
        raise ConfigError(f"num_steps: expected an integer >= 1, got {num_steps!r}")
    num_steps = int(num_steps)
    scheduler.set_timesteps(num_steps)
    kept = min(int(num_steps * s), num_steps)
    first = (num_steps - kept) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first)
    return scheduler.timesteps[first:]


def sdedit_start(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, strength: float) -> torch.Tensor:
    """The sampler's starting point for an SDEdit pass (eq. 4).

    Args:
        scheduler: the scheduler :func:`sdedit_timesteps` was called on.
        clean: ``(B, ...)`` the encoded renders (latents, or pixels in ``[-1, 1]``).
        noise: ``(B, ...)`` standard normal noise of the same shape.
        timesteps: the kept timesteps from :func:`sdedit_timesteps`.
        strength: the same ``s``.

    Returns:
        ``clean`` itself when no step is kept; ``noise * init_noise_sigma`` at ``s = 1`` (pure
        noise, independent of ``clean``; module docstring); else ``scheduler.add_noise(clean,
        noise, timesteps[0])``.
    """
    s = check_strength(strength)
    if noise.shape != clean.shape:
        raise ConfigError(f"noise: expected the shape of the clean input {list(clean.shape)}, got {list(noise.shape)}")
    if len(timesteps) == 0:
        return clean
    if s >= 1.0:
        return noise * scheduler.init_noise_sigma
    t0 = timesteps[:1].to(clean.device).expand(clean.shape[0])
    return scheduler.add_noise(clean, noise, t0)
