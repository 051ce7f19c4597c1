"""MVBoost's pseudo-ground-truth set on disk, and the dataset that reads it as recon3d batches.

``recon3d data pseudo-gt`` (:mod:`recon3d.commands.pseudo_gt`) turns a folder of single images
into pairs (generated views ``C^π``, refined views ``C↑^π``) at a multi-view generator's fixed
cameras (MVBoost §3.2, Algorithm 1). This module owns the **file format** and the **reader**.

Layout of an output folder::

    <out>/manifest.json              # the completed shards, identities, seeds, failures (below)
    <out>/shard_00000.safetensors    # the tensors of up to shard_size objects
    <out>/shard_00000.json           # that shard's completion record (written after the tensors)
    ...

A shard file holds, for its ``n`` objects (``V`` generator views at ``R``² pixels):

==============  ======================  =====================================================
key             shape, dtype            meaning
==============  ======================  =====================================================
``image``       ``(n, 3, R, R)`` uint8  the input view ``c`` as it conditioned the generator
``generated``   ``(n, V, 3, R, R)``     ``C^π``: the generator's views from pure noise
``refined``     ``(n, V, 3, R, R)``     ``C↑^π``: the reconstruction's renders SDEdited at ``s``
``c2w``         ``(n, V, 4, 4)`` f32    the generator's cameras (OpenCV camera-to-world)
``K``           ``(n, V, 3, 3)`` f32    their intrinsics in pixels (orthographic: pixels per unit)
==============  ======================  =====================================================

Images are stored as 8-bit (``round(255 x)``), what a PNG of them would hold; the reader returns
``x / 255`` in ``[0, 1]``. The safetensors header carries one metadata key, ``pseudo_gt``: a JSON
string (sorted keys) with the object ids, the projection and the image size -- one key, because
safetensors writes several metadata keys in a per-process hash order, and the shards are meant to
be byte-identical however often they are rebuilt.

Completion and atomicity: a shard's tensors are written to a temporary file in the same folder
and renamed into place, then its record ``shard_NNNNN.json`` (ids, seeds, failures, byte size and
SHA-256 of the tensor file) likewise; ``manifest.json`` is rewritten (atomically, under a lock
file) from the records after every shard. So a shard is complete exactly when its record exists
and matches its file; the manifest lists only completed shards; a half-written shard is only ever
a hidden temporary, which nothing reads. The reader checks every listed shard's size at
construction and its SHA-256 and ids the first time a process opens it (``verify``).

:class:`PseudoGTDataset` serves each object as views ``0 .. V-1`` = ``C^π`` and ``V .. 2V-1`` =
``C↑^π`` (``supervision: generated`` swaps the refined block for ``C^π`` itself: Table 4's
"original" row), and chooses them itself (:meth:`PseudoGTDataset.choose_views`, used by
:class:`~recon3d.data.datamodule.ReconDataModule`): the inputs are the views the reconstruction
model takes (``input_views`` of the manifest, e.g. LGM's front/right/back/left = Era3D's 0, 2, 3, 4),
the targets are refined views (eq. 6: input ``C^π``, supervision ``C↑^π``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Literal

import torch

from recon3d.data.base import ObjectDataset, RawViews
from recon3d.data.cameras import Cameras
from recon3d.errors import ConfigError, DataError

__all__ = ["PseudoGTDataset", "MANIFEST_NAME", "FORMAT_NAME", "FORMAT_VERSION", "METADATA_KEY", "shard_name", "record_name",
           "file_sha256", "read_manifest", "to_uint8"]

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "recon3d.pseudo_gt"
FORMAT_VERSION = 1
#: the one safetensors metadata key of a shard (module docstring: why one)
METADATA_KEY = "pseudo_gt"
TENSOR_KEYS = ("image", "generated", "refined", "c2w", "K")


def shard_name(index: int) -> str:
    """``shard_00003.safetensors`` for shard 3."""
    return f"shard_{int(index):05d}.safetensors"


def record_name(index: int) -> str:
    """``shard_00003.json``: the completion record of shard 3."""
    return f"shard_{int(index):05d}.json"


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in ``[0, 1]`` as 8-bit values ``round(255 x)`` (what the shards store)."""
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(root: str | Path) -> dict:
    """``<root>/manifest.json`` parsed and checked (format name and version, shard list); one
    :class:`DataError` line naming the file otherwise."""
    path = Path(root) / MANIFEST_NAME
    if not Path(root).is_dir():
        raise DataError(root, "pseudo-ground-truth folder not found; build it with `recon3d data pseudo-gt --images ... --out ...`")
    if not path.is_file():
        raise DataError(path, "not found: this folder holds no completed pseudo-ground-truth shard yet "
                        "(`recon3d data pseudo-gt ... --out` writes it after the first shard)")
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, f"not a readable JSON manifest ({type(e).__name__}); expected the file `recon3d data pseudo-gt` writes") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise DataError(path, f"not a pseudo-ground-truth manifest (format {m.get('format') if isinstance(m, dict) else None!r}, "
                        f"expected {FORMAT_NAME!r})")
    if m.get("version") != FORMAT_VERSION:
        raise DataError(path, f"manifest version {m.get('version')!r}; this recon3d reads version {FORMAT_VERSION}")
    for key in ("shards", "num_views", "resolution", "input_views", "projection"):
        if key not in m:
            raise DataError(path, f"manifest has no {key!r}; expected the file `recon3d data pseudo-gt` writes")
    return m


