"""TRELLIS's networks (microsoft/TRELLIS, MIT) in recon3d, named as upstream so the official
``ckpts/<name>.json`` + ``.safetensors`` load strictly (:func:`load_trellis_model`).

Landed (the dense half): the sparse-structure VAE (:class:`SparseStructureEncoder`,
:class:`SparseStructureDecoder`, :func:`occupancy_to_voxels`, :func:`ss_vae_loss`) and the
sparse-structure flow DiT (:class:`SparseStructureFlowModel`); shared blocks in ``modules.py``;
the structured-latent flow (:class:`SLatFlowModel`, sparse blocks in ``sparse_blocks.py``); the
SLAT VAE: :class:`SLatEncoder` (``slat_vae.py``), :class:`SLatGaussianDecoder` and
:class:`SLatMeshDecoder` (``slat_decoders.py``). The radiance-field decoder is not implemented
(:data:`TRELLIS_NOT_YET`).
"""

from recon3d.models.trellis.modules import ModulatedTransformerCrossBlock, pixel_shuffle_3d, timestep_embedding
from recon3d.models.trellis.pretrained import (
    TRELLIS_CLASSES,
    TRELLIS_NOT_YET,
    TRELLIS_PRESETS,
    build_trellis_model,
    convert_trellis_state_dict,
    load_trellis_model,
    read_trellis_json,
)
from recon3d.models.trellis.slat_decoders import SLatGaussianDecoder, SLatMeshDecoder
from recon3d.models.trellis.slat_flow import SLatFlowModel
from recon3d.models.trellis.slat_vae import SLatEncoder
from recon3d.models.trellis.sparse_blocks import (
    ModulatedSparseTransformerCrossBlock,
    SparseResBlock3d,
    SparseTransformerBlock,
    TrellisSparseDownsample,
)
from recon3d.models.trellis.ss_flow import SparseStructureFlowModel
from recon3d.models.trellis.ss_vae import (
    ResBlock3d,
    SparseStructureDecoder,
    SparseStructureEncoder,
    SSVAELoss,
    occupancy_to_voxels,
    ss_vae_loss,
)

__all__ = [
    "SparseStructureEncoder", "SparseStructureDecoder", "SparseStructureFlowModel", "SLatFlowModel", "SparseResBlock3d",
    "SLatEncoder", "SLatGaussianDecoder", "SLatMeshDecoder", "SparseTransformerBlock", "TrellisSparseDownsample",
    "ModulatedSparseTransformerCrossBlock", "ResBlock3d", "ModulatedTransformerCrossBlock",
    "occupancy_to_voxels", "ss_vae_loss", "SSVAELoss", "pixel_shuffle_3d", "timestep_embedding",
    "TRELLIS_CLASSES", "TRELLIS_NOT_YET", "TRELLIS_PRESETS", "build_trellis_model", "read_trellis_json",
    "convert_trellis_state_dict", "load_trellis_model",
]
