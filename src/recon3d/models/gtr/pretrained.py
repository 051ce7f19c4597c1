"""Import the released GTR checkpoint (``snap-research/gtr`` ``ckpt.pth``) into :class:`GTRNetwork`.

Layout of the official file (verified against ``snap-research/snap_gtr`` at commit 2916db7:
``systems/MeshGen.py`` (``state_dict``/``load_state_dict``), ``models/transformers/generator_v3.py``,
``models/transformers/layers.py``, ``models/base_nerf.py``, ``models/decoders/triplane_decoder.py``,
``models/decoders/fields.py``, ``configs/config_texrefine.yaml``)::

    ckpt["pipeline"]["generator"]   GeneratorV3.state_dict()
        planes                                   (1, 3, 1024, 32, 32)
        conv_proj.weight                         (1024, 10, 16, 16)
        norm1.{weight,bias}                      (1024,)   LayerNorm on image tokens
        norm2.{weight,bias}                      (1024,)   LayerNorm on plane tokens
        attn_layers.{i}.norm1|norm2.{weight,bias}
        attn_layers.{i}.self_attn.to_{q,k,v}.weight          (1024, 1024), no bias
        attn_layers.{i}.self_attn.to_out.0.{weight,bias}     (1024, 1024), (1024,)
        attn_layers.{i}.ff.net.0.proj.{weight,bias}          (8192, 1024), (8192,)  GEGLU
        attn_layers.{i}.ff.net.2.{weight,bias}               (1024, 4096), (1024,)
        out.proj.{weight,bias}                   (2560, 1024, 1, 1), (2560,)  PSUpsampler
    ckpt["pipeline"]["field"]       BaseNeRF.state_dict()
        aabb                                     (6,) buffer [-1,-1,-1,1,1,1]
        decoder.field.mlp_sigma.layers.{0,1,2}.{weight,bias}    120->32->32->1
        decoder.field.mlp_color.layers.{0,1,2,3}.{weight,bias}  120->32->32->32->3
    ckpt["scalers"]                  GradScaler state (ignored)

The mapping is an explicit key table (:func:`official_key_table`); loading is strict: a key
missing from the file, a key the table does not know, or a shape mismatch raises one
:class:`~recon3d.errors.CheckpointError` line, worded by recon3d's one key-mismatch report
(:func:`recon3d.utils.checkpoint.key_mismatch_report`; official keys are named ``part:key``). The
file is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from recon3d.errors import CheckpointError
from recon3d.models.encoders import ConvPatchEncoder
from recon3d.models.gtr.generator import PixelShuffleUpsampler
from recon3d.models.gtr.network import GTRNetwork, gtr_official
from recon3d.utils.checkpoint import key_mismatch_report

__all__ = ["official_key_table", "convert_official_state_dict", "load_official_gtr", "read_official_checkpoint"]

#: Per-block names: official suffix -> recon3d suffix (under ``attn_layers.{i}.`` / ``generator.blocks.{i}.``).
_BLOCK_KEYS = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "self_attn.to_q.weight": "attn.to_q.weight",
    "self_attn.to_k.weight": "attn.to_k.weight",
    "self_attn.to_v.weight": "attn.to_v.weight",
    "self_attn.to_out.0.weight": "attn.to_out.weight",
    "self_attn.to_out.0.bias": "attn.to_out.bias",
    "ff.net.0.proj.weight": "ff.proj_in.weight",
    "ff.net.0.proj.bias": "ff.proj_in.bias",
    "ff.net.2.weight": "ff.proj_out.weight",
    "ff.net.2.bias": "ff.proj_out.bias",
}

#: Generator keys outside the blocks: official -> recon3d.
_GENERATOR_KEYS = {
    "planes": "generator.planes",
    "conv_proj.weight": "encoder.proj.weight",
    "norm1.weight": "generator.token_norm.weight",
    "norm1.bias": "generator.token_norm.bias",
    "norm2.weight": "generator.out_norm.weight",
    "norm2.bias": "generator.out_norm.bias",
    "out.proj.weight": "generator.upsampler.proj.weight",
    "out.proj.bias": "generator.upsampler.proj.bias",
}

#: Field MLPs: official prefix -> recon3d prefix (followed by ``layers.{j}.{weight,bias}``).
_FIELD_MLPS = {"decoder.field.mlp_sigma.": "field.density_mlp.", "decoder.field.mlp_color.": "field.color_mlp."}

#: Non-parameter entries of the official field state dict, checked but not loaded.
_FIELD_BUFFERS = ("aabb",)


def _check_architecture(net: GTRNetwork) -> None:
    problems = []
    if not isinstance(net.encoder, ConvPatchEncoder):
        problems.append(f"encoder is {type(net.encoder).__name__}, the checkpoint has a ConvPatchEncoder (conv_proj)")
    if not isinstance(net.token_proj, nn.Identity):
        problems.append("encoder.out_dim != generator.width (the checkpoint has no token projection)")
    if not isinstance(net.generator.token_norm, nn.LayerNorm):
        problems.append("generator.token_norm is off (the checkpoint has norm1 on image tokens)")
    if not isinstance(net.generator.upsampler, PixelShuffleUpsampler):
        problems.append(f"generator.upsampler is {type(net.generator.upsampler).__name__}, the checkpoint has a pixel shuffle")
    if any(not blk.ff.gated for blk in net.generator.blocks):
        problems.append("generator feed-forward is not gated (the checkpoint has GEGLU)")
    if problems:
        raise CheckpointError("GTR checkpoint does not match the network: " + "; ".join(problems))


def _check_conventions(net: GTRNetwork) -> None:
    problems = []
    if net.field.layout != "interleaved":
        problems.append(f"field.layout={net.field.layout!r} (the released MLPs expect 'interleaved')")
    if net.field.padding_mode != "border":
        problems.append(f"field.padding_mode={net.field.padding_mode!r} (GTR samples with 'border')")
    if getattr(net.encoder, "moment", "dxo") != "dxo":
        problems.append(f"encoder.moment={net.encoder.moment!r} (the released weights were trained on d x o)")
    if not getattr(net.encoder, "use_mask", True):
        problems.append("encoder.use_mask=False (the released weights take rgba: 10 input channels)")
    if problems:
        raise CheckpointError(
            "network conventions differ from the GTR checkpoint (pass check_conventions=False to load anyway): "
            + "; ".join(problems)
        )


def official_key_table(net: GTRNetwork) -> dict[tuple[str, str], str]:
    """``{(part, official_key): recon3d_key}`` for ``net``'s sizes; ``part`` is ``"generator"`` or ``"field"``."""
    table = {("generator", k): v for k, v in _GENERATOR_KEYS.items()}
    for i in range(len(net.generator.blocks)):
        for k, v in _BLOCK_KEYS.items():
            table[("generator", f"attn_layers.{i}.{k}")] = f"generator.blocks.{i}.{v}"
    for off, ours in _FIELD_MLPS.items():
        mlp = net.field.density_mlp if "density" in ours else net.field.color_mlp
        for j in range(len(mlp.layers)):
            for p in ("weight", "bias"):
                table[("field", f"{off}layers.{j}.{p}")] = f"{ours}layers.{j}.{p}"
    return table


