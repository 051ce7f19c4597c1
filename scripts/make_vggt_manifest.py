"""Write the official VGGT weight-layout manifest and a tiny forward reference from upstream's classes.

Upstream: facebookresearch/vggt as vendored by GAP-LAB-CUHK-SZ/ReconViaGen under ``wheels/vggt``
(the released VGGT code). This script is never imported by recon3d; it imports upstream's own
files from a checkout or git dir::

    python scripts/make_vggt_manifest.py /path/to/ReconViaGen            # work tree (wheels/vggt/vggt/...)
    python scripts/make_vggt_manifest.py /path/to/ReconViaGen.git --rev f672092
    python scripts/make_vggt_manifest.py /path/to/vggt --subdir .        # facebookresearch/vggt itself

Outputs (``tests/fixtures/vggt/``):

- ``official_manifest.json``: every state-dict key with shape and dtype of upstream's
  ``VGGT()`` (paper size, built on the ``meta`` device), and of the same classes at recon3d's
  ``tiny`` size (:data:`recon3d.models.vggt.VGGT_PRESETS`). ``VGGT.__init__`` fixes every size
  but img/patch/width, so the tiny model is assembled from upstream's own ``Aggregator``,
  ``CameraHead``, ``DPTHead`` and ``TrackHead`` with the tiny arguments, and the one size that
  ``Aggregator`` hard-wires — the DINOv2 ViT-L it builds through the module-level name
  ``vit_large`` — is redirected (in this process only) to upstream's own
  ``DinoVisionTransformer`` at the tiny width/depth/heads.
- ``tiny_forward.safetensors``: deterministic weights (key ``i`` of the sorted state dict gets
  ``std * randn`` from ``torch.Generator().manual_seed(i)``, ``std = 1/sqrt(fan_in)`` for
  matrices and kernels, 0.2 for vectors; camera tokens as vectors), a fixed non-square input
  ``[1, 3, 3, 28, 42]`` and upstream's ``VGGT.forward`` outputs (pose_enc, depth, depth_conf,
  world_points, world_points_conf) plus the four aggregator outputs. recon3d's test repeats the
  weight rule, loads them through its official importer and compares.

Nothing needs stubbing at import time: upstream's ``layers`` fall back to plain PyTorch attention
(``XFORMERS_AVAILABLE = False``) and its imports (huggingface_hub, einops) are recon3d dependencies.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

import _upstream
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "vggt"
SUBDIR = "wheels/vggt"
TINY_INPUT = (1, 3, 3, 28, 42)


def _checkout(src: Path, rev: str, subdir: str, tmp: Path) -> tuple[Path, str | None]:
    """The folder that holds the ``vggt`` package, and the commit (None when unknown)."""
    if _upstream.is_checkout(src / subdir, "vggt/models/vggt.py"):
        return src / subdir, _upstream.head_commit(src)
    prefix = "" if subdir in ("", ".") else subdir.rstrip("/") + "/"
    commit, names = _upstream.resolve_revision(src, rev, f"{prefix}vggt/", tree=f"{prefix}vggt", recursive=True)
    _upstream.show_into(src, commit, [n for n in names if n.endswith(".py")], tmp, strip=prefix)
    return tmp, commit


#: Token and embedding tensors get the vectors' std 0.2 (not 1 / sqrt(fan_in)).
TOKEN_KEYS = ("camera_token", "register_token", "register_tokens", "cls_token", "pos_embed", "empty_pose_tokens", "mask_token")


def deterministic_weights(state: dict) -> dict[str, torch.Tensor]:
    """The rule recon3d's test repeats (module docstring): :func:`_upstream.seeded_weights` with the token keys as vectors."""
    return _upstream.seeded_weights(state, TOKEN_KEYS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("upstream", type=Path, help="ReconViaGen (or facebookresearch/vggt) checkout, or its git dir")
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--subdir", default=SUBDIR, help="folder holding the vggt package (wheels/vggt in ReconViaGen; . in vggt)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root, commit = _checkout(args.upstream.resolve(), args.rev, args.subdir, Path(tmp))
        _upstream.on_path(root)
        import vggt.models.aggregator as up_agg
        from vggt.heads.camera_head import CameraHead
        from vggt.heads.dpt_head import DPTHead
        from vggt.heads.track_head import TrackHead
        from vggt.layers import MemEffAttention, NestedTensorBlock
        from vggt.layers.vision_transformer import DinoVisionTransformer
        from vggt.models.vggt import VGGT

        from recon3d.models.vggt import VGGT_PRESETS, VGGTNetwork
        from recon3d.models.vggt.pretrained import convert_official_state_dict

        # Shapes only (1.2e9 parameters). DINOv2's drop-path schedule calls .item() on a linspace,
        # which meta tensors refuse: that one small tensor is made on the CPU.
        linspace = torch.linspace
        torch.linspace = functools.partial(linspace, device="cpu")
        try:
            with torch.device("meta"):
                paper = VGGT()
        finally:
            torch.linspace = linspace
        t = VGGT_PRESETS["tiny"]

        def tiny_vit(patch_size=14, num_register_tokens=0, **kw):
            return DinoVisionTransformer(patch_size=patch_size, embed_dim=t.embed_dim, depth=t.dino_depth, num_heads=t.dino_heads,
                                         mlp_ratio=4, block_fn=functools.partial(NestedTensorBlock, attn_class=MemEffAttention),
                                         num_register_tokens=num_register_tokens, **kw)

        up_agg.vit_large = tiny_vit  # the only size Aggregator hard-wires
        torch.manual_seed(0)
        tiny = VGGT.__new__(VGGT)
        torch.nn.Module.__init__(tiny)
        d = 2 * t.embed_dim
        tiny.aggregator = up_agg.Aggregator(img_size=t.img_size, patch_size=t.patch_size, embed_dim=t.embed_dim, depth=t.depth,
                                            num_heads=t.num_heads)
        tiny.camera_head = CameraHead(dim_in=d, trunk_depth=t.camera_trunk_depth, num_heads=t.camera_heads)
        dpt = dict(patch_size=t.patch_size, features=t.dpt_features, out_channels=list(t.dpt_out_channels),
                   intermediate_layer_idx=list(t.dpt_layers))
        tiny.point_head = DPTHead(dim_in=d, output_dim=4, activation="inv_log", conf_activation="expp1", **dpt)
        tiny.depth_head = DPTHead(dim_in=d, output_dim=2, activation="exp", conf_activation="expp1", **dpt)
        tiny.track_head = TrackHead(dim_in=d, patch_size=t.patch_size)  # keys only: never run (no query points)
        tiny.eval()

        configs = {
            "paper": {"args": {"img_size": 518, "patch_size": 14, "embed_dim": 1024}, "keys": _upstream.key_layout(paper)},
            "tiny": {"args": {k: getattr(t, k) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "dino_depth",
                                                           "dino_heads", "camera_trunk_depth", "camera_heads", "dpt_features")}
                     | {"dpt_out_channels": list(t.dpt_out_channels), "dpt_layers": list(t.dpt_layers)},
                     "keys": _upstream.key_layout(tiny)},
        }

        weights = deterministic_weights(tiny.state_dict())
        tiny.load_state_dict(weights, strict=True)
        g = torch.Generator().manual_seed(1234)
        images = torch.rand(TINY_INPUT, generator=g)
        with torch.no_grad():
            ref = tiny(images)
            tokens, _ = tiny.aggregator(images)
        fixture = {"images": images, **{k: ref[k].contiguous() for k in ("pose_enc", "depth", "depth_conf", "world_points",
                                                                            "world_points_conf")}}
        fixture.update({f"tokens.{i}": x.contiguous() for i, x in enumerate(tokens)})

        ours = VGGTNetwork("tiny").eval()
        ours.load_state_dict(convert_official_state_dict(weights, ours), strict=True)
        with torch.no_grad():
            mine = ours(images)
        errs = {k: float((mine[k] - ref[k]).abs().max()) for k in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")}
        errs["tokens"] = max(float((a - b).abs().max()) for a, b in zip(mine["tokens"], tokens))

    from safetensors.torch import save_file

    manifest = {
        "source": {"repo": "GAP-LAB-CUHK-SZ/ReconViaGen" if args.subdir == SUBDIR else "facebookresearch/vggt", "commit": commit,
                   "subdir": args.subdir, "files": ["vggt/models/vggt.py", "vggt/models/aggregator.py", "vggt/heads/*.py", "vggt/layers/*.py"],
                   "note": "paper = upstream VGGT() on the meta device; tiny = upstream classes at recon3d's tiny sizes "
                           "(vit_large redirected to DinoVisionTransformer at the tiny size)"},
        "checks": {"tiny_forward_max_abs_diff": errs},
        "configs": configs,
    }
    _upstream.write_manifest(args.out / "official_manifest.json", manifest)
    save_file(fixture, str(args.out / "tiny_forward.safetensors"))
    print(f"wrote {args.out}: keys {({k: len(v['keys']) for k, v in configs.items()})}; recon3d vs upstream max |diff| {errs}")
    if max(errs.values()) > 1e-4:
        print("recon3d differs from upstream beyond tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
