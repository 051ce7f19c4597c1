"""``recon3d data pseudo-gt``: MVBoost's pseudo-ground-truth builder (§3.2, Algorithm 1).

For every image ``c`` of an image folder::

    C^π   = G.generate(c)                       # Algorithm 1 lines 1-2: V views from pure noise
    θ     = R(C^π[input_views])                 # line 3: the reconstruction model on the views it takes
    x^π   = g(θ, π)  at all V generator cameras # line 4
    C↑^π  = G.refine(x^π, c, s)                 # lines 5-7: SDEdit at strength s (eq. 4-5)

and the results are written as shards (:mod:`recon3d.data.pseudo_gt`: format, manifest,
atomicity) that :class:`~recon3d.data.pseudo_gt.PseudoGTDataset` reads as recon3d batches::

    recon3d data pseudo-gt --images photos/ --out data/pseudo_gt/s0.95 --strength 0.95 \\
        --generator configs/mv_diffusion_cpu.yaml --generator outputs/mv_diffusion_cpu/.../last.ckpt \\
        --reconstructor configs/lgm_cpu.yaml --reconstructor outputs/lgm_cpu/.../last.ckpt

``--generator`` / ``--reconstructor`` (repeatable): YAML configs composed in order (the model is
built as ``recon3d fit`` builds it; without a checkpoint its weights are the config's seeded
initialisation -- tests and dry runs), then optionally one ``.ckpt`` loaded strictly (a ``.ckpt``
alone reads its run folder's ``config.yaml``, ``<run>/checkpoints/x.ckpt`` → ``<run>/config.yaml``);
values starting with ``--`` are config overrides (``--reconstructor=--model.init_args.official_weights=w.safetensors``:
the released LGM through ``configs/mvboost.yaml``'s BoostModule, whose fresh adapters compute LGM exactly).
The generator is a :class:`~recon3d.models.multiview.generator.MultiViewGenerator`: recon3d's
``MultiViewDiffusionModule`` (its ``net``) or, given a **folder**, Era3D
(:meth:`~recon3d.models.era3d.pipeline.Era3DGenerator.from_pretrained`, a local copy of
``pengHTYX/MacLab-Era3D-512-6view``). The reconstructor is any recon3d reconstruction method
(LGM, a boosted LGM, GTR ...).

Which generator views feed the reconstructor (``--input-views``, default): all ``V`` when it takes
``V``; Era3D's front/right/back/left (views 0, 2, 3, 4) when it takes 4 of Era3D's 6; otherwise
one clear error asking for ``--input-views``. The views are resized to the reconstructor config's
``data.input_resolution`` (cameras rescaled with them); renders are made at the generator's
resolution.

Determinism and seeds: each object draws its noise (generation, then refinement) from one
``torch.Generator`` seeded with :func:`~recon3d.representations.reconstruction.object_seed`
``(id, --seed)``, so an object's result depends on its id and the seed only -- not on the shard,
the rank or the batch it is in (up to the float rounding of batched kernels: ``--batch-size``
changes results at that level; it is recorded in the manifest). Object ids are the images' paths
relative to ``--images`` without suffix. Randomly initialised models are built after
``torch.manual_seed(--seed)``.

Scale-out: images are listed (recursively, sorted) and cut into shards of ``--shard-size``
consecutive files; shard ``i`` belongs to rank ``i % world``. The rank and world come from
``--rank/--world-size``, else ``RANK``/``WORLD_SIZE`` (torchrun, Lightning's launchers), else
``SLURM_PROCID``/``SLURM_NTASKS``, else 0/1; ranks share nothing but the output folder, so
``srun``/``torchrun`` of this command on many nodes scales like training.

Resume: a shard whose completion record and file agree (size and SHA-256) is never redone; a
leftover temporary of one of this rank's shards is removed; a shard of another image list, or a
folder built with another strength / seed / generator / reconstructor, is refused with one line
(use another ``--out``). Failures per image (a file that is not an image, a truncated image, an
image the generator refuses) are counted, listed in the manifest with the reason, and never stop
the run. Progress: one line per shard (and a tqdm bar in a terminal) with images/min and ETA.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from recon3d.data.pseudo_gt import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    METADATA_KEY,
    file_sha256,
    record_name,
    shard_name,
    to_uint8,
)
from recon3d.errors import ConfigError, DataError, Recon3DError

__all__ = ["PseudoGTBuilder", "load_generator", "load_reconstructor", "list_images", "resolve_world", "default_input_views",
           "add_arguments", "run", "IMAGE_SUFFIXES"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ---------------------------------------------------------------------- models
def _split_spec(specs: Sequence[str], what: str) -> tuple[list[str], str | None, str | None, list[str]]:
    """``(configs, checkpoint, folder, overrides)`` of a ``--generator``/``--reconstructor`` list."""
    configs, ckpt, folder, overrides = [], None, None, []
    for s in specs:
        if s.startswith("--"):  # a config override, e.g. --reconstructor=--model.init_args.official_weights=w.safetensors
            overrides.append(s)
            continue
        p = Path(s).expanduser()
        if p.is_dir():
            if folder is not None or configs or ckpt:
                raise ConfigError(f"--{what} {s}: a model folder (Era3D) is given alone, not with configs or checkpoints")
            folder = str(p)
        elif p.suffix in (".yaml", ".yml"):
            if not p.is_file():
                raise ConfigError(f"--{what} {s}: config file not found")
            configs.append(str(p))
        elif p.suffix == ".ckpt":
            if not p.is_file():
                raise ConfigError(f"--{what} {s}: checkpoint not found")
            if ckpt is not None:
                raise ConfigError(f"--{what}: give one checkpoint, got {ckpt} and {s}")
            ckpt = str(p)
        else:
            raise ConfigError(f"--{what} {s}: expected YAML configs (.yaml), a checkpoint (.ckpt) or a model folder")
    if ckpt is not None and not configs:
        run_cfg = Path(ckpt).resolve().parent.parent / "config.yaml"
        if not run_cfg.is_file():
            raise ConfigError(f"--{what} {ckpt}: no config given and no {run_cfg} (the run folder's config.yaml); "
                              f"give the run's config(s) before the checkpoint: --{what} cfg.yaml --{what} {Path(ckpt).name}")
        configs = [str(run_cfg)]
    if folder is None and not configs:
        raise ConfigError(f"--{what}: give a config (.yaml), a checkpoint (.ckpt) or a model folder")
    if folder is not None and overrides:
        raise ConfigError(f"--{what} {overrides[0]}: overrides apply to configs, not to a model folder")
    return configs, ckpt, folder, overrides


def _build_module(configs: list[str], ckpt: str | None, seed: int, allow_pickle: bool = False, overrides: Sequence[str] = ()):
    """The model (and datamodule) of ``configs`` as ``recon3d fit`` builds them, then ``ckpt``'s
    weights loaded strictly."""
    from recon3d.cli import run_lightning_cli

    args: list[str] = []
    for c in configs:
        args += ["-c", c]
    args += ["--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
             "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1", "--trainer.strategy", "auto",
             "--trainer.precision", "32-true", *overrides]
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(sys.stderr):  # Lightning's seed line: keep stdout for the command's own lines
        cli = run_lightning_cli(args, run=False, hparams_from=ckpt, allow_pickle=allow_pickle)
    if ckpt is not None:
        from recon3d.utils.checkpoint import load_weights_into

        load_weights_into(cli.model, ckpt, strict=True, allow_pickle=allow_pickle, ignore=getattr(cli.model, "init_weights_ignore", None))
    return cli.model, cli.datamodule


def state_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes, bytes): the weights' identity."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        if not isinstance(v, torch.Tensor):
            continue
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_generator(specs: Sequence[str], seed: int = 0, device: str | torch.device = "cpu", allow_pickle: bool = False):
    """``(generator, identity)`` from ``--generator`` values (module docstring)."""
    from recon3d.models.multiview.generator import MultiViewGenerator

    configs, ckpt, folder, overrides = _split_spec(specs, "generator")
    if folder is not None:
        from recon3d.models.era3d.pipeline import Era3DGenerator

        gen = Era3DGenerator.from_pretrained(folder, device=device)
        kind = "Era3DGenerator"
    else:
        model, _ = _build_module(configs, ckpt, seed, allow_pickle, overrides)
        gen = model if isinstance(model, MultiViewGenerator) else getattr(model, "net", None)
        if not isinstance(gen, MultiViewGenerator):
            raise ConfigError(f"--generator: {type(model).__name__} is not a multi-view generator (expected recon3d's "
                              "MultiViewDiffusionModule config/checkpoint, or an Era3D model folder)")
        kind = type(gen).__name__
    gen = gen.to(device).eval()
    identity = {"class": kind, "configs": configs, "overrides": overrides, "checkpoint": ckpt, "folder": folder,
                "num_views": int(gen.num_views), "resolution": int(gen.resolution),
                "num_inference_steps": int(getattr(gen, "num_inference_steps", 0)) or None,
                "guidance_scale": getattr(gen, "guidance_scale", None), "fingerprint": state_fingerprint(gen)}
    return gen, identity


def load_reconstructor(specs: Sequence[str], seed: int = 0, device: str | torch.device = "cpu", allow_pickle: bool = False):
    """``(module, identity, num_input_views, input_resolution)`` from ``--reconstructor`` values."""
    from recon3d.methods.base import ReconModule

    configs, ckpt, folder, overrides = _split_spec(specs, "reconstructor")
    if folder is not None:
        raise ConfigError(f"--reconstructor {folder}: expected a recon3d method's config (.yaml) and/or checkpoint (.ckpt), got a folder")
    model, dm = _build_module(configs, ckpt, seed, allow_pickle, overrides)
    if not isinstance(model, ReconModule) or getattr(model, "RECONSTRUCTS_3D", True) is False:
        raise ConfigError(f"--reconstructor: {type(model).__name__} is not a 3D reconstruction method (expected e.g. LGMModule's config)")
    views = getattr(model, "num_views", None)
    if views is None and hasattr(model, "base"):
        views = getattr(model.base, "num_views", None)
    if views is None:
        views = getattr(dm, "num_input_views", None)
    res = getattr(dm, "input_resolution", None)
    model = model.to(device).eval()
    identity = {"class": type(model).__name__, "configs": configs, "overrides": overrides, "checkpoint": ckpt, "num_input_views": int(views),
                "input_resolution": res, "fingerprint": state_fingerprint(model)}
    return model, identity, int(views), res


def default_input_views(generator, num_input_views: int, given: Sequence[int] | None = None) -> list[int]:
    """The generator views fed to the reconstructor (module docstring); one ConfigError line when
    the counts do not fit."""
    V = int(generator.num_views)
    if given is not None:
        views = [int(v) for v in given]
        if len(views) != num_input_views or len(set(views)) != len(views) or any(not 0 <= v < V for v in views):
            raise ConfigError(f"--input-views {','.join(map(str, views))}: expected {num_input_views} distinct indices of the generator's "
                              f"{V} views (0..{V - 1}), as many as the reconstruction model takes")
        return views
    if num_input_views == V:
        return list(range(V))
    if type(generator).__name__ == "Era3DGenerator" and num_input_views == 4:
        from recon3d.models.era3d.pipeline import ERA3D_LGM_VIEWS

        return list(ERA3D_LGM_VIEWS)
    raise ConfigError(f"generator views: the generator makes {V} views per image, the reconstruction model takes {num_input_views}; "
                      f"give --input-views with {num_input_views} of the generator's view indices (0..{V - 1}), or a model "
                      f"that takes {V} views")


# ---------------------------------------------------------------------- images
def list_images(root: str | Path) -> tuple[list[tuple[str, Path]], list[dict]]:
    """``([(id, path)], failures)`` of a folder, recursively, sorted by relative path. Files
    without an image suffix are failures (listed, not fatal); so is a second file of one id."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "image folder not found (--images)")
    items, failures, seen = [], [], {}
    for p in sorted(q for q in root.rglob("*") if q.is_file() and not any(part.startswith(".") for part in q.relative_to(root).parts)):
        rel = p.relative_to(root)
        oid = rel.with_suffix("").as_posix()
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            failures.append({"id": oid, "file": rel.as_posix(), "reason": f"not an image file (suffix {p.suffix or 'none'!r}; "
                             f"expected {', '.join(IMAGE_SUFFIXES)})"})
            continue
        if oid in seen:
            failures.append({"id": oid, "file": rel.as_posix(), "reason": f"the id {oid!r} is also {seen[oid]}; one image per name"})
            continue
        seen[oid] = rel.as_posix()
        items.append((oid, p))
    return items, failures


