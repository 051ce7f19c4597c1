"""Write the Era3D multi-view UNet weight-layout manifest from the upstream class definitions.

Era3D (pengHTYX/Era3D, code AGPL-3.0) pins diffusers 0.26 / transformers 4.37, so its classes do
not import next to recon3d's diffusers. This script is therefore run **in a separate
environment** and is never imported by recon3d; nothing of upstream is copied into recon3d,
upstream's own files are imported from a checkout::

    python3.11 -m venv /tmp/era3d_venv
    /tmp/era3d_venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    /tmp/era3d_venv/bin/pip install diffusers==0.26.0 transformers==4.37.2 accelerate einops \
        huggingface_hub==0.25.2          # diffusers 0.26 imports cached_download (gone in hub >= 0.26)
    /tmp/era3d_venv/bin/python scripts/make_era3d_manifest.py /path/to/Era3D        # a checkout
    /tmp/era3d_venv/bin/python scripts/make_era3d_manifest.py /path/to/Era3D.git --rev a2ce68d

It builds upstream's ``mvdiffusion.models.unet_mv2d_condition.UNetMV2DConditionModel`` with the
Era3D inference options (``configs/test_unclip-512-6view*.yaml``: ``selfattn_block=self_rowwise``,
``mvcd_attention=True``, ``multiview_attention=True``, ``sparse_mv_attention=True``,
``cd_attention_{mid,last}=False``, ``num_regress_blocks=3``, ``projection_camera_embeddings_input_dim=4``)
at three sizes and writes every state-dict key with its shape and dtype
(``tests/fixtures/era3d/official_manifest.json``):

- ``paper``: the released ``MacLab-Era3D-512-6view`` UNet: the SD-2.1-unCLIP layout (blocks
  320/640/1280/1280, 2 layers, heads 5/10/20/20, text width 1024, class input 2048 = CLIP image
  embedding 1024 + noise-level embedding 1024, linear projections), 8 input channels, elevation and
  focal regressors. Built on the ``meta`` device (no memory for 1e9 parameters).
- ``paper_ortho``: the ``-ortho`` release (no regressors, no camera embedding).
- ``tiny``: recon3d's CPU test size (:data:`recon3d.models.era3d.unet.ERA3D_PRESETS` ``"tiny"``).

The SD-2.1-unCLIP numbers are the public ``stabilityai/stable-diffusion-2-1-unclip``
``unet/config.json`` values as Era3D's ``from_pretrained_2d`` would read them (that file could not
be read from this machine); the released Era3D ``unet/config.json`` is what recon3d reads at load
time, so a deviation would show up there as a one-line error, not silently.

It also records a **forward reference** at tiny size (``tests/fixtures/era3d/tiny_forward.safetensors``):
deterministic weights (key ``i`` of the sorted state dict gets ``std * randn`` from
``torch.Generator().manual_seed(i)``, ``std = 1/sqrt(fan_in)`` for matrices and kernels, 0.2 for vectors), deterministic inputs, upstream's output ``sample`` and
``pose_pred``. recon3d's test rebuilds the same weights and compares. For this, the xFormers
processors upstream uses at inference (``enable_xformers_memory_efficient_attention`` in
``test_mvdiffusion_unclip.py``) are attached to the row-wise and joint attentions, with a plain
softmax(q k^T / sqrt(d)) v stand-in for ``xformers.ops.memory_efficient_attention`` installed here
(xFormers is CUDA-only). The xFormers path is the one that defines Era3D's numbers: upstream's
non-xFormers ``JointAttnProcessor`` ends with ``cat([h[:, 0], h[:, 1]])`` (two tokens, not the two
domains) and cannot run on a real batch.
"""

from __future__ import annotations

import argparse
import tempfile
import types
from pathlib import Path

import _upstream
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "era3d"
UPSTREAM_DIR = "mvdiffusion/models"

# Options every Era3D inference config passes (configs/test_unclip-512-6view.yaml and -ortho.yaml).
ERA3D_OPTIONS = dict(
    num_views=6, sample_size=64, cd_attention_last=False, cd_attention_mid=False, multiview_attention=True,
    sparse_mv_attention=True, selfattn_block="self_rowwise", mvcd_attention=True, use_dino=False,
    projection_camera_embeddings_input_dim=4, num_regress_blocks=3,
    down_block_types=("CrossAttnDownBlockMV2D", "CrossAttnDownBlockMV2D", "CrossAttnDownBlockMV2D", "DownBlock2D"),
    mid_block_type="UNetMidBlockMV2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlockMV2D", "CrossAttnUpBlockMV2D", "CrossAttnUpBlockMV2D"),
)
# stabilityai/stable-diffusion-2-1-unclip unet/config.json (shape-relevant entries), in_channels 8 (Era3D).
SD21_UNCLIP = dict(
    in_channels=8, out_channels=4, act_fn="silu", attention_head_dim=(5, 10, 20, 20), block_out_channels=(320, 640, 1280, 1280),
    class_embed_type="projection", projection_class_embeddings_input_dim=2048, cross_attention_dim=1024,
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32, use_linear_projection=True, upcast_attention=True,
)
CONFIGS = {
    "paper": dict(SD21_UNCLIP, **ERA3D_OPTIONS, regress_elevation=True, regress_focal_length=True),
    "paper_ortho": dict(SD21_UNCLIP, **ERA3D_OPTIONS, regress_elevation=False, regress_focal_length=False),
    # recon3d's "tiny" preset: two levels, 32/64 channels, 2/4 heads (head width 16), text width 16.
    "tiny": dict(
        ERA3D_OPTIONS, in_channels=8, out_channels=4, act_fn="silu", attention_head_dim=(2, 4), block_out_channels=(32, 64),
        class_embed_type="projection", projection_class_embeddings_input_dim=32, cross_attention_dim=16, downsample_padding=1,
        flip_sin_to_cos=True, freq_shift=0, layers_per_block=1, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=8,
        use_linear_projection=True, upcast_attention=False, sample_size=8, num_regress_blocks=1,
        down_block_types=("CrossAttnDownBlockMV2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlockMV2D"),
        regress_elevation=True, regress_focal_length=True,
    ),
}


