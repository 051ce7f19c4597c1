"""Official TRELLIS checkpoints: ``ckpts/<name>.json`` + ``ckpts/<name>.safetensors``.

The json is ``{"name": <class name>, "args": {<constructor arguments>}}`` and the safetensors file
holds the module's state dict under upstream's attribute names (no prefix); upstream loads it with
``model.load_state_dict(load_file(...))`` (strict; ``trellis/models/__init__.py``). recon3d's
classes carry the same names, so the map is the identity, spelled out as :data:`TRELLIS_CLASSES`
(class name -> recon3d class).

``use_fp16``: every released json says ``"use_fp16": true``, and upstream then holds the torso's
Linear/Conv weights in float16 (the file stores them so). :func:`load_trellis_model` builds with
``use_fp16=False`` by default — float32 everywhere, the file's tensors upcast — because float16
convolutions and matmuls are slow or missing on CPUs; pass ``use_fp16=None`` to keep the json's.

Strict, all or nothing: every model key must be in the file with its shape and no file key may be
unknown; otherwise one :class:`CheckpointError` line names the file and the first mismatches, and
no tensor is copied into the model (the check runs before ``load_state_dict``). Paths are local;
nothing is downloaded.

:data:`TRELLIS_PRESETS` holds the constructor args of the released TRELLIS-image-large
checkpoints (from upstream's ``configs/``: SS VAE, SS flow, SLAT flow, SLAT encoder, Gaussian and
mesh decoders) and of recon3d's tiny CPU test sizes. The radiance-field decoder is not implemented
(:data:`TRELLIS_NOT_YET`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn

from recon3d.errors import CheckpointError, ConfigError
from recon3d.models.trellis.slat_decoders import GAUSSIAN_REPRESENTATION_DEFAULTS, SLatGaussianDecoder, SLatMeshDecoder
from recon3d.models.trellis.slat_flow import SLatFlowModel
from recon3d.models.trellis.slat_vae import SLatEncoder
from recon3d.models.trellis.ss_flow import SparseStructureFlowModel
from recon3d.models.trellis.ss_vae import SparseStructureDecoder, SparseStructureEncoder
from recon3d.utils.checkpoint import key_mismatch_report, load_state_dict_file

__all__ = ["TRELLIS_CLASSES", "TRELLIS_NOT_YET", "TRELLIS_PRESETS", "build_trellis_model", "read_trellis_json",
           "convert_trellis_state_dict", "load_trellis_model"]

#: Upstream class name -> recon3d class (identical constructor arguments and state-dict names).
TRELLIS_CLASSES: dict[str, type[nn.Module]] = {
    "SparseStructureEncoder": SparseStructureEncoder,
    "SparseStructureDecoder": SparseStructureDecoder,
    "SparseStructureFlowModel": SparseStructureFlowModel,
    "SLatFlowModel": SLatFlowModel,
    "SLatEncoder": SLatEncoder,
    "SLatGaussianDecoder": SLatGaussianDecoder,
    "SLatMeshDecoder": SLatMeshDecoder,
    # upstream's training-time variants: a memory-management mixin over the same layout and forward
    "ElasticSLatFlowModel": SLatFlowModel,
    "ElasticSLatEncoder": SLatEncoder,
    "ElasticSLatGaussianDecoder": SLatGaussianDecoder,
    "ElasticSLatMeshDecoder": SLatMeshDecoder,
}

#: Upstream classes recon3d does not implement yet (named as such in the error, not as unknown).
TRELLIS_NOT_YET = ("SLatRadianceFieldDecoder", "ElasticSLatRadianceFieldDecoder")

#: The released Gaussian decoder's representation_config (slat_vae_enc_dec_gs_swin8_B_64l8_fp16.json).
_GS_REP = GAUSSIAN_REPRESENTATION_DEFAULTS
_SS_VAE_PAPER = {"latent_channels": 8, "num_res_blocks": 2, "num_res_blocks_middle": 2, "use_fp16": True}
_SS_VAE_TINY = {"latent_channels": 4, "num_res_blocks": 1, "num_res_blocks_middle": 1, "use_fp16": False}

#: ``{preset: {"name": class name, "args": {...}}}`` — the released dense TRELLIS-image-large
#: checkpoints (``ss_enc_conv3d_16l8_fp16`` etc., args as upstream's configs) and tiny CPU sizes
#: (16^3 occupancy -> 4 x 4^3 latent; a 2-block, 32-wide flow over 4 x 8^3).
TRELLIS_PRESETS: dict[str, dict] = {
    "ss_enc_conv3d_16l8_fp16": {"name": "SparseStructureEncoder",
                                "args": {"in_channels": 1, "channels": [32, 128, 512], **_SS_VAE_PAPER}},
    "ss_dec_conv3d_16l8_fp16": {"name": "SparseStructureDecoder",
                                "args": {"out_channels": 1, "channels": [512, 128, 32], **_SS_VAE_PAPER}},
    "ss_flow_img_dit_L_16l8_fp16": {"name": "SparseStructureFlowModel", "args": {
        "resolution": 16, "in_channels": 8, "out_channels": 8, "model_channels": 1024, "cond_channels": 1024,
        "num_blocks": 24, "num_heads": 16, "mlp_ratio": 4, "patch_size": 1, "pe_mode": "ape", "qk_rms_norm": True,
        "use_fp16": True}},
    "ss_enc_tiny": {"name": "SparseStructureEncoder", "args": {"in_channels": 1, "channels": [8, 16, 32], **_SS_VAE_TINY}},
    "ss_dec_tiny": {"name": "SparseStructureDecoder", "args": {"out_channels": 1, "channels": [32, 16, 8], **_SS_VAE_TINY}},
    "ss_flow_tiny": {"name": "SparseStructureFlowModel", "args": {
        "resolution": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "cond_channels": 16,
        "num_blocks": 2, "num_heads": 2, "mlp_ratio": 2, "patch_size": 1, "pe_mode": "ape", "qk_rms_norm": True,
        "use_fp16": False}},
    # share_mod, patch 2 and RMS norm in cross-attention: the other layout branches of the class.
    "ss_flow_tiny_shared_p2": {"name": "SparseStructureFlowModel", "args": {
        "resolution": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "cond_channels": 16,
        "num_blocks": 2, "num_heads": 4, "mlp_ratio": 4, "patch_size": 2, "pe_mode": "ape", "share_mod": True,
        "qk_rms_norm": True, "qk_rms_norm_cross": True, "use_fp16": False}},
    # SLAT flow: the released args (configs/generation/slat_flow_img_dit_L_64l8p2_fp16.json) and
    # tiny sizes (16^3 -> 8^3 at patch 2; the second: two io stages (patch 4), one res block per
    # stage). Upstream's qk_rms_norm_cross cannot run with a dense condition (its kv.unbind(dim=1)
    # splits the tokens), so no preset sets it.
    "slat_flow_img_dit_L_64l8p2_fp16": {"name": "SLatFlowModel", "args": {
        "resolution": 64, "in_channels": 8, "out_channels": 8, "model_channels": 1024, "cond_channels": 1024,
        "num_blocks": 24, "num_heads": 16, "mlp_ratio": 4, "patch_size": 2, "num_io_res_blocks": 2,
        "io_block_channels": [128], "pe_mode": "ape", "qk_rms_norm": True, "use_fp16": True}},
    "slat_flow_tiny": {"name": "SLatFlowModel", "args": {
        "resolution": 16, "in_channels": 4, "out_channels": 4, "model_channels": 32, "cond_channels": 16,
        "num_blocks": 2, "num_heads": 2, "mlp_ratio": 2, "patch_size": 2, "num_io_res_blocks": 2,
        "io_block_channels": [16], "pe_mode": "ape", "qk_rms_norm": True, "use_fp16": False}},
    "slat_flow_tiny_p4": {"name": "SLatFlowModel", "args": {
        "resolution": 16, "in_channels": 4, "out_channels": 4, "model_channels": 32, "cond_channels": 16,
        "num_blocks": 2, "num_heads": 4, "mlp_ratio": 2, "patch_size": 4, "num_io_res_blocks": 1,
        "io_block_channels": [8, 16], "pe_mode": "ape", "qk_rms_norm": True, "use_fp16": False}},
    # SLAT VAE: the released encoder / Gaussian / mesh decoders (configs/vae/slat_vae_enc_dec_gs_swin8_B_64l8_fp16.json,
    # slat_vae_dec_mesh_swin8_B_64l8_fp16.json) and tiny sizes (16^3 with swin windows of 4, so
    # objects span several windows and the shifted blocks regroup them; the mesh decoder's 256 wide
    # is the smallest its GroupNorm(32) of C/8 allows).
    "slat_enc_swin8_B_64l8_fp16": {"name": "SLatEncoder", "args": {
        "resolution": 64, "in_channels": 1024, "model_channels": 768, "latent_channels": 8, "num_blocks": 12,
        "num_heads": 12, "mlp_ratio": 4, "attn_mode": "swin", "window_size": 8, "use_fp16": True}},
    "slat_dec_gs_swin8_B_64l8gs32_fp16": {"name": "SLatGaussianDecoder", "args": {
        "resolution": 64, "model_channels": 768, "latent_channels": 8, "num_blocks": 12, "num_heads": 12,
        "mlp_ratio": 4, "attn_mode": "swin", "window_size": 8, "use_fp16": True,
        "representation_config": _GS_REP}},
    "slat_dec_mesh_swin8_B_64l8m256c_fp16": {"name": "SLatMeshDecoder", "args": {
        "resolution": 64, "model_channels": 768, "latent_channels": 8, "num_blocks": 12, "num_heads": 12,
        "mlp_ratio": 4, "attn_mode": "swin", "window_size": 8, "use_fp16": True,
        "representation_config": {"use_color": True}}},
    "slat_enc_tiny": {"name": "SLatEncoder", "args": {
        "resolution": 16, "in_channels": 16, "model_channels": 32, "latent_channels": 4, "num_blocks": 2,
        "num_heads": 2, "mlp_ratio": 2, "attn_mode": "swin", "window_size": 4, "use_fp16": False}},
    "slat_dec_gs_tiny": {"name": "SLatGaussianDecoder", "args": {
        "resolution": 16, "model_channels": 32, "latent_channels": 4, "num_blocks": 2, "num_heads": 2,
        "mlp_ratio": 2, "attn_mode": "swin", "window_size": 4, "qk_rms_norm": True, "use_fp16": False,
        "representation_config": {**_GS_REP, "num_gaussians": 8}}},
    "slat_dec_mesh_tiny": {"name": "SLatMeshDecoder", "args": {
        "resolution": 8, "model_channels": 256, "latent_channels": 4, "num_blocks": 1, "num_heads": 4,
        "mlp_ratio": 1, "attn_mode": "swin", "window_size": 4, "use_fp16": False,
        "representation_config": {"use_color": True}}},
}


def _class_for(name: object, source: str) -> type[nn.Module]:
    if name in TRELLIS_CLASSES:
        return TRELLIS_CLASSES[name]
    if name in TRELLIS_NOT_YET:
        raise ConfigError(f"{source}: TRELLIS class {name!r} is not implemented in recon3d yet "
                          f"(available: {sorted(TRELLIS_CLASSES)})")
    raise ConfigError(f"{source}: unknown TRELLIS model class {name!r} in 'name'; expected one of {sorted(TRELLIS_CLASSES)}")


def build_trellis_model(name: str, args: dict, source: str = "TRELLIS config", use_fp16: bool | None = False) -> nn.Module:
    """Build recon3d's class for upstream class ``name`` with ``args`` (a json's ``args``).

    ``use_fp16``: False/True overrides the args' value; None keeps it. An unknown class or a bad
    argument is one :class:`ConfigError` naming ``source``.
    """
    cls = _class_for(name, source)
    if not isinstance(args, dict):
        raise ConfigError(f"{source}: 'args' must be an object of constructor arguments, got {type(args).__name__}")
    args = copy.deepcopy(args)
    if use_fp16 is not None:
        args["use_fp16"] = bool(use_fp16)
    try:
        return cls(**args)
    except TypeError as e:  # an argument the class does not take
        raise ConfigError(f"{source}: bad 'args' for {name}: {e}") from None


def read_trellis_json(json_path: str | Path) -> tuple[str, dict]:
    """``(class name, args)`` of a TRELLIS ``<name>.json``."""
    path = Path(json_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"TRELLIS model config {str(path)!r} not found (expected ckpts/<name>.json beside <name>.safetensors)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "name" not in cfg or "args" not in cfg:
        raise ConfigError(f"{path}: expected an object with 'name' (model class) and 'args', got keys "
                          f"{sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__}")
    return cfg["name"], cfg["args"]


def convert_trellis_state_dict(state: dict, model: nn.Module, source: str = "TRELLIS weights") -> dict[str, torch.Tensor]:
    """Check ``state`` against ``model`` (keys and shapes, strict) and cast each tensor to the model
    entry's dtype (float16 file weights -> a float32 model's float32). Raises one CheckpointError."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    shapes, out = [], {}
    for key in sorted(set(ours) & set(state)):
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            what = f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{source}: key {key!r} holds a {what}, expected a floating-point tensor")
        if tuple(value.shape) != tuple(ours[key].shape):
            shapes.append(f"{key} {tuple(value.shape)} vs {tuple(ours[key].shape)}")
            continue
        out[key] = value.to(ours[key].dtype)
    report = key_mismatch_report(missing, unexpected, shapes, len(ours), len(ours) - len(missing))
    if report:
        raise CheckpointError(f"{source} do not match {type(model).__name__}: {report}")
    return out