def condition_image(path: Path, generator) -> torch.Tensor:
    """The input view ``c`` as the generator takes it: ``(3, R, R)`` in ``[0, 1]`` on white.

    Era3D with an alpha channel: its own framing (alpha crop, 420 in 512,
    :func:`~recon3d.models.era3d.pipeline.prepare_era3d_input`). Otherwise: composited on white
    (where there is alpha), padded to a square with white, resized to the generator's resolution.
    """
    from recon3d.data.base import load_image

    rgb, alpha = load_image(path)  # DataError (one line naming the file) for non-images and truncated files
    R = int(generator.resolution)
    if alpha is not None and type(generator).__name__ == "Era3DGenerator":
        from recon3d.models.era3d.pipeline import prepare_era3d_input

        x = prepare_era3d_input(torch.cat([rgb, alpha])[None], size=R if R >= 420 else 512)[0]
    else:
        x = rgb if alpha is None else rgb * alpha + (1 - alpha)
        H, W = x.shape[-2:]
        if H != W:
            side = max(H, W)
            canvas = torch.ones(3, side, side)
            top, left = (side - H) // 2, (side - W) // 2
            canvas[:, top:top + H, left:left + W] = x
            x = canvas
    if x.shape[-1] != R:
        x = F.interpolate(x[None], size=(R, R), mode="bilinear", align_corners=False, antialias=True)[0]
    return x.clamp(0, 1)