class PseudoGTDataset(ObjectDataset):
    """The pseudo-ground-truth set of ``recon3d data pseudo-gt`` as a recon3d dataset (module docstring).

    Args:
        root: the builder's ``--out`` folder. None: use ``synthetic`` instead (below).
        supervision: ``"refined"`` (``C↑^π``, MVBoost) or ``"generated"`` (``C^π`` itself: the
            reconstruction model trained on raw generated views, Table 4's "original").
        strength: if given, the manifest's refinement strength must equal it (guards a strength
            ablation against reading another strength's folder).
        image_as_input_view: replace input view 0 (the generator's view at the input camera,
            azimuth 0) by the original image ``c``: what input-view optimisation (§3.4) fits at
            predict time. Off for training: eq. 6 feeds ``C^π`` alone.
        verify: check each shard's SHA-256 and ids against the manifest the first time a process
            opens it (sizes are always checked at construction).
        synthetic: init args of a :class:`~recon3d.data.synthetic.SyntheticDataset` that stands
            in for the shards when ``root`` is None: its true renders serve as both ``C^π`` and
            ``C↑^π`` (the setting of the boosting issue before a generator existed). For tests and
            the conformance suite: its views must be the generator's layout
            (``camera_layout: fixed``, ``views_per_object: V``).
        input_views: with ``synthetic``: the views fed to the reconstruction model (default all).
        cache_dir: with ``synthetic``: its cache folder (what the test harness sets on every dataset).
    """

    name = "pseudo-ground-truth set"

    def __init__(
        self,
        root: str | None = None,
        supervision: Literal["refined", "generated"] = "refined",
        strength: float | None = None,
        image_as_input_view: bool = False,
        verify: bool = True,
        synthetic: dict | None = None,
        input_views: list[int] | None = None,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if supervision not in ("refined", "generated"):
            raise ConfigError(f"supervision: expected 'refined' or 'generated', got {supervision!r}")
        self.supervision, self.image_as_input_view, self.verify = supervision, bool(image_as_input_view), bool(verify)
        self._synthetic = None
        if root is None:
            if synthetic is None:
                raise ConfigError("PseudoGTDataset: give root (a `recon3d data pseudo-gt` folder) or synthetic (stand-in init args)")
            from recon3d.data.synthetic import SyntheticDataset

            args = dict(synthetic)
            if cache_dir is not None:
                args["cache_dir"] = cache_dir
            self._synthetic = SyntheticDataset(**args)
            if self._synthetic.camera_layout != "fixed":
                raise ConfigError("synthetic.camera_layout: expected 'fixed' (the generator's camera layout), "
                                  f"got {self._synthetic.camera_layout!r}")
            self.root = None
            self.num_gen_views = int(self._synthetic.views_per_object)
            self.resolution = int(self._synthetic.resolution)
            self.input_views = list(range(self.num_gen_views)) if input_views is None else [int(v) for v in input_views]
            self.strength = None
            self.manifest = None
            self._ids = self._synthetic.object_ids()
            self._index = []
        else:
            if synthetic is not None or input_views is not None:
                raise ConfigError("PseudoGTDataset: synthetic / input_views are for the stand-in without root; "
                                  "a pseudo-ground-truth folder states its own input views")
            self.root = Path(root)
            m = read_manifest(self.root)
            self.manifest = m
            self.num_gen_views, self.resolution = int(m["num_views"]), int(m["resolution"])
            self.input_views = [int(v) for v in m["input_views"]]
            self.strength = m.get("strength")
            if strength is not None and (self.strength is None or not math.isclose(float(self.strength), float(strength), abs_tol=1e-9)):
                raise ConfigError(f"strength: the dataset {self.root} was refined at strength {self.strength}, the config expects {strength} "
                                  f"(build it with --strength {strength}, or point root at that strength's folder)")
            self._index: list[tuple[int, int]] = []  # object -> (shard list position, row)
            self._ids = []
            for k, sh in enumerate(m["shards"]):
                path = self.root / sh["file"]
                if not path.is_file():
                    raise DataError(path, "listed in manifest.json but missing; rebuild it with `recon3d data pseudo-gt` (same --out resumes)")
                if path.stat().st_size != int(sh["bytes"]):
                    raise DataError(path, f"{path.stat().st_size} bytes, the manifest records {sh['bytes']} (a changed or truncated shard); "
                                    "delete it and its .json record and rerun the builder")
                for row, oid in enumerate(sh["ids"]):
                    self._ids.append(str(oid))
                    self._index.append((k, row))
            if not self._ids:
                raise DataError(self.root, "the pseudo-ground-truth set holds no object (every image failed?); see manifest.json 'failures'")
            if len(set(self._ids)) != len(self._ids):
                raise DataError(self.root / MANIFEST_NAME, "an object id is listed twice; expected each image once")
        bad = [v for v in self.input_views if not 0 <= v < self.num_gen_views]
        if bad or not self.input_views or len(set(self.input_views)) != len(self.input_views):
            raise ConfigError(f"input_views: expected distinct view indices in 0..{self.num_gen_views - 1}, got {self.input_views}")
        self._open: dict[int, object] = {}
        self._metas: dict[int, dict] = {}
        self._checked: set[int] = set()

    # ------------------------------------------------------------------ ObjectDataset
    def object_ids(self) -> list[str]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def num_views(self, index: int) -> int:
        """``2 V``: views ``0..V-1`` are ``C^π``, ``V..2V-1`` the supervision (module docstring)."""
        self._check_index(index)
        return 2 * self.num_gen_views

    def prepare(self) -> None:
        if self._synthetic is not None:
            self._synthetic.prepare()

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self._ids):
            raise IndexError(f"object index {index} out of range for {len(self._ids)} objects")

    def choose_views(self, index: int, epoch: int, num_input_views: int, num_target_views: int, view_sampling: str,
                     supervise_inputs: bool, generator: torch.Generator) -> tuple[list[int], list[int]]:
        """Inputs: the reconstruction model's views of ``C^π`` (``input_views``, whatever the
        sampling: the model was built for those cameras). Targets (indices ``V + j``, refined view
        ``j``): with ``supervise_inputs`` the refined views at the input cameras first, then
        ``num_target_views`` of the other refined views -- evenly spaced for ``fixed``, drawn
        with ``generator`` otherwise (all six of Era3D's supervise with 4 inputs + 2 targets)."""
        V = self.num_gen_views
        if num_input_views != len(self.input_views):
            raise ConfigError(f"data.num_input_views: the {self.name} feeds the reconstruction model {len(self.input_views)} views "
                              f"(generator views {self.input_views}); got {num_input_views}")
        rest = [v for v in range(V) if v not in self.input_views]
        if view_sampling == "fixed":
            step = max(1, len(rest) // max(1, num_target_views)) if rest else 1
            others = rest[::step][:num_target_views]
        else:
            perm = torch.randperm(len(rest), generator=generator).tolist() if rest else []
            others = [rest[perm[i % len(rest)]] for i in range(num_target_views)] if rest else []
        targets = (list(self.input_views) if supervise_inputs else []) + others
        if not targets:
            raise ConfigError(f"data: no supervision views (supervise_inputs false and the generator's {V} views are all inputs); "
                              "set data.supervise_inputs: true")
        return list(self.input_views), [V + t for t in targets]

    def load_views(self, index: int, views: list[int]) -> RawViews:
        """Views ``views`` (``0..2V-1``, module docstring) of object ``index``: ``rgb (n, 3, R, R)``
        in ``[0, 1]``, cameras ``(n,)``, no masks (generated views carry none)."""
        self._check_index(index)
        V = self.num_gen_views
        if any(not 0 <= int(v) < 2 * V for v in views):
            raise IndexError(f"view indices {list(views)} out of range for {2 * V} views (C^π 0..{V - 1}, supervision {V}..{2 * V - 1})")
        if self._synthetic is not None:
            raw = self._synthetic.load_views(index, [int(v) % V for v in views])
            return RawViews(rgb=raw.rgb, cameras=raw.cameras, alpha=raw.alpha)
        k, row = self._index[index]
        f = self._shard(k)
        sup = "refined" if self.supervision == "refined" else "generated"
        generated = f.get_slice("generated")[row:row + 1]
        supervised = f.get_slice(sup)[row:row + 1] if any(v >= V for v in views) else None
        out = []
        for v in views:
            v = int(v)
            if v == 0 and self.image_as_input_view and v in self.input_views:
                out.append(f.get_slice("image")[row:row + 1][0])
            elif v < V:
                out.append(generated[0, v])
            else:
                out.append(supervised[0, v - V])
        rgb = torch.stack(out).float() / 255.0
        c2w = f.get_slice("c2w")[row:row + 1][0][[int(v) % V for v in views]]
        K = f.get_slice("K")[row:row + 1][0][[int(v) % V for v in views]]
        meta = self._meta(k)
        cams = Cameras(c2w.float(), K.float(), int(meta["width"]), int(meta["height"]), meta["projection"])
        return RawViews(rgb=rgb, cameras=cams)

    # ------------------------------------------------------------------ shards
    def _meta(self, k: int) -> dict:
        return self._metas[k]

    def _shard(self, k: int):
        """The open shard ``k`` of the manifest (verified on first open in this process)."""
        if k in self._open:
            return self._open[k]
        from safetensors import safe_open

        sh = self.manifest["shards"][k]
        path = self.root / sh["file"]
        if self.verify and k not in self._checked:
            digest = file_sha256(path)
            if digest != sh["sha256"]:
                raise DataError(path, "SHA-256 differs from manifest.json (the shard changed after it was written); "
                                "delete it and its .json record and rerun the builder")
            self._checked.add(k)
        try:
            f = safe_open(str(path), framework="pt")
            meta = json.loads((f.metadata() or {})[METADATA_KEY])
        except Exception as e:  # noqa: BLE001 - any unreadable shard is the same data error
            raise DataError(path, f"not a readable pseudo-ground-truth shard ({type(e).__name__}); rerun the builder") from None
        if [str(i) for i in meta.get("ids", [])] != [str(i) for i in sh["ids"]]:
            raise DataError(path, "its object ids differ from manifest.json's; delete it and its .json record and rerun the builder")
        missing = [key for key in TENSOR_KEYS if key not in f.keys()]
        if missing:
            raise DataError(path, f"no tensor {missing[0]!r}; expected {', '.join(TENSOR_KEYS)}")
        self._metas[k] = meta
        self._open[k] = f
        return f

    def __getstate__(self):
        # Open safetensors handles do not pickle (DataLoader workers): each process reopens.
        state = dict(self.__dict__)
        state["_open"], state["_metas"] = {}, {}
        return state