def load_trellis_model(json_path: str | Path, weights: str | Path | None = None, use_fp16: bool | None = False,
                       map_location: str | torch.device = "cpu") -> nn.Module:
    """Build the model a TRELLIS ``<name>.json`` describes and load ``<name>.safetensors`` strictly.

    Args:
        json_path: the checkpoint's json (``{"name", "args"}``).
        weights: the weight file; default the json's path with suffix ``.safetensors``.
        use_fp16: override of the json's ``use_fp16`` (default False: float32 on CPU); None keeps it.
        map_location: device of the returned model.

    Returns the model in eval mode. Raises :class:`ConfigError` (json missing/malformed, unknown
    class, bad args) or :class:`CheckpointError` (weights missing or not matching; nothing loaded).
    """
    json_path = Path(json_path).expanduser()
    name, args = read_trellis_json(json_path)
    model = build_trellis_model(name, args, source=str(json_path), use_fp16=use_fp16)
    wpath = json_path.with_suffix(".safetensors") if weights is None else Path(weights).expanduser()
    if not wpath.is_file():
        raise CheckpointError(f"TRELLIS weights {str(wpath)!r} not found (the .safetensors beside {json_path.name})")
    state = load_state_dict_file(wpath)
    if not isinstance(state, dict):
        raise CheckpointError(f"{wpath}: expected a flat dict of tensors, got {type(state).__name__}")
    state = convert_trellis_state_dict(state, model, source=f"TRELLIS weights {str(wpath)!r}")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()
