"""What the ``make_*_manifest.py`` scripts share: finding an upstream checkout (a work tree, or a
git dir such as ``/work/.mirror/<owner>+<name>/repo`` read with ``git ls-tree`` / ``show`` /
``archive``), putting it on ``sys.path``, stand-in modules for the packages upstream imports but
the scripts never run (CUDA-only extensions, training utilities), the state-dict layout the
fixtures list, the weight rules, and writing the JSON manifest.

Script-side only: recon3d never imports this module, and it imports nothing of recon3d (the Era3D
script runs it in a separate environment). ``torch`` is imported inside the functions that need
it, for the same reason.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import types
from collections.abc import Iterable
from pathlib import Path

#: TRELLIS's backend switches for a CPU run: dense attention through torch's SDPA, sparse attention
#: through an ``xformers`` stand-in (the scripts install it), sparse convs through spconv.
TRELLIS_CPU_ENV = {"ATTN_BACKEND": "sdpa", "SPARSE_ATTN_BACKEND": "xformers", "SPARSE_BACKEND": "spconv"}


# ---------------------------------------------------------------------------------- locating upstream
def is_checkout(src: Path, marker: str) -> bool:
    """Whether ``src`` is a work tree: it holds the file ``marker`` (a path relative to ``src``)."""
    return (src / marker).is_file()


def head_commit(work_tree: Path) -> str | None:
    """The commit a work tree is at (``git rev-parse HEAD``), None when git cannot tell (not a
    repository, or no git)."""
    try:
        return subprocess.run(["git", "-C", str(work_tree), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def git(git_dir: Path, *args: str, text: bool = True) -> str | bytes:
    """Stdout of ``git --git-dir=<git_dir> <args>`` (text, or bytes with ``text=False``); raises
    :class:`subprocess.CalledProcessError` when git fails."""
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], capture_output=True, text=text, check=True).stdout


def resolve_revision(git_dir: Path, rev: str, needs: str, tree: str | None = None,
                     recursive: bool = False) -> tuple[str, list[str]]:
    """The commit ``rev`` names in ``git_dir`` and, with ``tree``, the names ``git ls-tree
    [-r] --name-only <commit> <tree>`` lists (full paths). A failure of either is one line
    (SystemExit): ``git_dir`` is neither a checkout with ``needs`` (what the script looks for, e.g.
    ``trellis/``) nor a git dir with ``rev``."""
    try:
        commit = git(git_dir, "rev-parse", rev).strip()
        names = []
        if tree is not None:
            names = git(git_dir, "ls-tree", *(["-r"] if recursive else []), "--name-only", commit, tree).split()
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        raise SystemExit(f"{git_dir}: neither a checkout with {needs} nor a git dir with revision {rev!r} ({e})") from None
    return commit, names


def archive_into(git_dir: Path, commit: str, paths: Iterable[str], out: Path) -> None:
    """Unpack ``git archive <commit> <paths>`` (folders or files) under ``out``."""
    tar = git(git_dir, "archive", commit, *paths, text=False)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(out)


def show_into(git_dir: Path, commit: str, names: Iterable[str], out: Path, strip: str = "") -> None:
    """Write each file ``name`` of ``commit`` (``git show <commit>:<name>``, as text) to
    ``out / name`` with the leading ``strip`` removed from the name."""
    for name in names:
        text = git(git_dir, "show", f"{commit}:{name}")
        dest = out / name[len(strip):]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)


def on_path(root: Path) -> None:
    """Make upstream's packages under ``root`` importable (first on ``sys.path``)."""
    sys.path.insert(0, str(root))


# ---------------------------------------------------------------------------------- stand-in modules
def stand_in(name: str, path: Path | None = None, **attrs) -> types.ModuleType:
    """Register a module ``name`` in ``sys.modules`` (replacing any), holding ``attrs``; with
    ``path``, a package whose submodules are imported from that folder (e.g. upstream's
    ``trellis`` without its ``__init__``, which imports CUDA extensions)."""
    m = types.ModuleType(name)
    if path is not None:
        m.__path__ = [str(path)]
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def empty_modules(*names: str) -> None:
    """Empty modules for ``names`` that are not imported yet (upstream imports them at module level
    and never calls them in what the scripts run)."""
    for name in names:
        sys.modules.setdefault(name, types.ModuleType(name))


def empty_modules_if_absent(packages: dict[str, tuple[str, ...]]) -> None:
    """:func:`empty_modules` for each package of ``{top: submodules}`` that is not installed (the
    top-level name and its listed submodules); installed packages are left to import for real."""
    import importlib.util

    for top, subs in packages.items():
        if importlib.util.find_spec(top) is None:
            empty_modules(top, *subs)


# ---------------------------------------------------------------------------------- weights and layouts
def key_layout(model) -> dict:
    """``{key: {"shape": [...], "dtype": "float32"}}`` of every entry of ``model.state_dict()``
    (parameters and buffers, in the module's order): what the fixtures list."""
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in model.state_dict().items()}


def randomise_half_exact(model, generator, std=None) -> None:
    """Overwrite every parameter of ``model`` in place with ``randn * std(p) + centre`` from
    ``generator``, in ``named_parameters`` order, rounded to float16 values (so a fixture can store
    them as float16 without loss). ``centre`` is 1 for norm scales and RMS gammas, else 0;
    ``std(p)`` defaults to 0.2. Fresh TRELLIS blocks hold zeros (adaLN, output layers): random
    weights make every branch count in a parity check."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if name.endswith("gamma") or ("norm" in name and name.endswith("weight")) else 0.0
            s = 0.2 if std is None else std(p)
            p.copy_((torch.randn(p.shape, generator=generator) * s + centre).half().float())


def seeded_weights(state: dict, vector_keys: tuple[str, ...] = ()) -> dict:
    """The seeded weight rule recon3d's tests repeat: key ``i`` of the sorted ``state`` gets
    ``std * randn(shape)`` (float32) from ``torch.Generator().manual_seed(i)``, ``std = 0.2`` for
    vectors (``ndim < 2``) and keys ending with one of ``vector_keys``, else ``1 / sqrt(fan_in)``
    (the product of the shape after the first axis)."""
    import torch

    out = {}
    for i, (key, t) in enumerate(sorted(state.items())):
        g = torch.Generator().manual_seed(i)
        std = 0.2 if t.ndim < 2 or key.endswith(vector_keys) else float(torch.tensor(t.shape[1:]).prod()) ** -0.5
        out[key] = std * torch.randn(t.shape, generator=g, dtype=torch.float32)
    return out


# ---------------------------------------------------------------------------------- output
def write_manifest(path: Path, manifest: dict, sort_keys: bool = False) -> None:
    """``manifest`` as JSON (indent 1, a final newline) at ``path``, its folder created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1, sort_keys=sort_keys) + "\n")
