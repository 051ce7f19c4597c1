"""State-space model (Mamba) building blocks in pure PyTorch, with mamba_ssm's kernel as an optional backend."""

from recon3d.models.ssm.cross_scan import cross_merge, cross_scan
from recon3d.models.ssm.selective_scan import mamba_ssm_available, selective_scan, selective_scan_torch

__all__ = ["selective_scan", "selective_scan_torch", "mamba_ssm_available", "cross_scan", "cross_merge"]
