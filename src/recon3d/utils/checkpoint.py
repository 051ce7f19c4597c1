"""Safe weight loading: ``torch.load(weights_only=True)`` or safetensors, strict key matching,
one key-mismatch report, and frozen pretrained parts kept out of checkpoints.

A checkpoint that needs arbitrary pickled code is refused unless the caller opts in with
``allow_pickle=True`` (the CLI exposes it as an explicit flag), because unpickling a stranger's
file can execute code.

**Strict loading, one report.** Every key of the model must be in the file and every tensor of
the file must fit a key of the model, with the same shape. Every loader of recon3d (this module,
the official-weight importers in ``models/``, the encoders' ``pretrained_path``, LPIPS, checkpoint
resume through :meth:`ReconModule.load_state_dict`) compares with :func:`compare_state_dicts` /
formats with :func:`key_mismatch_report`, so a mismatch always reads the same, on one line::

    12 of 13 model keys found; 1 missing (e.g. ['decoder.0.weight']); 1 unexpected (e.g. ['decoder.9.weight'])

A partial load names what may differ as *ignore patterns* (``ignore=["lpips.*"]``;
``model.init_args.init_weights_ignore`` in a config): glob patterns (``fnmatch``, matched against
the whole key), or regular expressions written ``"re:<regex>"`` (``re.fullmatch``). Keys matching
them may be missing from the file, extra in it, or of another shape, and are then left as the
model initialised them.

A Lightning checkpoint records the LightningModule class it was trained with
(``hyper_parameters["_class_path"]``); when that class is not the model's and the weights do not
fit, the error says so first ("this checkpoint is an M3DModule, the config is a GTRModule").

**Frozen pretrained parts.** A submodule loaded from a local weight file and never trained (a
frozen DINOv2, an LPIPS backbone) need not be copied into every checkpoint: it is marked with
:func:`load_frozen` / :func:`mark_frozen`, :func:`strip_frozen_parts` (called by
``ReconModule.on_save_checkpoint``) drops its tensors from the checkpoint and records the source
file with a manifest (shape, dtype, SHA-256 of every tensor), and :func:`attach_frozen_parts`
(``ReconModule.on_load_checkpoint``, :func:`load_weights_into`) reads them back from the source,
refusing with one :class:`CheckpointError` line naming the file when it is gone or holds other
tensors. Only tensors that still equal the source's are dropped: a "frozen" part whose values
moved (BatchNorm statistics updated in train mode, an adapter inside it) keeps those tensors in
the checkpoint, so nothing trained is ever lost.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from recon3d.errors import CheckpointError, ConfigError

__all__ = [
    "load_state_dict_file", "load_weights_into", "extract_state_dict", "state_dict_mismatch", "checkpoint_class",
    "checkpoint_class_mismatch", "KeyMismatch", "compare_state_dicts", "key_mismatch_report", "key_matcher",
    "check_ignore_patterns", "tied_keys", "FrozenSource", "FROZEN_KEY", "load_frozen", "mark_frozen", "frozen_parts_of",
    "strip_frozen_parts", "attach_frozen_parts", "checkpoint_state_dict", "load_hf_pretrained",
]

log = logging.getLogger(__name__)

#: Key of a checkpoint dict under which :func:`strip_frozen_parts` records the parts it left out.
FROZEN_KEY = "frozen_pretrained"


# ---------------------------------------------------------------------- reading files
def load_state_dict_file(path: str | Path, allow_pickle: bool = False) -> dict:
    """Load a ``.safetensors``, ``.ckpt``/``.pt``/``.pth`` file into a dict on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch zip archive nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e) and "GLOBAL" not in str(e):
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({str(e).strip().splitlines()[-1][:160]})") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported pickled object"
        raise CheckpointError(
            f"{path}: refused to load: the file contains pickled code or objects that weights-only loading does not "
            f"allow ({first[:160]}); if you trust its source, pass allow_pickle / --allow-pickle explicitly"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint or truncated ({type(e).__name__}: {str(e)[:160]})") from None


def extract_state_dict(obj: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensor state dict inside a Lightning checkpoint (``state_dict``) or a plain dict,
    keeping only keys under ``prefix`` (stripped). ``*._extra_state`` entries (a module's
    ``get_extra_state``, any picklable value) are kept whatever their type."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError("checkpoint: expected a dict of tensors or a Lightning checkpoint with 'state_dict'")
    out = {k[len(prefix):]: v for k, v in sd.items()
           if isinstance(k, str) and k.startswith(prefix) and (isinstance(v, torch.Tensor) or k.endswith("_extra_state"))}
    if not out:
        raise CheckpointError(f"checkpoint: no tensors under prefix {prefix!r}")
    return out


# ---------------------------------------------------------------------- ignore patterns
def check_ignore_patterns(patterns: object, what: str = "ignore") -> list[str]:
    """``patterns`` as a list of strings, each a glob or a ``"re:<regex>"`` that compiles;
    anything else is a :class:`ConfigError` naming ``what``."""
    if patterns is None:
        return []
    if isinstance(patterns, str) or not isinstance(patterns, Iterable):
        raise ConfigError(f"{what}: expected a list of glob patterns (e.g. ['lpips.*']) or 're:<regex>' strings, got {patterns!r}")
    out = list(patterns)
    for p in out:
        if not isinstance(p, str) or not p or p == "re:":
            raise ConfigError(f"{what}: expected a list of glob patterns (e.g. ['lpips.*']) or 're:<regex>' strings, got {patterns!r}")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ConfigError(f"{what}: {p!r} is not a valid regular expression ({e})") from None
    return out


def key_matcher(patterns: Sequence[str] | None) -> Callable[[str], bool]:
    """A predicate: does a state-dict key match any of ``patterns`` (globs, or ``"re:<regex>"``
    matched with ``re.fullmatch``)?"""
    globs = [p for p in patterns or () if not p.startswith("re:")]
    regexes = [re.compile(p[3:]) for p in patterns or () if p.startswith("re:")]

    def match(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, g) for g in globs) or any(r.fullmatch(key) for r in regexes)

    return match


def _suggest(keys: Sequence[str]) -> list[str]:
    """Glob patterns covering ``keys`` by their first component (``["lpips.*", ...]``, at most 3)."""
    return sorted({k.split(".")[0] + (".*" if "." in k else "") for k in keys})[:3]


# ---------------------------------------------------------------------- the one report
def _shape(v) -> tuple[int, ...] | None:
    s = getattr(v, "shape", None)
    return tuple(s) if s is not None else None


def key_mismatch_report(
    missing: Sequence[str] = (),
    unexpected: Sequence[str] = (),
    shapes: Sequence[str] = (),
    n_model: int | None = None,
    n_found: int | None = None,
    changed: Sequence[str] = (),
) -> str | None:
    """The one-line report of how a set of weights differs from a model, or None when it fits.

    Args:
        missing: model keys the weights lack.
        unexpected: keys of the weights the model lacks.
        shapes: ``"key (file shape) vs (model shape)"`` entries.
        n_model, n_found: how many keys the model has and how many of them the weights hold
            (``"12 of 13 model keys found"``, shown when keys are missing or unexpected).
        changed: keys whose values differ from what was recorded (checksums).

    Every list is counted and its first entries shown (``"1 missing (e.g. ['decoder.0.weight'])"``).
    """
    if not (missing or unexpected or shapes or changed):
        return None
    parts = []
    if (missing or unexpected) and n_model is not None:
        parts.append(f"{n_found} of {n_model} model keys found")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {sorted(missing)[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})")
    if shapes:
        parts.append(f"{len(shapes)} with other shapes (checkpoint vs model, e.g. {list(shapes)[:2]})")
    if changed:
        parts.append(f"{len(changed)} with other values (e.g. {sorted(changed)[:3]})")
    return "; ".join(parts)


@dataclass(frozen=True)
class KeyMismatch:
    """How a set of weights differs from a model (:func:`compare_state_dicts`); falsy when it fits.

    Attributes:
        n_model: number of model keys; ``n_found``: how many of them the weights hold.
        missing, unexpected: keys (sorted) that count (not ignored; only when strict).
        shapes: ``"key (file) vs (model)"`` for keys present in both with other shapes.
        missing_all: every model key the weights lack, ignored or not (what was left unloaded).
    """

    n_model: int
    n_found: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    shapes: tuple[str, ...] = ()
    missing_all: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def line(self) -> str | None:
        """The one-line report (:func:`key_mismatch_report`), or None when the weights fit."""
        return key_mismatch_report(self.missing, self.unexpected, self.shapes, self.n_model, self.n_found)


def tied_keys(module: torch.nn.Module) -> dict[str, frozenset[str]]:
    """``{key: keys sharing its tensor}`` for the module's state dict (tied weights appear under
    every name that holds them; loading any one of the names fills all of them)."""
    by_id: dict[int, set[str]] = {}
    for k, v in module.state_dict(keep_vars=True).items():
        if isinstance(v, torch.Tensor):
            by_id.setdefault(id(v), set()).add(k)
    return {k: frozenset(g) for g in by_id.values() if len(g) > 1 for k in g}


def compare_state_dicts(
    own: Mapping[str, object],
    loaded: Mapping[str, object],
    ignore: Sequence[str] | None = None,
    strict: bool = True,
    aliases: Mapping[str, Iterable[str]] | None = None,
) -> KeyMismatch:
    """Compare a model's state dict ``own`` with ``loaded`` (values need only ``.shape``).

    Shape differences always count; missing / unexpected keys only if ``strict``. Keys matching
    ``ignore`` (:func:`key_matcher`) never count. ``aliases`` (``{key: tied keys}``) counts a model
    key as present when a key tied to it is.
    """
    match = key_matcher(ignore)
    aliases = aliases or {}

    def present(k: str) -> bool:
        return k in loaded or any(a in loaded for a in aliases.get(k, ()))

    missing_all = tuple(sorted(k for k in own if not present(k)))
    missing = tuple(k for k in missing_all if not match(k)) if strict else ()
    unexpected = tuple(sorted(k for k in loaded if k not in own and not match(k))) if strict else ()
    shapes = tuple(
        f"{k} {_shape(loaded[k])} vs {_shape(own[k])}" for k in sorted(own.keys() & loaded.keys())
        if _shape(loaded[k]) is not None and _shape(own[k]) is not None and _shape(loaded[k]) != _shape(own[k]) and not match(k)
    )
    return KeyMismatch(len(own), sum(1 for k in own if present(k)), missing, unexpected, shapes, missing_all)


def state_dict_mismatch(own: dict, loaded: dict, strict: bool = True, ignore: Sequence[str] = ()) -> str | None:
    """One line describing how ``loaded`` differs from ``own`` (:func:`compare_state_dicts`), or
    None when it fits."""
    return compare_state_dicts(own, loaded, ignore, strict).line()


# ---------------------------------------------------------------------- checkpoint class
def checkpoint_class(ckpt: object) -> str | None:
    """The LightningModule class path a Lightning checkpoint was trained with
    (``hyper_parameters["_class_path"]``, written by LightningCLI), or None when it records none."""
    if not isinstance(ckpt, dict):
        return None
    hp = ckpt.get("hyper_parameters")
    path = hp.get("_class_path") if isinstance(hp, dict) else None
    return path if isinstance(path, str) and path else None


def checkpoint_class_mismatch(ckpt: object, model: torch.nn.Module | type | str) -> str | None:
    """``"this checkpoint is an M3DModule, the config is a GTRModule"`` when the class recorded in
    ``ckpt`` is not ``model``'s (an instance, a class, or a ``class_path`` string), else None.

    Classes are compared by name (the last component of the path) so that a class re-exported
    from another module still matches; the recorded path is never imported (a checkpoint is
    untrusted input).
    """
    recorded = checkpoint_class(ckpt)
    if recorded is None:
        return None
    if isinstance(model, str):
        name = model.rsplit(".", 1)[-1]
    else:
        name = (model if isinstance(model, type) else type(model)).__name__
    got = recorded.rsplit(".", 1)[-1]
    if got == name:
        return None
    return f"this checkpoint is {_article(got)} {got}, the config is {_article(name)} {name}"


def _article(word: str) -> str:
    # An acronym is read letter by letter ("an M3DModule", "a GTRModule"), a word as a word
    # ("a ToyTriplaneModule", "an EncoderModule").
    if len(word) > 1 and (word[1].isupper() or word[1].isdigit()):
        return "an" if word[0].upper() in "AEFHILMNORSX" else "a"
    return "an" if word[:1].lower() in "aeiou" else "a"


# ---------------------------------------------------------------------- loading into a module
def load_weights_into(
    module: torch.nn.Module,
    path: str | Path,
    prefix: str = "",
    strict: bool = True,
    allow_pickle: bool = False,
    ignore: Sequence[str] | None = None,
) -> list[str]:
    """Load weights from ``path`` into ``module``; any mismatch is one :class:`CheckpointError` line.

    Args:
        module: the model to load into.
        path: ``.ckpt`` / ``.pt`` / ``.pth`` (a Lightning checkpoint or a bare state dict) or
            ``.safetensors``. Frozen parts a recon3d checkpoint left out are re-attached from
            their source files first (:func:`attach_frozen_parts`).
        prefix: load only the file's keys under this prefix (stripped).
        strict: every key must match (default). ``False`` only tolerates missing/extra keys and
            still refuses other shapes; prefer ``ignore``, which names what may differ.
        allow_pickle: trust a file that needs pickled code.
        ignore: patterns (:func:`key_matcher`) of keys that may be missing, unexpected or of
            another shape; such keys keep the model's own values (e.g. ``["lpips.*"]`` for a
            frozen loss network that the previous stage did not have).

    Returns exactly the model keys that received no tensor from the file (sorted): keys the
    file lacks and keys ``ignore`` let differ in shape. A key tied to a key that was loaded
    (shared weights) received its tensor and is not listed; keys of the file that the model does
    not have are dropped and not listed either.

    The error names the file, the model class, "this checkpoint is an X, the config is a Y" when
    the checkpoint records another LightningModule class, and the report of
    :func:`key_mismatch_report`, with the option to name the keys that may differ.
    """
    ignore = check_ignore_patterns(ignore, "ignore")
    obj = load_state_dict_file(path, allow_pickle)
    if isinstance(obj, dict) and obj.get(FROZEN_KEY) and isinstance(obj.get("state_dict"), dict):
        attach_frozen_parts(obj, where=str(path), module=module if not prefix else None)
    sd = extract_state_dict(obj, prefix)
    own = module.state_dict()
    aliases = tied_keys(module)
    mm = compare_state_dicts(own, sd, ignore, strict, aliases)
    other_class = checkpoint_class_mismatch(obj, module)
    if mm:
        head = f"{other_class}; " if other_class else ""
        hint = (f"; to load part of it, name the keys that may differ in init_weights_ignore "
                f"(e.g. {_suggest(mm.missing_all or list(sd))})") if not other_class else ""
        raise CheckpointError(f"{path}: weights do not match {type(module).__name__}: {head}{mm.line()}{hint}")
    if other_class:
        log.warning("%s: %s, but its weights fit; loading them", path, other_class)
    fit = {k: v for k, v in sd.items() if k in own and _shape(v) == _shape(own[k])}
    got = set(fit)
    left = sorted(k for k in own if k not in got and not (aliases.get(k, frozenset()) & got))
    # Every check was made above (with ignore and aliases); torch's own strict check knows neither.
    torch.nn.Module.load_state_dict(module, fit, strict=False)
    if left:
        why = f"allowed by ignore patterns {ignore}" if ignore else "strict=False"
        log.info("%s: %d model keys received no tensor and keep their initial values (%s; e.g. %s)", path, len(left), why, left[:3])
    return left


def load_hf_pretrained(cls, path: str | Path, who: str, ignore: Sequence[str] | None = None, **kwargs):
    """``cls.from_pretrained(path, local_files_only=True)`` (a transformers or diffusers model
    class), strictly: transformers and diffusers only log keys the files lack or hold extra and
    leave those weights random; here any such key, or one of another shape, not matching
    ``ignore`` is one :class:`CheckpointError` line (:func:`key_mismatch_report`) naming ``who``
    and the folder. ``kwargs`` go to ``from_pretrained``. Returns the model."""
    ignore = check_ignore_patterns(ignore, f"{who}.pretrained_ignore")
    kwargs = {"local_files_only": True, **kwargs, "output_loading_info": True}
    if getattr(cls, "__module__", "").startswith("transformers"):
        kwargs.setdefault("ignore_mismatched_sizes", True)  # report other shapes here, not as a multi-line error
    try:
        model, info = cls.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise CheckpointError(f"{who}: cannot load weights from {str(path)!r}: {first[:300]}") from None
    match = key_matcher(ignore)
    missing_all = sorted(info.get("missing_keys") or ())
    missing = [k for k in missing_all if not match(k)]
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not match(k))
    shapes = [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in sorted(info.get("mismatched_keys") or ()) if not match(k)]
    n_model = len(model.state_dict())
    problem = key_mismatch_report(missing, unexpected, shapes, n_model, n_model - len(missing_all))
    if problem:
        raise CheckpointError(f"{who}: weights in {str(path)!r} do not match {cls.__name__}: {problem}; "
                              "to load part of them, name the keys that may differ in pretrained_ignore")
    return model


