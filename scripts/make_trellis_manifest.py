"""Write the official TRELLIS weight-layout manifest (dense models) from upstream's own classes.

Outputs, under ``tests/fixtures/trellis/``:

* ``official_manifest.json``: every state-dict key of upstream's ``SparseStructureEncoder``,
  ``SparseStructureDecoder`` and ``SparseStructureFlowModel`` with shape and dtype, for the
  released TRELLIS-image-large args (built on the meta device with the json's ``use_fp16: true``,
  so the dtypes are the ones upstream holds in memory) and for recon3d's tiny presets; plus the
  numeric checks below.
* ``tiny_parity.safetensors``: for each tiny preset, upstream's (randomised) weights, an input and
  upstream's output, so recon3d's tests re-run the forward against upstream's numbers.

Checks recorded in the manifest (recon3d vs upstream): the tiny forwards (encoder mean/logvar,
decoder logits, flow velocity) with upstream's weights loaded into recon3d's class; recon3d's
own ``pos_emb`` (computed, not loaded) vs upstream's, at tiny and paper size; the 3-D pixel shuffle.

Usage::

    python scripts/make_trellis_manifest.py /path/to/TRELLIS            # a checkout
    python scripts/make_trellis_manifest.py /path/to/TRELLIS.git --rev 6b0d647   # or a git dir

Only ``trellis/models`` and ``trellis/modules`` are extracted. The ``trellis`` package itself is
replaced by an empty stand-in in ``sys.modules`` (its ``__init__`` imports the pipelines and
renderers, which need CUDA extensions); ``xformers``/``flash_attn`` (absent here) and ``spconv``
(when absent) get empty stand-ins — the dense models never call them (``ATTN_BACKEND=sdpa``;
spconv is imported only inside a sparse conv's constructor). All of this happens in this script,
never in the package.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "tests" / "fixtures" / "trellis"
PRESETS_TINY = ("ss_enc_tiny", "ss_dec_tiny", "ss_flow_tiny", "ss_flow_tiny_shared_p2")
PRESETS_PAPER = ("ss_enc_conv3d_16l8_fp16", "ss_dec_conv3d_16l8_fp16", "ss_flow_img_dit_L_16l8_fp16")


def _extract(src: Path, rev: str, tmp: Path) -> tuple[Path, str | None]:
    """The folder holding ``trellis/`` and the commit (None when unknown)."""
    if (src / "trellis" / "models" / "sparse_structure_vae.py").is_file():
        try:
            commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            commit = None
        return src, commit
    git = ["git", f"--git-dir={src}"]
    try:
        commit = subprocess.run(git + ["rev-parse", rev], capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        raise SystemExit(f"{src}: neither a checkout with trellis/ nor a git dir with revision {rev!r} ({e})") from None
    tar = subprocess.run(git + ["archive", commit, "trellis/models", "trellis/modules"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(tmp)
    return tmp, commit


def _stand_ins(root: Path) -> None:
    pkg = types.ModuleType("trellis")
    pkg.__path__ = [str(root / "trellis")]
    sys.modules["trellis"] = pkg
    for name in ("xformers", "xformers.ops", "flash_attn") + (() if importlib.util.find_spec("spconv") else ("spconv", "spconv.pytorch")):
        sys.modules.setdefault(name, types.ModuleType(name))


def _keys(model: torch.nn.Module) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in model.state_dict().items()}


def _randomise(model: torch.nn.Module, g: torch.Generator) -> None:
    # Fresh models have zero convs/adaLN/out layers: random weights make every branch count.
    with torch.no_grad():
        for name, p in model.named_parameters():
            # norm scales and RMS gammas around 1, everything else around 0
            centre = 1.0 if name.endswith("gamma") or ("norm" in name and name.endswith("weight")) else 0.0
            # rounded to float16 values so the fixture can store them as float16 without loss
            p.copy_((torch.randn(p.shape, generator=g) * 0.2 + centre).half().float())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("upstream", type=Path, help="microsoft/TRELLIS checkout, or its git dir")
    ap.add_argument("--rev", default="HEAD", help="revision when `upstream` is a git dir")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)

    os.environ["ATTN_BACKEND"] = "sdpa"
    os.environ["SPARSE_ATTN_BACKEND"] = "xformers"
    with tempfile.TemporaryDirectory() as tmp:
        root, commit = _extract(args.upstream.resolve(), args.rev, Path(tmp))
        sys.path.insert(0, str(root))
        _stand_ins(root)
        from trellis.models.sparse_structure_flow import SparseStructureFlowModel as UpFlow
        from trellis.models.sparse_structure_vae import SparseStructureDecoder as UpDec
        from trellis.models.sparse_structure_vae import SparseStructureEncoder as UpEnc
        from trellis.modules.spatial import pixel_shuffle_3d as up_shuffle
        from trellis.modules.transformer import AbsolutePositionEmbedder

        from recon3d.models.trellis import TRELLIS_PRESETS, build_trellis_model, pixel_shuffle_3d
        from recon3d.models.trellis.modules import absolute_position_embedding, grid_coordinates

        upstream = {"SparseStructureEncoder": UpEnc, "SparseStructureDecoder": UpDec, "SparseStructureFlowModel": UpFlow}
        configs, checks, tensors = {}, {}, {}
        for name in PRESETS_PAPER:
            p = TRELLIS_PRESETS[name]
            with torch.device("meta"):  # shapes and dtypes only (the flow has 555M parameters)
                m = upstream[p["name"]](**p["args"])
            configs[name] = {"name": p["name"], "args": p["args"], "keys": _keys(m)}

        g = torch.Generator().manual_seed(0)
        for name in PRESETS_TINY:
            p = TRELLIS_PRESETS[name]
            torch.manual_seed(0)
            up = upstream[p["name"]](**p["args"]).eval()
            ours = build_trellis_model(p["name"], p["args"], use_fp16=None).eval()
            configs[name] = {"name": p["name"], "args": p["args"], "keys": _keys(up)}
            if "pos_emb" in up.state_dict():
                checks[f"{name}_pos_emb_max_abs_diff"] = float((up.pos_emb - ours.pos_emb).abs().max())
            _randomise(up, g)
            ours.load_state_dict(up.state_dict(), strict=True)
            a = p["args"]
            with torch.no_grad():
                if p["name"] == "SparseStructureEncoder":
                    inputs = {"x": (torch.rand(2, a["in_channels"], 16, 16, 16, generator=g) > 0.6).float()}
                    _, mean, logvar = up(inputs["x"], return_raw=True)
                    ref = torch.cat([mean, logvar], 1)
                    _, m2, l2 = ours(inputs["x"], return_raw=True)
                    mine = torch.cat([m2, l2], 1)
                elif p["name"] == "SparseStructureDecoder":
                    inputs = {"z": torch.randn(2, a["latent_channels"], 4, 4, 4, generator=g)}
                    ref, mine = up(inputs["z"]), ours(inputs["z"])
                else:
                    R = a["resolution"]
                    inputs = {"x": torch.randn(2, a["in_channels"], R, R, R, generator=g), "t": torch.rand(2, generator=g) * 1000,
                              "cond": torch.randn(2, 5, a["cond_channels"], generator=g)}
                    ref, mine = up(**inputs), ours(**inputs)
            checks[f"{name}_forward_max_abs_diff"] = float((ref - mine).abs().max())
            checks[f"{name}_output_abs_max"] = float(ref.abs().max())
            tensors.update({f"{name}/weights/{k}": (v.half() if k != "pos_emb" else v).contiguous() for k, v in up.state_dict().items()})
            tensors.update({f"{name}/input/{k}": v.contiguous() for k, v in inputs.items()})
            tensors[f"{name}/output"] = ref.contiguous()

        # Paper-size position embedding (4096 tokens x 1024) and the pixel shuffle, directly.
        coords = grid_coordinates(16)
        checks["paper_pos_emb_max_abs_diff"] = float((AbsolutePositionEmbedder(1024, 3)(coords) -
                                                      absolute_position_embedding(coords, 1024)).abs().max())
        x = torch.randn(2, 3 * 8, 3, 4, 5, generator=g)
        checks["pixel_shuffle_3d_max_abs_diff"] = float((up_shuffle(x, 2) - pixel_shuffle_3d(x, 2)).abs().max())

    from safetensors.torch import save_file

    manifest = {
        "source": {"repo": "microsoft/TRELLIS", "commit": commit,
                   "files": ["trellis/models/sparse_structure_vae.py", "trellis/models/sparse_structure_flow.py",
                             "trellis/modules/transformer/modulated.py", "trellis/modules/attention/modules.py"],
                   "note": "paper configs built on meta with use_fp16=true (dtypes as upstream holds them in memory); "
                           "tiny configs with use_fp16=false; tiny_parity.safetensors holds upstream weights (float16-exact values, stored float16; pos_emb float32), inputs and outputs"},
        "checks": checks,
        "configs": configs,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "official_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    save_file(tensors, str(args.out_dir / "tiny_parity.safetensors"), metadata={"commit": str(commit)})
    print(f"wrote {args.out_dir}: keys { {k: len(v['keys']) for k, v in configs.items()} }")
    print(json.dumps(checks, indent=1))
    bad = {k: v for k, v in checks.items() if k.endswith("diff") and v > 1e-4}
    if bad:
        print(f"recon3d differs from upstream beyond 1e-4: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
