"""State-space model (Mamba) building blocks: a pure-PyTorch selective scan, a fused C kernel for
the CPU, and mamba_ssm's CUDA kernel as optional backends."""

from recon3d.models.ssm.cross_scan import cross_merge, cross_scan
from recon3d.models.ssm.selective_scan import (
    BACKENDS,
    mamba_ssm_available,
    selective_scan,
    selective_scan_fused_cpu,
    selective_scan_torch,
)

__all__ = [
    "BACKENDS", "selective_scan", "selective_scan_torch", "selective_scan_fused_cpu", "mamba_ssm_available",
    "cross_scan", "cross_merge",
]
