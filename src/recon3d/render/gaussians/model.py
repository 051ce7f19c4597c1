"""Compatibility home of :class:`~recon3d.representations.gaussians.Gaussians` (moved to
:mod:`recon3d.representations`); the names here are the same objects."""

from recon3d.representations.gaussians import SH_C0, Gaussians, eval_sh, quat_to_rotmat, rgb_to_sh_dc, sh_dc_to_rgb

__all__ = ["Gaussians", "quat_to_rotmat", "eval_sh", "SH_C0", "rgb_to_sh_dc", "sh_dc_to_rgb"]