# ---------------------------------------------------------------------- frozen pretrained parts
@dataclass(frozen=True)
class FrozenSource:
    """Where a frozen submodule's weights come from: the file ``path`` (safetensors or a torch
    state dict, absolute) and the ``prefix`` of its keys in that file."""

    path: str
    prefix: str = ""


#: attribute :func:`mark_frozen` sets on a submodule
_MARK = "_recon3d_frozen_source"


def mark_frozen(module: torch.nn.Module, path: str | os.PathLike, prefix: str = "") -> torch.nn.Module:
    """Declare ``module``'s weights as the tensors of ``path`` (under ``prefix``), never trained:
    its parameters stop requiring gradients, and ``ReconModule`` checkpoints leave them out
    (module docstring). Returns ``module``."""
    module.requires_grad_(False)
    object.__setattr__(module, _MARK, FrozenSource(str(Path(path).expanduser().resolve()), prefix))
    return module


def load_frozen(module: torch.nn.Module, path: str | os.PathLike, prefix: str = "", ignore: Sequence[str] | None = None) -> torch.nn.Module:
    """Load ``module`` strictly from ``path`` (:func:`load_weights_into`), then :func:`mark_frozen` it."""
    load_weights_into(module, path, prefix=prefix, ignore=ignore)
    return mark_frozen(module, path, prefix)