def resolve_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world)``: the arguments, else ``RANK``/``WORLD_SIZE``, else ``SLURM_PROCID``/``SLURM_NTASKS``, else 0/1."""
    env = os.environ
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or 1)
    if rank is None:
        rank = int(env.get("RANK") or env.get("SLURM_PROCID") or 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank/world size: expected 0 <= rank < world size, got rank {rank} of {world_size}")
    return int(rank), int(world_size)


# ---------------------------------------------------------------------- progress
class _Progress:
    """One line per shard (images/min, ETA) on stderr; a tqdm bar too when stderr is a terminal."""

    def __init__(self, total: int, rank: int, world: int, enabled: bool = True):
        from recon3d.utils.progress import format_duration

        self.fmt = format_duration
        self.total, self.rank, self.world, self.enabled = total, rank, world, enabled
        self.done, self.t0 = 0, time.perf_counter()
        self.bar = None
        if enabled and total and getattr(sys.stderr, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"pseudo-gt rank {rank}/{world}", unit="img", leave=False)

    def update(self, n: int, shard: int, skipped: bool = False) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if not self.enabled:
            return
        el = time.perf_counter() - self.t0
        rate = self.done / el if el > 0 else float("nan")
        eta = self.fmt((self.total - self.done) / rate) if self.done and rate > 0 else "?"
        what = "already complete" if skipped else "written"
        print(f"recon3d data pseudo-gt: rank {self.rank}/{self.world}: shard {shard} {what}; {self.done}/{self.total} images "
              f"({100 * self.done / max(1, self.total):.0f}%)  {60 * rate:.1f} images/min  elapsed {self.fmt(el)}  ETA {eta}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------- builder
@dataclass
class BuildSummary:
    """What one :meth:`PseudoGTBuilder.build` call did on this rank."""

    shards_written: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    objects: int = 0
    failures: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)


class PseudoGTBuilder:
    """Algorithm 1 over an image list, written as resumable shards (module docstring).

    Args:
        generator: a :class:`~recon3d.models.multiview.generator.MultiViewGenerator`.
        reconstructor: a recon3d reconstruction method (``reconstruct`` + ``render_reconstruction``).
        out: the output folder.
        strength: SDEdit strength ``s`` in ``[0, 1]``.
        input_views: generator views the reconstructor takes (:func:`default_input_views`).
        input_resolution: square size of the reconstructor's input views (None: the generator's).
        shard_size: images per shard.
        seed: base seed of the per-object seeds.
        batch_size: objects per generator / reconstructor call inside a shard.
        generator_identity, reconstructor_identity: recorded in (and checked against) the manifest.
        device: where the models run.
        on_shard_written: called with the shard index after each written shard (tests).
    """

    def __init__(self, generator, reconstructor, out: str | Path, strength: float, input_views: Sequence[int],
                 input_resolution: int | None = None, shard_size: int = 64, seed: int = 0, batch_size: int = 4,
                 generator_identity: dict | None = None, reconstructor_identity: dict | None = None,
                 device: str | torch.device = "cpu", on_shard_written: Callable[[int], None] | None = None):
        from recon3d.models.multiview.sdedit import check_strength

        self.strength = check_strength(strength, "--strength")
        if int(shard_size) < 1 or int(batch_size) < 1:
            raise ConfigError(f"--shard-size / --batch-size: expected integers >= 1, got {shard_size}, {batch_size}")
        self.gen, self.rec = generator, reconstructor
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out}: is a file, expected a folder for the shards")
        self.input_views = [int(v) for v in input_views]
        self.input_resolution = None if input_resolution is None else int(input_resolution)
        self.shard_size, self.seed, self.batch_size = int(shard_size), int(seed), int(batch_size)
        self.gen_id, self.rec_id = dict(generator_identity or {}), dict(reconstructor_identity or {})
        self.device = torch.device(device)
        self.on_shard_written = on_shard_written

    # ------------------------------------------------------------------ identity
    def settings(self, images_root: str, num_images: int, num_shards: int) -> dict:
        """What a resumed run must agree with (the manifest's header)."""
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "strength": self.strength, "seed": self.seed,
                "seed_rule": "per object: torch.Generator().manual_seed(object_seed(id, seed)) draws generate's then refine's noise; "
                             "object_seed = sha1(f'{seed}:{id}') first 8 bytes little-endian & (2**63 - 1)",
                "shard_size": self.shard_size, "batch_size": self.batch_size, "images_root": images_root, "num_images": num_images,
                "num_shards": num_shards, "generator": self.gen_id, "reconstructor": self.rec_id,
                "input_views": self.input_views, "input_resolution": self.input_resolution,
                "num_views": int(self.gen.num_views), "resolution": int(self.gen.resolution),
                "projection": self.gen.cameras(1).projection}

    _CHECKED = ("strength", "seed", "shard_size", "batch_size", "num_views", "resolution", "input_views", "input_resolution")

    def _check_existing(self, settings: dict) -> None:
        path = self.out / MANIFEST_NAME
        if not path.is_file():
            return
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(path, f"unreadable manifest ({type(e).__name__}); use another --out or delete the folder") from None
        for key in self._CHECKED:
            if old.get(key) != settings[key]:
                raise ConfigError(f"--out {self.out}: holds a pseudo-ground-truth set built with {key} {old.get(key)!r}; this run asks "
                                  f"{settings[key]!r} (use another --out, or the same settings to resume)")
        for who in ("generator", "reconstructor"):
            a, b = (old.get(who) or {}).get("fingerprint"), settings[who].get("fingerprint")
            if a != b:
                raise ConfigError(f"--out {self.out}: was built with other {who} weights (fingerprint {str(a)[:12]}, this run "
                                  f"{str(b)[:12]}); use another --out, or the same {who} to resume")

    # ------------------------------------------------------------------ records
    def _valid_record(self, k: int, planned: list[str]) -> dict | None:
        """Shard ``k``'s record if the shard is complete and built from ``planned`` files, else None."""
        rec_path, data_path = self.out / record_name(k), self.out / shard_name(k)
        if not rec_path.is_file():
            return None
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if rec.get("files") != planned:
            raise ConfigError(f"--out {self.out}: shard {k} was built from other images ({rec_path.name}); the image folder changed "
                              "since -- use another --out")
        if not data_path.is_file() or data_path.stat().st_size != rec.get("bytes") or file_sha256(data_path) != rec.get("sha256"):
            return None  # the record outlived its file: redo the shard
        return rec

    def _remove_stale_temps(self, mine: list[int]) -> None:
        for k in mine:
            for name in (shard_name(k), record_name(k)):
                for tmp in self.out.glob(f".{name}.*"):
                    tmp.unlink(missing_ok=True)

    def write_manifest(self, settings: dict) -> dict:
        """Rewrite ``manifest.json`` from the completion records on disk (under a lock file, so
        concurrent ranks never lose each other's shards)."""
        from recon3d.utils.io import atomic_write_text

        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / ".manifest.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                shards, failures = [], []
                for k in range(settings["num_shards"]):
                    p = self.out / record_name(k)
                    if not p.is_file():
                        continue
                    try:
                        rec = json.loads(p.read_text())
                    except (OSError, json.JSONDecodeError):
                        continue
                    failures += rec.get("failures", [])
                    shards.append({key: rec[key] for key in ("index", "file", "ids", "seeds", "bytes", "sha256", "rank")})
                m = {**settings, "complete": len(shards) == settings["num_shards"], "num_completed_shards": len(shards),
                     "num_objects": sum(len(s["ids"]) for s in shards), "num_failures": len(failures) + len(settings.get("_listing", [])),
                     "shards": shards, "failures": settings.get("_listing", []) + failures}
                m.pop("_listing", None)
                atomic_write_text(self.out / MANIFEST_NAME, json.dumps(m, indent=1, sort_keys=True))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return m

    # ------------------------------------------------------------------ one shard
    @torch.no_grad()
    def process(self, ids: list[str], images: list[torch.Tensor], stage: dict[str, float]) -> dict[str, torch.Tensor]:
        """Algorithm 1 for ``ids`` (one batch): ``{image, generated, refined, c2w, K}`` (module
        :mod:`recon3d.data.pseudo_gt`), images in ``[0, 1]`` float."""
        from recon3d.data.batch import Batch, Views
        from recon3d.representations.reconstruction import object_seed

        dev = self.device
        cond = torch.stack(images).to(dev)
        gens = [torch.Generator().manual_seed(object_seed(i, self.seed)) for i in ids]
        t = time.perf_counter()
        coarse = self.gen.generate(cond, generator=gens)
        stage["generate"] = stage.get("generate", 0.0) + time.perf_counter() - t
        B, V = coarse.images.shape[:2]
        if V != self.gen.num_views:
            raise ConfigError(f"generator: made {V} views, declares num_views {self.gen.num_views}")
        cams = coarse.cameras
        t = time.perf_counter()
        x = coarse.images[:, self.input_views].clamp(0, 1)
        in_cams = cams[:, self.input_views]
        size = self.input_resolution
        if size is not None and x.shape[-1] != size:
            x = F.interpolate(x.flatten(0, 1), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            x = x.reshape(B, len(self.input_views), 3, size, size).clamp(0, 1)
            in_cams = in_cams.resized(size, size)
        views = Views(images=x, cameras=in_cams)
        batch = Batch(list(ids), views, views, background=torch.ones(B, 3, device=dev))
        rec = self.rec.reconstruct(batch)
        renders = self.rec.render_reconstruction(rec, cams).rgb.float().clamp(0, 1)
        stage["reconstruct+render"] = stage.get("reconstruct+render", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        refined = self.gen.refine(Views(images=renders, cameras=cams), cond, self.strength, generator=gens)
        stage["refine"] = stage.get("refine", 0.0) + time.perf_counter() - t
        return {"image": cond, "generated": coarse.images, "refined": refined.images, "c2w": cams.c2w, "K": cams.K}

    def _shard(self, k: int, items: list[tuple[str, Path]], root: Path, rank: int, stage: dict[str, float]) -> dict:
        from safetensors.torch import save_file

        from recon3d.representations.reconstruction import object_seed
        from recon3d.utils.io import atomic_path, atomic_write_text

        ok_ids, conds, failures = [], [], []
        for oid, path in items:
            try:
                conds.append(condition_image(path, self.gen))
                ok_ids.append(oid)
            except ConfigError:
                raise
            except Recon3DError as e:
                failures.append({"id": oid, "file": path.relative_to(root).as_posix(), "reason": str(e)})
        files = {oid: path.relative_to(root).as_posix() for oid, path in items}
        parts: dict[str, list[torch.Tensor]] = {}
        kept = []
        for i in range(0, len(ok_ids), self.batch_size):
            ids, imgs = ok_ids[i:i + self.batch_size], conds[i:i + self.batch_size]
            try:
                out = self.process(ids, imgs, stage)
            except ConfigError:
                raise
            except Recon3DError as e:  # one image the models refuse (e.g. an empty alpha for Era3D's crop)
                if len(ids) > 1:  # find which: one by one
                    for oid, img in zip(ids, imgs):
                        try:
                            one = self.process([oid], [img], stage)
                        except ConfigError:
                            raise
                        except Recon3DError as e1:
                            failures.append({"id": oid, "file": files[oid], "reason": str(e1)})
                            continue
                        for key, v in one.items():
                            parts.setdefault(key, []).append(v.cpu())
                        kept.append(oid)
                    continue
                failures.append({"id": ids[0], "file": files[ids[0]], "reason": str(e)})
                continue
            for key, v in out.items():
                parts.setdefault(key, []).append(v.cpu())
            kept += ids
        tensors = {}
        if kept:
            cat = {key: torch.cat(v) for key, v in parts.items()}
            tensors = {key: to_uint8(cat[key]) for key in ("image", "generated", "refined")}
            tensors["c2w"] = cat["c2w"].float().contiguous()
            tensors["K"] = cat["K"].float().contiguous()
        cams = self.gen.cameras(1)
        meta = {"ids": kept, "projection": cams.projection, "width": int(cams.width), "height": int(cams.height),
                "strength": self.strength, "seed": self.seed, "shard": k}
        data_path = self.out / shard_name(k)
        with atomic_path(data_path, suffix=".tmp") as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
        rec = {"index": k, "file": data_path.name, "ids": kept, "seeds": [object_seed(i, self.seed) for i in kept],
               "files": [files[oid] for oid, _ in items], "failures": failures,
               "bytes": data_path.stat().st_size, "sha256": file_sha256(data_path), "rank": rank}
        atomic_write_text(self.out / record_name(k), json.dumps(rec, indent=1, sort_keys=True))
        return rec

    # ------------------------------------------------------------------ the run
    def build(self, images_root: str | Path, rank: int = 0, world_size: int = 1, progress: bool = True) -> BuildSummary:
        """Build (or resume) this rank's shards of ``images_root`` and rewrite the manifest."""
        t0 = time.perf_counter()
        items, listing = list_images(images_root)
        root = Path(images_root)
        num_shards = max(1, math.ceil(len(items) / self.shard_size)) if items else 0
        if not items:
            raise DataError(root, f"no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder (--images)")
        plan = [items[k * self.shard_size:(k + 1) * self.shard_size] for k in range(num_shards)]
        settings = self.settings(str(root), len(items), num_shards)
        settings["_listing"] = listing
        self._check_existing(settings)
        self.out.mkdir(parents=True, exist_ok=True)
        mine = [k for k in range(num_shards) if k % world_size == rank]
        self._remove_stale_temps(mine)
        bar = _Progress(sum(len(plan[k]) for k in mine), rank, world_size, progress)
        summary = BuildSummary()
        stage: dict[str, float] = {}
        try:
            for k in mine:
                planned = [p.relative_to(root).as_posix() for _, p in plan[k]]
                if self._valid_record(k, planned) is not None:
                    summary.shards_skipped.append(k)
                    bar.update(len(plan[k]), k, skipped=True)
                    continue
                rec = self._shard(k, plan[k], root, rank, stage)
                summary.shards_written.append(k)
                summary.objects += len(rec["ids"])
                summary.failures += len(rec["failures"])
                self.write_manifest(settings)
                bar.update(len(plan[k]), k)
                if self.on_shard_written is not None:
                    self.on_shard_written(k)
        finally:
            bar.close()
        self.write_manifest(settings)
        summary.seconds = time.perf_counter() - t0
        summary.stage_seconds = stage
        return summary


# ---------------------------------------------------------------------- CLI
# The arguments live in recon3d.commands.pseudo_gt_args (no torch import: `recon3d data --help` stays fast).
from recon3d.commands.pseudo_gt_args import add_arguments  # noqa: E402  (re-exported)


def run(a: argparse.Namespace) -> int:
    """``recon3d data pseudo-gt`` (module docstring); returns the exit status."""
    from recon3d.models.multiview.sdedit import check_strength

    check_strength(a.strength, "--strength")  # before any model is built
    rank, world = resolve_world(a.rank, a.world_size)
    if a.device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    else:
        device = a.device
    given = None
    if a.input_views is not None:
        try:
            given = [int(v) for v in a.input_views.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--input-views {a.input_views!r}: expected comma-separated view indices, e.g. 0,2,3,4") from None
    if not Path(a.images).is_dir():
        raise DataError(a.images, "image folder not found (--images)")
    gen, gen_id = load_generator(a.generator, a.seed, device, a.allow_pickle)
    rec, rec_id, n_views, res = load_reconstructor(a.reconstructor, a.seed, device, a.allow_pickle)
    views = default_input_views(gen, n_views, given)
    builder = PseudoGTBuilder(gen, rec, a.out, a.strength, views, res, a.shard_size, a.seed, a.batch_size, gen_id, rec_id, device)
    s = builder.build(a.images, rank, world, progress=not a.no_progress)
    m = json.loads((Path(a.out) / MANIFEST_NAME).read_text())
    rate = 60 * s.objects / s.seconds if s.seconds > 0 and s.objects else 0.0
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in s.stage_seconds.items())
    print(f"recon3d data pseudo-gt: rank {rank}/{world}: {len(s.shards_written)} shard(s) written, {len(s.shards_skipped)} already complete; "
          f"{s.objects} objects, {s.failures} failed image(s) in {s.seconds:.1f} s ({rate:.1f} images/min; {stages or 'no model time'}); "
          f"{a.out}: {m['num_completed_shards']}/{m['num_shards']} shards, {m['num_objects']} objects, {m['num_failures']} failures"
          + ("" if m["complete"] else " (incomplete: other ranks' shards pending)"))
    return 0
