"""Write the official LGM weight-layout manifest from the upstream class definitions.

The manifest (``tests/fixtures/lgm/official_manifest.json``) lists every state-dict key of the
official ``LGM`` model (``core/models.py``: ``unet.*`` from ``core/unet.py``'s ``UNet`` and the
extra 1x1 ``conv.*``; the LPIPS loss is built with ``lambda_lpips=0``, as the released file has no
``lpips_loss.*`` keys), with shape and dtype, for upstream's ``big`` and ``small`` options and for
recon3d's ``tiny`` sizes. recon3d's tests compare :class:`recon3d.models.lgm.LGMNetwork` and the
official-weight loader against it, so the layout is checked against upstream's own code rather
than against a saver written together with the loader.

Usage::

    python scripts/make_lgm_manifest.py /path/to/LGM            # a checkout (work tree)
    python scripts/make_lgm_manifest.py /path/to/LGM.git --rev fe8d12c   # or a bare git dir

Upstream's modules import packages recon3d does not need (``tyro``, ``kiui``, ``roma``, the CUDA
rasteriser); this script puts minimal stand-ins for them in ``sys.modules`` **before** importing
``core.*``, here and never in the package: ``tyro`` (only the module-level
``subcommand_type_from_defaults`` call), ``kiui``/``kiui.lpips`` (never called: lambda_lpips=0),
``kiui.op.safe_normalize`` (unit-normalisation, used by ``get_rays``), ``roma`` (unused here),
and ``core.gs.GaussianRenderer`` (it allocates CUDA tensors; the manifest needs no renderer).
xFormers is disabled (``XFORMERS_DISABLED=1``) so upstream's attention takes its plain-matmul path.

Besides the key lists, the script checks recon3d against upstream numerically and records the
result in the manifest's ``checks``: (1) upstream's tiny ``LGM.forward_gaussians`` vs recon3d's
``LGMNetwork`` holding the same weights, on the same 9-channel input; (2) upstream's ``get_rays``
Plücker embedding vs :func:`recon3d.models.lgm.lgm_input_features` for a random OpenGL pose.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import types
from pathlib import Path

import _upstream
import torch

UPSTREAM_FILES = ("core/__init__.py", "core/unet.py", "core/attention.py", "core/models.py", "core/options.py", "core/utils.py")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "lgm" / "official_manifest.json"


def _checkout(src: Path, rev: str, tmp: Path) -> tuple[Path, str | None]:
    """The folder holding ``core/`` and the commit it is at (None when unknown)."""
    if _upstream.is_checkout(src, "core/unet.py"):
        return src, _upstream.head_commit(src)
    commit, _ = _upstream.resolve_revision(src, rev, "core/unet.py")
    _upstream.show_into(src, commit, UPSTREAM_FILES, tmp)
    return tmp, commit


def _install_stand_ins() -> None:
    _upstream.stand_in("tyro", extras=types.SimpleNamespace(subcommand_type_from_defaults=lambda *a, **k: None))

    class _NoLPIPS:  # models.py imports it; building it would need VGG weights (never built: lambda_lpips=0)
        def __init__(self, *a, **k):
            raise RuntimeError("LPIPS stand-in: build LGM with lambda_lpips=0")

    def safe_normalize(x, eps=1e-20):
        return x / torch.sqrt(torch.clamp(torch.sum(x * x, -1, keepdim=True), min=eps))

    kiui = _upstream.stand_in("kiui")
    kiui.lpips = _upstream.stand_in("kiui.lpips", LPIPS=_NoLPIPS)
    kiui.op = _upstream.stand_in("kiui.op", safe_normalize=safe_normalize)
    _upstream.stand_in("roma")

    class _NoRenderer:
        def __init__(self, opt):
            self.opt = opt

    _upstream.stand_in("core.gs", GaussianRenderer=_NoRenderer)


def _options_dict(opt) -> dict:
    keys = ("input_size", "down_channels", "down_attention", "mid_attention", "up_channels", "up_attention", "splat_size")
    return {k: (list(getattr(opt, k)) if isinstance(getattr(opt, k), tuple) else getattr(opt, k)) for k in keys}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("upstream", type=Path, help="3DTopia/LGM checkout, or its git dir")
    ap.add_argument("--rev", default="HEAD", help="revision when `upstream` is a git dir")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    os.environ["XFORMERS_DISABLED"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        root, commit = _checkout(args.upstream.resolve(), args.rev, Path(tmp))
        _upstream.on_path(root)
        import core  # noqa: F401  (the package must exist before the core.gs stand-in is attached)

        _install_stand_ins()
        from core.models import LGM
        from core.options import Options, config_defaults
        from core.utils import get_rays

        from recon3d.data.cameras import Cameras, intrinsics_from_fov
        from recon3d.models.lgm import LGM_PRESETS, LGMNetwork, activate_gaussians, lgm_input_features

        tiny = LGM_PRESETS["tiny"]
        opts = {
            "big": dataclasses.replace(config_defaults["big"], lambda_lpips=0.0),
            "small": dataclasses.replace(config_defaults["small"], lambda_lpips=0.0),
            "tiny": Options(
                input_size=tiny["input_size"], down_channels=tuple(tiny["down_channels"]), down_attention=tuple(tiny["down_attention"]),
                mid_attention=tiny["mid_attention"], up_channels=tuple(tiny["up_channels"]), up_attention=tuple(tiny["up_attention"]),
                splat_size=tiny["input_size"] // 2, lambda_lpips=0.0,
            ),
        }
        configs = {}
        for name, opt in opts.items():
            if name == "tiny":
                model = LGM(opt)
            else:
                with torch.device("meta"):  # shapes only: the big model has 415M parameters
                    model = LGM(opt)
            configs[name] = {"options": _options_dict(opt), "keys": _upstream.key_layout(model)}

        # (1) forward parity at tiny size: upstream weights in recon3d's network, same input.
        torch.manual_seed(0)
        up = LGM(opts["tiny"]).eval()
        ours = LGMNetwork("tiny").eval()
        ours.load_state_dict(up.state_dict(), strict=True)
        x = torch.randn(2, 4, 9, tiny["input_size"], tiny["input_size"])
        with torch.no_grad():
            ref = up.forward_gaussians(x)
            g = activate_gaussians(ours.raw_from_features(x))
            mine = torch.cat([g.means, g.opacities[..., None], g.scales, g.quats, g.colors], -1)
        forward_err = float((ref - mine).abs().max())

        # (2) rays: upstream get_rays on a random OpenGL pose vs recon3d's input features.
        q, _ = torch.linalg.qr(torch.randn(3, 3))
        q = q * torch.sign(torch.linalg.det(q))
        pose = torch.eye(4)
        pose[:3, :3], pose[:3, 3] = q, torch.randn(3)
        S = tiny["input_size"]
        ro, rd = get_rays(pose, S, S, opts["tiny"].fovy)
        up_rays = torch.cat([torch.cross(ro, rd, dim=-1), rd], -1).permute(2, 0, 1)
        cams = Cameras.from_opengl(pose[None, None], intrinsics_from_fov(opts["tiny"].fovy, S, S)[None, None], S, S)
        our_rays = lgm_input_features(torch.rand(1, 1, 3, S, S), cams)[0, 0, 3:]
        rays_err = float((up_rays - our_rays).abs().max())

    manifest = {
        "source": {"repo": "3DTopia/LGM", "commit": commit, "files": ["core/unet.py", "core/models.py", "core/options.py"],
                   "model": "core.models.LGM(opt) with lambda_lpips=0 (no lpips_loss keys, as in the released file)",
                   "note": "dtypes are the modules' (float32); the released model_fp16_fixrot.safetensors holds the same keys in float16"},
        "checks": {"tiny_forward_gaussians_max_abs_diff": forward_err, "rays_plucker_max_abs_diff": rays_err},
        "configs": configs,
    }
    _upstream.write_manifest(args.out, manifest)
    n = {k: len(v["keys"]) for k, v in configs.items()}
    print(f"wrote {args.out}: keys {n}; tiny forward max |diff| {forward_err:.3g}, rays max |diff| {rays_err:.3g}")
    if forward_err > 1e-4 or rays_err > 1e-5:
        print("recon3d differs from upstream beyond tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