def _checkout(src: Path, rev: str, tmp: Path) -> tuple[Path, str | None]:
    """The folder holding ``mvdiffusion/models`` and the commit it is at (None when unknown)."""
    if _upstream.is_checkout(src, f"{UPSTREAM_DIR}/unet_mv2d_condition.py"):
        return src, _upstream.head_commit(src)
    # the folder's own entries (full paths), not recursive
    commit, names = _upstream.resolve_revision(src, rev, f"{UPSTREAM_DIR}/", tree=f"{UPSTREAM_DIR}/")
    _upstream.show_into(src, commit, names, tmp)
    return tmp, commit


def _plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias=None, **_) -> torch.Tensor:
    """Stand-in for ``xformers.ops.memory_efficient_attention`` on ``(B, M, K)`` tensors (default scale 1/sqrt(K))."""
    w = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if attn_bias is not None:
        w = w + attn_bias
    return w.softmax(-1) @ v


def _deterministic_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Key ``i`` of the sorted state dict gets ``std * randn(shape)`` from ``manual_seed(i)``, ``std`` =
    ``1 / sqrt(fan_in)`` for matrices and kernels (so activations stay O(1) through the 1280-wide
    regressors), 0.2 for vectors. recon3d's test repeats this rule (:func:`_upstream.seeded_weights`)."""
    return _upstream.seeded_weights(model.state_dict())


def _forward_inputs(cfg: dict) -> dict[str, torch.Tensor]:
    """The CFG batch of one object: ``4 * V`` rows = [uncond normals, normals, uncond colours, colours]."""
    g = torch.Generator().manual_seed(1234)
    n, s = 4 * cfg["num_views"], cfg["sample_size"]
    return {
        "sample": torch.randn(n, cfg["in_channels"], s, s, generator=g),
        "timestep": torch.tensor(501),
        "encoder_hidden_states": torch.randn(n, 7, cfg["cross_attention_dim"], generator=g),
        "class_labels": torch.randn(n, cfg["projection_class_embeddings_input_dim"], generator=g),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("upstream", type=Path, help="Era3D checkout (work tree) or bare git dir")
    ap.add_argument("--rev", default="HEAD", help="revision when `upstream` is a git dir")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = ap.parse_args()

    import diffusers
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        src, commit = _checkout(args.upstream.expanduser().resolve(), args.rev, Path(tmp))
        _upstream.on_path(src)
        from mvdiffusion.models import transformer_mv2d_self_rowwise as upstream_tf
        from mvdiffusion.models.unet_mv2d_condition import UNetMV2DConditionModel

        configs: dict[str, dict] = {}
        for name, cfg in CONFIGS.items():
            if name.startswith("paper"):
                with torch.device("meta"):
                    model = UNetMV2DConditionModel(**cfg)
            else:
                torch.manual_seed(0)
                model = UNetMV2DConditionModel(**cfg)
            state = model.state_dict()
            configs[name] = {
                "options": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                "num_parameters": int(sum(t.numel() for t in state.values())),
                "keys": _upstream.key_layout(model),
            }
            if name == "tiny":
                tiny = model

        # forward reference at tiny size, with upstream's inference (xFormers) attention processors
        upstream_tf.xformers = types.SimpleNamespace(ops=types.SimpleNamespace(memory_efficient_attention=_plain_attention))
        for module in tiny.modules():
            if isinstance(module, upstream_tf.CustomJointAttention):
                module.set_processor(upstream_tf.XFormersJointAttnProcessor())
            elif isinstance(module, upstream_tf.CustomAttention):
                module.set_processor(upstream_tf.XFormersMVAttnProcessor())
        tiny.load_state_dict(_deterministic_weights(tiny), strict=True)
        tiny.eval()
        inputs = _forward_inputs(CONFIGS["tiny"])
        with torch.no_grad():
            sample, pose_pred = tiny(**inputs, return_dict=False)

    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    ref = {f"input.{k}": v.contiguous() for k, v in inputs.items()}
    ref.update({"output.sample": sample.contiguous(), "output.pose_pred": pose_pred.contiguous()})
    save_file(ref, str(args.out / "tiny_forward.safetensors"))
    manifest = {
        "source": {
            "repo": "pengHTYX/Era3D", "commit": commit, "class": "mvdiffusion.models.unet_mv2d_condition.UNetMV2DConditionModel",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "generated_by": "scripts/make_era3d_manifest.py",
            "paper_config_note": "SD-2.1-unCLIP unet/config.json values (not read on this machine) + Era3D test config options",
        },
        "forward_reference": {
            "file": "tiny_forward.safetensors", "weights": "key i of the sorted state dict: std * randn(shape, manual_seed(i)); std 1/sqrt(fan_in) (ndim >= 2) else 0.2",
            "attention": "upstream XFormersMVAttnProcessor / XFormersJointAttnProcessor with a plain softmax attention stand-in",
            "sample_abs_mean": float(sample.abs().mean()), "pose_pred": pose_pred.tolist(),
        },
        "configs": configs,
    }
    _upstream.write_manifest(args.out / "official_manifest.json", manifest)
    counts = ", ".join(f"{n}: {len(c['keys'])} keys" for n, c in configs.items())
    print(f"wrote {args.out}/official_manifest.json ({counts})")


if __name__ == "__main__":
    main()
