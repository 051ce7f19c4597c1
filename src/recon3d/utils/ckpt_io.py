"""Checkpoint writing and reading for training runs: atomic, safe, and carrying the RNG state.

:class:`AtomicCheckpointIO` is the Lightning ``CheckpointIO`` recon3d installs by default
(:class:`recon3d.cli.Recon3DCLI`):

- **atomic writes.** Lightning 2.6's ``TorchCheckpointIO`` stages the file with
  ``tempfile.mkstemp()`` in the *system temp folder* and then ``shutil.move``\\ s it onto the target.
  When ``/tmp`` and the checkpoint folder are different file systems (the normal case on a
  cluster: node-local ``/tmp``, shared checkpoint storage) the move is a copy, and a job killed
  during the copy leaves a truncated ``last.ckpt``; the whole checkpoint is also held in memory
  twice. Here the bytes go to a hidden temporary file *in the checkpoint's own folder*
  (``.<name>.<random>.tmp``), are ``fsync``\\ ed, and ``os.replace``\\ d onto the name, then the
  folder is ``fsync``\\ ed. A kill at any point leaves the previous file intact; stale temporary
  files are removed on the next write (they never match ``*.ckpt``, so ``--ckpt_path last``
  never sees them).
- **safe reads.** Checkpoints are read with ``torch.load(weights_only=True)``; one that needs
  pickled code is refused with a one-line :class:`~recon3d.errors.CheckpointError` unless the
  user passed ``--allow_pickle true`` (``allow_pickle=True``).

:class:`RNGStateCallback` puts every rank's global RNG state (torch, CUDA, numpy, Python) into the
checkpoint and restores it on resume, and seeds each rank differently (``seed + 1000003·rank``)
at the start of a fresh fit, so per-rank noise differs while weights start identical.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from recon3d.errors import CheckpointError
from recon3d.utils.io import atomic_path

__all__ = ["AtomicCheckpointIO", "RNGStateCallback", "atomic_torch_save", "write_atomically"]


def write_atomically(path: str | os.PathLike, write) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path`` and move it onto ``path`` with
    :func:`recon3d.utils.io.atomic_path` (fsync the file, rename, fsync the folder).

    The temporary is ``.<name>.<random>.tmp``: never ``*.ckpt``, so ``--ckpt_path last`` and
    checkpoint globs never see it. Stale temporaries of ``path`` from a killed earlier write are
    removed first.
    """
    path = Path(path)
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            try:
                stale.unlink()
            except OSError:
                pass
    with atomic_path(path, suffix=".tmp") as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a truncated ``path``."""
    write_atomically(path, lambda f: torch.save(obj, f))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic local writes, weights-only reads (module docstring).

    Args:
        allow_pickle: read checkpoints with full unpickling (runs code stored in the file); only
            for files from a trusted source.
    """

    def __init__(self, allow_pickle: bool = False):
        super().__init__()
        self.allow_pickle = allow_pickle

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote (s3://, gs://): fsspec transactions are the atomic unit there
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=not self.allow_pickle)
        from recon3d.utils.checkpoint import load_state_dict_file

        ckpt = load_state_dict_file(path, allow_pickle=self.allow_pickle)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise CheckpointError(f"{path}: not a Lightning training checkpoint (no 'state_dict'); "
                                  "to start from bare weights use --model.init_weights instead of --ckpt_path")
        return ckpt


# ---------------------------------------------------------------------- RNG state
def _rng_state() -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(py_version), "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_seed(seed: int, rank: int) -> int:
    return (seed + 1_000_003 * rank) % (2**31)


class RNGStateCallback(L.Callback):
    """Per-rank RNG seeding and RNG state in checkpoints (module docstring).

    Args:
        seed: base seed; default: ``PL_GLOBAL_SEED`` (set by ``seed_everything``) or 0.
    """

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self._restored: list[dict[str, Any]] | None = None

    @property
    def state_key(self) -> str:
        return "RNGStateCallback"

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while the checkpoint is assembled (the file is written by rank 0).
        own = _rng_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, own)
        else:
            states = [own]
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = list(state_dict.get("ranks", []))

    @staticmethod
    def _private_loader_generators(trainer: L.Trainer, seed: int) -> None:
        # A DataLoader without its own ``generator`` draws its workers' base seed from the global
        # torch RNG each time an iterator is created (every epoch, every validation run, and once
        # more after a resume), which would shift the global RNG between an interrupted and an
        # uninterrupted run. recon3d's item randomness does not depend on that seed, so each
        # loader gets a private generator and the global RNG is left to the model.
        from torch.utils.data import DataLoader

        loaders: list = []
        combined = getattr(trainer.fit_loop, "_combined_loader", None)
        if combined is not None:
            loaders += list(combined.flattened)
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "loader"):
            for split in ("train", "val"):
                try:
                    loaders.append(dm.loader(split))
                except Exception:  # a datamodule without that split
                    pass
        for dl in loaders:
            if isinstance(dl, DataLoader) and dl.generator is None:
                dl.generator = torch.Generator().manual_seed(seed)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        base = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", "0"))
        self._private_loader_generators(trainer, _rank_seed(base, rank))
        if self._restored is not None:
            if len(self._restored) != world:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(
                    f"RNG state: the checkpoint holds {len(self._restored)} ranks, this run has {world}; "
                    "re-seeding per rank (the resumed run will not be bit-identical)"
                )
            else:
                _set_rng_state(self._restored[rank])
                self._restored = None
                return
        self._restored = None
        s = _rank_seed(base, rank)
        torch.manual_seed(s)
        random.seed(s)
        import numpy as np

        np.random.seed(s)