def convert_official_state_dict(pipeline: dict, net: GTRNetwork) -> dict[str, torch.Tensor]:
    """Map ``ckpt["pipeline"]`` (``{"field": ..., "generator": ...}``) to ``net.state_dict()`` names.

    Strict: raises :class:`CheckpointError` listing missing and unexpected keys, shape mismatches,
    and network parameters the table leaves uncovered.
    """
    if not isinstance(pipeline, dict) or not {"field", "generator"} <= set(pipeline):
        got = sorted(pipeline) if isinstance(pipeline, dict) else type(pipeline).__name__
        raise CheckpointError(f"GTR checkpoint: expected ckpt['pipeline'] with 'field' and 'generator', got {got}")
    _check_architecture(net)
    table = official_key_table(net)
    ours = net.state_dict()
    missing, unexpected, shapes = [], [], []
    out: dict[str, torch.Tensor] = {}
    for part in ("generator", "field"):
        sd = pipeline[part]
        if not isinstance(sd, dict):
            raise CheckpointError(f"GTR checkpoint: ckpt['pipeline']['{part}'] is {type(sd).__name__}, expected a state dict")
        expected = {k for (p, k) in table if p == part}
        for key, value in sd.items():
            if part == "field" and key in _FIELD_BUFFERS:
                continue
            if key not in expected:
                unexpected.append(f"{part}:{key}")
                continue
            target = table[(part, key)]
            if not isinstance(value, torch.Tensor) or value.shape != ours[target].shape:
                got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                shapes.append(f"{part}:{key} {tuple(got) if isinstance(got, list) else got} vs {target} {tuple(ours[target].shape)}")
                continue
            out[target] = value
        missing += [f"{part}:{k}" for k in sorted(expected - set(sd))]
    n_table = len(table)
    problems = [key_mismatch_report(missing, unexpected, shapes, n_table, n_table - len(missing))]
    uncovered = sorted(set(ours) - set(table.values()))
    if uncovered:  # the key table itself is incomplete for this network (a recon3d bug, not the file's)
        problems.append(f"{len(uncovered)} network entries with no checkpoint key (e.g. {uncovered[:3]})")
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError("GTR checkpoint does not match the network: " + "; ".join(problems))
    aabb = pipeline["field"].get("aabb")
    if isinstance(aabb, torch.Tensor):
        lo, hi = net.field.aabb
        want = torch.tensor([lo, lo, lo, hi, hi, hi], dtype=aabb.dtype)
        if aabb.shape != (6,) or not torch.allclose(aabb.cpu(), want):
            raise CheckpointError(f"GTR checkpoint: field aabb {aabb.tolist()} differs from the network's box {[lo, hi]}")
    return out


def read_official_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """``ckpt["pipeline"]`` of a GTR checkpoint file, read with ``weights_only=True``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"GTR checkpoint {str(path)!r} not found: download ckpt.pth from the Hugging Face repo "
            "snap-research/gtr and give its local path"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # any unpickling failure means a bad or unsafe file
        raise CheckpointError(f"GTR checkpoint {str(path)!r}: cannot be read safely (weights_only=True): {err}") from err
    if not isinstance(ckpt, dict) or "pipeline" not in ckpt:
        got = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"GTR checkpoint {str(path)!r}: expected a dict with key 'pipeline', got {got}")
    return ckpt["pipeline"]


def load_official_gtr(
    path: str | Path,
    net: GTRNetwork | None = None,
    map_location: str | torch.device = "cpu",
    check_conventions: bool = True,
) -> GTRNetwork:
    """Load the released GTR weights into ``net`` (default: :func:`gtr_official`) and return it.

    ``check_conventions`` refuses a network whose ray-moment sign, mask channel, triplane
    channel layout or padding differ from what the weights were trained with.
    """
    net = gtr_official() if net is None else net
    if check_conventions:
        _check_conventions(net)
    state = convert_official_state_dict(read_official_checkpoint(path, map_location), net)
    net.load_state_dict(state, strict=True)
    return net
