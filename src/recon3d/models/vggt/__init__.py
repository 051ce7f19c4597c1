"""VGGT (Wang et al. 2025, facebookresearch/vggt) in recon3d: ReconViaGen's reconstruction prior.

- :mod:`.config`: :class:`VGGTConfig`, presets ``"paper"`` (VGGT-1B) and ``"tiny"``.
- :mod:`.layers`: RoPE-2D, attention blocks, the DINOv2-with-registers patch embedding.
- :mod:`.aggregator`: alternating frame / global attention, per-layer tokens ``[B, S, P, 2C]``.
- :mod:`.heads`: camera head (iterative, 9-d encoding) and DPT depth / point heads.
- :mod:`.cameras`: the 9-d encoding ↔ :class:`recon3d.data.cameras.Cameras`.
- :mod:`.network`: :class:`VGGTNetwork`.
- :mod:`.pretrained`: strict import of the released ``model.pt`` / ``model.safetensors``.
"""

from recon3d.models.vggt.config import VGGT_PRESETS, VGGTConfig, vggt_config
from recon3d.models.vggt.network import VGGTNetwork

__all__ = ["VGGT_PRESETS", "VGGTConfig", "VGGTNetwork", "vggt_config"]