def frozen_parts_of(module: torch.nn.Module) -> dict[str, FrozenSource]:
    """``{submodule name: FrozenSource}`` of the submodules of ``module`` marked with
    :func:`mark_frozen` (outermost ones; the root itself is named ``""``)."""
    out: dict[str, FrozenSource] = {}
    for name, sub in module.named_modules():
        src = getattr(sub, _MARK, None)
        if isinstance(src, FrozenSource) and not any(name == p or name.startswith(p + ".") for p in out if p) and "" not in out:
            out[name] = src
    return out


def _digest(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_source(src: FrozenSource, where: str, name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``src`` under its prefix (prefix stripped)."""
    if not Path(src.path).is_file():
        raise CheckpointError(
            f"{where}: frozen part {name!r} is not stored in the checkpoint but re-attached from {src.path}, which does not "
            "exist; put the weight file back at that path (or load the part from its new path and save the checkpoint again)"
        )
    obj = load_state_dict_file(src.path)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    return {k[len(src.prefix):]: v for k, v in sd.items() if isinstance(k, str) and k.startswith(src.prefix) and isinstance(v, torch.Tensor)}


#: ``(path, size, mtime_ns, prefix) -> {key: (shape, dtype, sha256)}``: a source is hashed once per process
_SOURCE_DIGESTS: dict[tuple, dict[str, tuple[list[int], str, str]]] = {}


def _source_digests(src: FrozenSource, name: str) -> dict[str, tuple[list[int], str, str]]:
    try:
        st = os.stat(src.path)
    except OSError:
        st = None
    key = (src.path, st.st_size, st.st_mtime_ns, src.prefix) if st else None
    if key is not None and key in _SOURCE_DIGESTS:
        return _SOURCE_DIGESTS[key]
    tensors = _read_source(src, "frozen part source", name)
    out = {k: (list(v.shape), str(v.dtype), _digest(v)) for k, v in tensors.items()}
    if key is not None:
        _SOURCE_DIGESTS[key] = out
    return out


def strip_frozen_parts(checkpoint: dict, parts: Mapping[str, FrozenSource | str | os.PathLike]) -> dict[str, int]:
    """Drop the tensors of frozen ``parts`` (``{submodule name: source}``) from
    ``checkpoint["state_dict"]`` and record them under ``checkpoint[FROZEN_KEY]``.

    A tensor of a part is dropped when the source holds a byte-identical one (same SHA-256 of
    dtype, shape and bytes), under the same key or another: a library may name a tensor in its
    files differently from its module (transformers 5 does), and an identical tensor restores
    the same values whatever its name. The manifest records, per dropped key, the source key,
    shape, dtype and checksum. Tensors the source does not hold stay in the checkpoint.
    Returns ``{part: tensors dropped}``.
    """
    sd = checkpoint.get("state_dict")
    if not isinstance(sd, dict) or not parts:
        return {}
    record = dict(checkpoint.get(FROZEN_KEY) or {})
    dropped_counts = {}
    for name, src in parts.items():
        src = src if isinstance(src, FrozenSource) else FrozenSource(str(Path(src).expanduser().resolve()))
        pre = f"{name}." if name else ""
        try:
            digests = _source_digests(src, name)
        except CheckpointError as e:  # never lose weights at save time: keep them, say why
            log.warning("frozen part %r kept in the checkpoint: its source cannot be read (%s)", name, e)
            continue
        by_digest: dict[str, str] = {}
        for key, (_, _, digest) in sorted(digests.items()):
            by_digest.setdefault(digest, key)
        manifest, kept = {}, []
        for full in [k for k, v in sd.items() if k.startswith(pre) and isinstance(v, torch.Tensor)]:
            key, t = full[len(pre):], sd[full]
            digest = _digest(t)
            same_name = digests.get(key)
            src_key = key if same_name is not None and same_name[2] == digest else by_digest.get(digest)
            if src_key is None:
                kept.append(key)
                continue
            manifest[key] = {"key": src_key, "shape": list(t.shape), "dtype": str(t.dtype), "sha256": digest}
            del sd[full]
        if kept:
            log.warning("frozen part %r: %d tensors are not in %s (trained, statistics updated, or not from that file); "
                        "kept in the checkpoint (e.g. %s)", name, len(kept), src.path, sorted(kept)[:3])
        if manifest:
            record[name] = {"source": src.path, "prefix": src.prefix, "tensors": manifest}
        dropped_counts[name] = len(manifest)
    if record:
        checkpoint[FROZEN_KEY] = record
    return dropped_counts


def _frozen_record(checkpoint: dict, where: str) -> dict:
    record = checkpoint.get(FROZEN_KEY) or {}
    if not isinstance(record, dict) or not all(
        isinstance(r, dict) and isinstance(r.get("source"), str) and isinstance(r.get("tensors"), dict) for r in record.values()
    ):
        raise CheckpointError(f"{where}: malformed '{FROZEN_KEY}' entry (expected {{part: {{source, prefix, tensors}}}})")
    return record


def _held_by(module: torch.nn.Module | None, name: str, manifest: Mapping[str, Mapping]) -> dict[str, torch.Tensor] | None:
    """The part's tensors as ``module`` holds them now, if they are exactly the recorded ones
    (every key, same checksums), else None."""
    if module is None:
        return None
    try:
        own = module.get_submodule(name).state_dict() if name else module.state_dict()
    except AttributeError:
        return None
    if not all(isinstance(own.get(k), torch.Tensor) and _digest(own[k]) == m.get("sha256") for k, m in manifest.items()):
        return None
    return {k: own[k].detach() for k in manifest}


def attach_frozen_parts(checkpoint: dict, where: str = "checkpoint", module: torch.nn.Module | None = None) -> list[str]:
    """Put the tensors :func:`strip_frozen_parts` left out back into ``checkpoint["state_dict"]``;
    returns the parts attached (idempotent: parts already present are skipped).

    A part comes from ``module`` (the model about to be loaded) when it already holds exactly
    the recorded tensors (it was built from its own copy of the source, as an LPIPS network or a
    frozen encoder is), else from the recorded source file. Raises one :class:`CheckpointError`
    line naming the source file when it is needed and missing, lacks keys, or holds other
    shapes/dtypes or values (checksums) than the checkpoint recorded.
    """
    record = _frozen_record(checkpoint, where)
    sd = checkpoint.setdefault("state_dict", {})
    done = []
    for name, rec in record.items():
        pre = f"{name}." if name else ""
        manifest = rec["tensors"]
        if all(pre + k in sd for k in manifest):
            continue
        held = _held_by(module, name, manifest)
        if held is not None:
            sd.update({pre + k: v for k, v in held.items()})
            done.append(name)
            continue
        src = FrozenSource(rec["source"], str(rec.get("prefix") or ""))
        got = _read_source(src, where, name)
        want = {m.get("key", k): m for k, m in manifest.items()}  # source key -> its record
        missing = sorted(k for k in want if k not in got)
        shapes = [f"{k} {tuple(got[k].shape)} {got[k].dtype} vs {tuple(m['shape'])} {m['dtype']}" for k, m in want.items()
                  if k in got and (list(got[k].shape) != list(m["shape"]) or str(got[k].dtype) != m["dtype"])]
        bad = {s.split(" ", 1)[0] for s in shapes}
        changed = sorted(k for k, m in want.items() if k in got and k not in bad and _digest(got[k]) != m.get("sha256"))
        problem = key_mismatch_report(missing, (), shapes, len(want), len(want) - len(missing), changed)
        if problem:
            raise CheckpointError(f"{where}: frozen part {name!r}: {src.path} does not hold the tensors this checkpoint was saved with: {problem}")
        for k, m in manifest.items():
            sd[pre + k] = got[m.get("key", k)]
        done.append(name)
    return done


def checkpoint_state_dict(checkpoint: dict, where: str = "checkpoint", load_frozen_parts: bool = False) -> dict:
    """``checkpoint["state_dict"]`` including its frozen parts: read from their sources with
    ``load_frozen_parts`` (:func:`attach_frozen_parts`), else as shape-only ``meta`` tensors from the
    manifest (enough to compare keys and shapes before the real load)."""
    sd = dict(checkpoint.get("state_dict", {}) or {})
    if load_frozen_parts:
        attach_frozen_parts(checkpoint, where)
        return dict(checkpoint.get("state_dict", {}))
    for name, rec in _frozen_record(checkpoint, where).items():
        pre = f"{name}." if name else ""
        for k, m in rec["tensors"].items():
            sd.setdefault(pre + k, torch.empty(m["shape"], device="meta"))
    return sd
