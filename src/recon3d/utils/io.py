"""Atomic file writes: outputs are written to a temporary file beside the target, then renamed.

The one rule every writer in recon3d follows (:func:`atomic_path`; checkpoints, caches, exports,
metric tables, compiled kernels): write a hidden temporary file in the target's own folder,
``fsync`` it, ``os.replace`` it onto the name, then ``fsync`` the folder where the OS allows it
(so the rename itself survives a power loss, not only the bytes). A process killed mid-write
leaves the previous file (or none), never a truncated one; the temporary sits in the same folder
because a rename across file systems is a copy, which is not atomic. The file gets the permissions
a plain ``open(path, "w")`` would give (``0o666`` minus the umask), not the ``0o600`` of the
``mkstemp`` temporary, so outputs on a shared cluster stay readable by the group.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "current_umask", "fsync_dir"]

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux:
    ``/proc/self/status``). Elsewhere POSIX can only read it by setting it: that is done under a
    lock with the most restrictive mask in between, so a file another thread creates in that
    instant is at worst too private, never world-writable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """``fsync`` a folder so a rename inside it is durable; a no-op where folders cannot be opened
    or synced (Windows, some network file systems), since the rename is still atomic there."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success fsync it, rename it onto ``path``
    and fsync the folder (module docstring).

    Args:
        path: the target file; its folder is created if missing.
        suffix: the temporary's suffix; defaults to the target's, since some writers (imageio,
            trimesh) pick the format from the extension. Give another one where the target's
            would make the temporary match a glob the target is found by (checkpoints: ``.tmp``).
        mode: permissions before the umask (``0o777`` for an executable or shared library).

    The temporary is named ``.<name>.<random><suffix>``. The caller may write it in place or
    replace it (a compiler's ``-o``). On error it is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix if suffix is not None else path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file what open() would have (0666 & ~umask).
        os.chmod(tmp_path, mode & ~current_umask())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
