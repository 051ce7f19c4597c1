"""LGM's two input augmentations, in pure torch with explicit random generators.

LGM (Tang et al. 2024, §3.3 "Robust training") trains on ground-truth renders but is used on the
outputs of a multi-view diffusion model, whose views are neither exactly 3D-consistent nor at
exactly the poses they claim. Two augmentations, applied to the *input* views 1…V−1 only (view 0
is the reference every pose is normalised to, so it stays clean), close that gap:

- :func:`grid_distortion`: a random, smooth, monotone warp of each image (a separable
  piecewise-linear remap of the x and y pixel coordinates) that imitates the small misalignments
  between generated views;
- :func:`orbit_camera_jitter`: a random rotation of each camera about the world origin (the
  object's centre), around the camera's own up and right axes, that imitates pose error. Only the
  cameras the network *sees* are jittered; images and supervision stay untouched.

:func:`augment_input_views` applies both to a batch with LGM's probabilities (0.5 each, one coin
per object, as the official data loader does per sample).

Relation to the official code (core/utils.py ``grid_distortion`` / ``orbit_camera_jitter``):

- same knots (8…16 per axis, drawn once per call), same perturbation (``strength (u − ½) /
  (n − 1)`` with ``u ~ U(0, 1)``, ends fixed), same default strengths (0.5 and 0.1), same jitter
  ranges (±``strength``·π about the up axis, ±``strength``·π/2 about the right axis, rotations
  composed ``R_up · R_right``);
- the warp here is continuous and maps pixel *centres* to pixel centres, so strength 0 is the
  identity; upstream rounds the knots to whole pixels and spaces ``linspace`` segments that
  repeat their end points, which blurs and shifts the image slightly even at strength 0, and its
  zero padding darkens the border pixels (here: border padding);
- cameras are recon3d's OpenCV ``c2w`` (x right, y down, z forward): the camera's up axis is
  ``−y``, its right axis ``x`` (upstream takes OpenGL poses, up ``+y``). Since the angles are
  symmetric around 0 this is the same distribution of poses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from recon3d.errors import ConfigError
from recon3d.utils.checks import check_shape

__all__ = ["grid_distortion", "orbit_camera_jitter", "augment_input_views", "axis_angle_matrix"]


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device=None) -> torch.Tensor:
    """``U(0, 1)`` of ``shape`` drawn on the CPU from ``generator`` (the global RNG when None),
    then moved: the same seed gives the same numbers on every device."""
    return torch.rand(shape, generator=generator).to(device)


def _check_strength(name: str, value: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= high:
        raise ConfigError(f"{name}: expected a number in [0, {high:g}], got {value!r}")


def _warp_coordinates(knots: torch.Tensor, size: int) -> torch.Tensor:
    """Source coordinates in grid_sample's ``[-1, 1]`` (``align_corners=False``) of the ``size``
    output pixel centres, under the piecewise-linear warp that sends the perturbed knot ``k`` of
    ``knots (N, n)`` (increasing, in ``[0, 1]``) to the even knot ``k / (n − 1)``. ``(N, size)``."""
    n = knots.shape[-1]
    p = (torch.arange(size, dtype=knots.dtype, device=knots.device) + 0.5) / size  # pixel centres in (0, 1)
    p = p.expand(knots.shape[0], size).contiguous()
    k = (torch.searchsorted(knots.contiguous(), p, right=True) - 1).clamp(0, n - 2)
    lo, hi = knots.gather(1, k), knots.gather(1, k + 1)
    frac = (p - lo) / (hi - lo).clamp_min(1e-8)
    phi = (k.to(knots.dtype) + frac.clamp(0, 1)) / (n - 1)
    return phi * 2 - 1


def _perturbed_knots(count: int, n: int, strength: float, generator, device, dtype) -> torch.Tensor:
    """``(count, n)`` knots ``k / (n − 1) + strength (u − ½) / (n − 1)``, clamped, ends at 0 and 1.
    With ``strength ≤ 1`` neighbours move at most half a segment each, so the knots stay ordered."""
    even = torch.linspace(0, 1, n, dtype=torch.float64)
    u = _uniform((count, n), generator).double()
    knots = (even + strength * (u - 0.5) / (n - 1)).clamp(0, 1)
    knots[:, 0], knots[:, -1] = 0.0, 1.0
    return knots.to(device=device, dtype=dtype)


def grid_distortion(
    images: torch.Tensor,
    strength: float = 0.5,
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Randomly and smoothly warp every image (module docstring).

    Args:
        images: ``(N, C, H, W)`` float images (any range; bilinear resampling keeps each output
            pixel a convex combination of input pixels, so ``[0, 1]`` stays ``[0, 1]``).
        strength: knot displacement in units of one segment, in ``[0, 1]`` (LGM: 0.5); 0 is the
            identity.
        num_steps: knots per axis (≥ 2); None draws it in 8…16 from ``generator`` (LGM).
        generator: random source (None: torch's global RNG).

    Returns:
        ``(N, C, H, W)`` warped images, same dtype and device. Each image gets its own warp; the
        x and y warps are independent (a separable remap, as upstream).
    """
    check_shape(images, "N C H W", "images")
    _check_strength("grid_distortion.strength", strength, 1.0)
    if num_steps is None:
        num_steps = int(torch.randint(8, 17, (1,), generator=generator).item())
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ConfigError(f"grid_distortion.num_steps: expected an integer >= 2, got {num_steps!r}")
    N, _, H, W = images.shape
    if N == 0:
        return images.clone()
    # Coordinates in float32 at least: a bf16 grid would misplace pixels by more than the warp.
    ctype = torch.float64 if images.dtype == torch.float64 else torch.float32
    kx = _perturbed_knots(N, num_steps, strength, generator, images.device, ctype)
    ky = _perturbed_knots(N, num_steps, strength, generator, images.device, ctype)
    gx = _warp_coordinates(kx, W)[:, None, :].expand(N, H, W)
    gy = _warp_coordinates(ky, H)[:, :, None].expand(N, H, W)
    grid = torch.stack([gx, gy], -1)
    out = F.grid_sample(images.to(ctype), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(images.dtype)


def axis_angle_matrix(axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(N, 3, 3)`` by ``angle (N,)`` radians about unit ``axis (N, 3)``
    (Rodrigues: ``I + sin θ [a]× + (1 − cos θ) [a]×²``)."""
    check_shape(axis, "N 3", "axis")
    a = F.normalize(axis, dim=-1)
    x, y, z = a.unbind(-1)
    zero = torch.zeros_like(x)
    cross = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).view(-1, 3, 3)
    s, c = torch.sin(angle)[:, None, None], torch.cos(angle)[:, None, None]
    eye = torch.eye(3, dtype=axis.dtype, device=axis.device).expand_as(cross)
    return eye + s * cross + (1 - c) * (cross @ cross)


def orbit_camera_jitter(c2w: torch.Tensor, strength: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotate every camera about the world origin by a random small rotation (module docstring).

    The rotation is ``R_up(α) · R_right(β)`` with ``α ~ U(−1, 1) · strength · π`` about the
    camera's up axis and ``β ~ U(−1, 1) · strength · π / 2`` about its right axis (both axes of
    the camera before the jitter); ``c2w' = [rot · R | rot · t]``. The camera stays a rigid pose
    at the same distance from the origin, and one that looked at the origin still does.

    Args:
        c2w: ``(N, 4, 4)`` OpenCV camera-to-world matrices (recon3d's convention).
        strength: in ``[0, 1]`` (LGM: 0.1, i.e. up to ±18° about the up axis, ±9° about the
            right axis); 0 returns the cameras unchanged.
        generator: random source (None: torch's global RNG).

    Returns:
        ``(N, 4, 4)`` jittered c2w, same dtype and device.
    """
    check_shape(c2w, "N 4 4", "c2w")
    _check_strength("orbit_camera_jitter.strength", strength, 1.0)
    N = c2w.shape[0]
    ctype = torch.float64 if c2w.dtype == torch.float64 else torch.float32
    pose = c2w.to(ctype)
    u = _uniform((N, 2), generator, c2w.device).to(ctype) * 2 - 1
    up, right = -pose[:, :3, 1], pose[:, :3, 0]  # OpenCV: y points down
    rot = axis_angle_matrix(up, u[:, 0] * strength * math.pi) @ axis_angle_matrix(right, u[:, 1] * strength * math.pi / 2)
    out = pose.clone()
    out[:, :3, :3] = rot @ pose[:, :3, :3]
    out[:, :3, 3:] = rot @ pose[:, :3, 3:]
    return out.to(c2w.dtype)


def augment_input_views(
    images: torch.Tensor,
    c2w: torch.Tensor,
    prob_grid_distortion: float = 0.5,
    prob_camera_jitter: float = 0.5,
    grid_strength: float = 0.5,
    jitter_strength: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LGM's training augmentation of a batch of input views.

    Per object, one coin with probability ``prob_grid_distortion`` decides whether its views
    1…V−1 are warped (:func:`grid_distortion`), and one with ``prob_camera_jitter`` whether their
    cameras are jittered (:func:`orbit_camera_jitter`). View 0 is never changed.

    Args:
        images: ``(B, V, C, H, W)`` input images in ``[0, 1]`` (before any normalisation).
        c2w: ``(B, V, 4, 4)`` OpenCV camera-to-world of the input views.
        prob_grid_distortion, prob_camera_jitter: probabilities in ``[0, 1]`` (LGM: 0.5, 0.5).
        grid_strength, jitter_strength: the augmentations' strengths (LGM: 0.5, 0.1).
        generator: random source (None: torch's global RNG, which Lightning checkpoints carry).

    Returns:
        ``(images, c2w)`` of the same shapes; new tensors (the inputs are not modified).
    """
    dims: dict = {}
    check_shape(images, "B V C H W", "images", dims)
    check_shape(c2w, "B V 4 4", "c2w", dims)
    _check_strength("prob_grid_distortion", prob_grid_distortion, 1.0)
    _check_strength("prob_camera_jitter", prob_camera_jitter, 1.0)
    B, V = images.shape[:2]
    images, c2w = images.clone(), c2w.clone()
    if V < 2:
        return images, c2w
    coins = _uniform((B, 2), generator)
    warp = (coins[:, 0] < prob_grid_distortion).nonzero().flatten().tolist()
    jitter = (coins[:, 1] < prob_camera_jitter).nonzero().flatten().tolist()
    if warp:
        sel = images[warp, 1:]
        images[warp, 1:] = grid_distortion(sel.flatten(0, 1), grid_strength, generator=generator).view_as(sel)
    if jitter:
        sel = c2w[jitter, 1:]
        c2w[jitter, 1:] = orbit_camera_jitter(sel.flatten(0, 1), jitter_strength, generator=generator).view_as(sel)
    return images, c2w

