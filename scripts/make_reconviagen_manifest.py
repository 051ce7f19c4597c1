"""Write the official ReconViaGen condition-net weight-layout manifest from upstream's own classes.

Upstream: GAP-LAB-CUHK-SZ/ReconViaGen (main), ``ModulatedMultiViewCond`` (GGC) in
``trellis/models/sparse_structure_flow.py`` and ``ModulatedSLATMultiViewCond`` (official PVC) in
``trellis/models/structured_latent_flow.py``, with the arguments ``train_ss.py`` / ``train_slat.py``
build them with.

Outputs, under ``tests/fixtures/reconviagen/``:

* ``official_manifest.json``: every state-dict key with shape and dtype of both classes at the
  official size (built on the meta device) and of the GGC at a tiny size (8 channels, 2 heads,
  4 tokens; the context stays 3072 wide because upstream's forward hard-codes
  ``reshape(b, -1, 2048)`` / ``reshape(b, -1, 1024)``), plus ``checks``: recon3d's forward vs
  upstream's with upstream's weights loaded strictly (tiny GGC; official-size PVC on tiny inputs).
* ``tiny_ggc_parity.safetensors``: the tiny GGC's randomised upstream weights, its inputs (the 4
  read VGGT layers, DINO tokens) and upstream's output, so the tests re-run recon3d against them.

Usage::

    python scripts/make_reconviagen_manifest.py /path/to/ReconViaGen            # a checkout
    python scripts/make_reconviagen_manifest.py /path/to/ReconViaGen.git --rev main   # or a git dir

Only ``trellis/models`` and ``trellis/modules`` are extracted into a temporary folder; the
``trellis`` package is an empty stand-in in ``sys.modules`` (its ``__init__`` imports the pipelines,
which need CUDA extensions), and ``xformers``/``flash_attn``/``spconv`` get empty stand-ins when
absent (the condition nets are dense and use ``ATTN_BACKEND=sdpa``). All of this happens in this
script only, never in the package.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import _upstream
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "tests" / "fixtures" / "reconviagen"
# train_ss.py's arguments (the rest are the class defaults)
GGC_OFFICIAL = {"channels": 1024, "ctx_channels": 3072, "num_heads": 16, "mlp_ratio": 4.0, "qk_rms_norm": True,
                "qk_rms_norm_cross": False}
GGC_TINY = {"channels": 8, "ctx_channels": 3072, "num_heads": 2, "mlp_ratio": 4.0, "qk_rms_norm": True,
            "qk_rms_norm_cross": False, "num_init_tokens": 4}
PVC_OFFICIAL = {"channels": 1024, "ctx_channels": 3072}  # train_slat.py
LAYERS = (4, 11, 17, 23)


def _extract(src: Path, rev: str, tmp: Path) -> tuple[Path, str | None]:
    """The folder holding ``trellis/`` and the commit (None when unknown)."""
    if _upstream.is_checkout(src, "trellis/models/sparse_structure_flow.py"):
        return src, _upstream.head_commit(src)
    commit, _ = _upstream.resolve_revision(src, rev, "trellis/")
    _upstream.archive_into(src, commit, ("trellis/models", "trellis/modules"), tmp)
    return tmp, commit


def _stand_ins(root: Path) -> None:
    _upstream.stand_in("trellis", root / "trellis")
    _upstream.empty_modules_if_absent({"xformers": ("xformers.ops",), "flash_attn": (), "spconv": ("spconv.pytorch",)})


def _randomise(model: torch.nn.Module, g: torch.Generator) -> None:
    # Fresh blocks are Xavier / N(0, 1e-6) tokens: random weights everywhere make every branch count;
    # matrices scaled by fan-in so 3072-wide projections stay O(1) (vectors N(0, 0.2)).
    _upstream.randomise_half_exact(model, g, std=lambda p: 0.2 if p.ndim < 2 else p.shape[-1] ** -0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("upstream", type=Path, help="GAP-LAB-CUHK-SZ/ReconViaGen checkout, or its git dir")
    ap.add_argument("--rev", default="HEAD", help="revision when `upstream` is a git dir")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)

    os.environ.update(_upstream.TRELLIS_CPU_ENV)
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        root, commit = _extract(args.upstream.resolve(), args.rev, Path(tmp))
        _upstream.on_path(root)
        _stand_ins(root)
        torch.set_num_threads(1)
        from trellis.models.sparse_structure_flow import ModulatedMultiViewCond as UpGGC
        from trellis.models.structured_latent_flow import ModulatedSLATMultiViewCond as UpPVC

        from recon3d.models.reconviagen.conditions import GlobalGeometryCondition, LinearPerViewCondition

        def ours_ggc(a: dict) -> GlobalGeometryCondition:
            return GlobalGeometryCondition(channels=a["channels"], vggt_channels=2048, dino_channels=a["ctx_channels"] - 2048,
                                           num_tokens=a.get("num_init_tokens", 4096), num_heads=a["num_heads"],
                                           mlp_ratio=a["mlp_ratio"], layers=LAYERS, qk_rms_norm=a["qk_rms_norm"],
                                           qk_rms_norm_cross=a["qk_rms_norm_cross"])

        configs, checks, tensors = {}, {}, {}
        with torch.device("meta"):
            configs["ggc_official"] = {"name": "ModulatedMultiViewCond", "args": GGC_OFFICIAL, "keys": _upstream.key_layout(UpGGC(**GGC_OFFICIAL))}
            configs["pvc_official"] = {"name": "ModulatedSLATMultiViewCond", "args": PVC_OFFICIAL, "keys": _upstream.key_layout(UpPVC(**PVC_OFFICIAL))}
        torch.manual_seed(0)
        up = UpGGC(**GGC_TINY).eval()
        configs["ggc_tiny"] = {"name": "ModulatedMultiViewCond", "args": GGC_TINY, "keys": _upstream.key_layout(up)}

        # tiny GGC forward: 1 object, 2 views, 2 patches per view (P = 5 + 2), upstream's weights loaded strictly
        g = torch.Generator().manual_seed(0)
        _randomise(up, g)
        ours = ours_ggc(GGC_TINY).eval()
        ours.load_state_dict(up.state_dict(), strict=True)
        B, S, Np = 1, 2, 2
        layers = {i: torch.randn(B, S, 5 + Np, 2048, generator=g).half().float() for i in LAYERS}
        agg = [layers.get(i, torch.zeros(B, S, 5 + Np, 2048)) for i in range(24)]
        dino = torch.randn(B, S, 5 + Np, 1024, generator=g).half().float()  # cls + 4 registers + patches
        with torch.no_grad():
            ref = up(agg, dino[:, :, 5:])
            mine = ours(agg, dino)
        checks["ggc_tiny_forward_max_abs_diff"] = float((ref - mine).abs().max())
        checks["ggc_tiny_output_abs_max"] = float(ref.abs().max())
        tensors.update({f"ggc_tiny/weights/{k}": v.half().contiguous() for k, v in up.state_dict().items()})
        tensors.update({f"ggc_tiny/input/vggt_{i}": v.half().contiguous() for i, v in layers.items()})
        tensors["ggc_tiny/input/dino"] = dino.half().contiguous()
        tensors["ggc_tiny/output"] = ref.contiguous()

        # official PVC at its hard-coded size, tiny inputs (1 object, 2 views, P = 7); numbers only
        torch.manual_seed(0)
        up_p = UpPVC(**PVC_OFFICIAL).eval()
        _randomise(up_p, g)
        ours_p = LinearPerViewCondition(channels=1024, vggt_channels=2048, layers=LAYERS).eval()
        ours_p.load_state_dict(up_p.state_dict(), strict=True)
        agg_p = [torch.randn(B, S, 7, 2048, generator=g) for _ in range(24)]
        dino_p = torch.randn(B, S, 7, 1024, generator=g)
        with torch.no_grad():
            ref_p = up_p(agg_p, dino_p).reshape(B, S, 7, 1024)
            mine_p = ours_p(agg_p, dino_p)
        checks["pvc_official_forward_max_abs_diff"] = float((ref_p - mine_p).abs().max())
        checks["pvc_official_output_abs_max"] = float(ref_p.abs().max())

    manifest = {"upstream": "GAP-LAB-CUHK-SZ/ReconViaGen", "commit": commit, "layers": list(LAYERS),
                "configs": configs, "checks": checks}
    _upstream.write_manifest(args.out_dir / "official_manifest.json", manifest, sort_keys=True)
    save_file(tensors, str(args.out_dir / "tiny_ggc_parity.safetensors"))
    print(json.dumps(checks, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
