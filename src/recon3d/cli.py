"""The ``recon3d`` command line.

``recon3d fit|validate|test|predict`` are LightningCLI subcommands (:class:`Recon3DCLI`): configs
compose with ``-c base.yaml -c override.yaml``, any part is swapped by ``class_path``, and
``--print_config`` shows the resolved config. Other subcommands (``demo``, ``data``, ``export``,
``bench``, ``compare``) are plain argparse programs in :mod:`recon3d.commands`, one module each; add one by
adding a module there and a line to :data:`EXTRA_COMMANDS` and :data:`COMMAND_HELP`.

Start-up: ``recon3d --help``, ``recon3d <command> --help`` and the non-Lightning subcommands do not
import Lightning (or torch, for the help texts); only a Lightning subcommand that runs does.
``recon3d fit --help`` is recon3d's short option list; ``--help-all`` is LightningCLI's full one.

Errors: every mistake a user can make at the command line ends in one line,
``recon3d: error: <message>``, exit status 2, no traceback (:func:`main`): recon3d's own errors
(:class:`recon3d.errors.Recon3DError`, also when jsonargparse wraps a constructor's error in its
"Does not validate against any of the Union subtypes" report: the innermost one is printed),
config parse errors, Lightning's ``MisconfigurationException`` (``--trainer.accelerator gpu``
without a GPU, ``--trainer.max_steps -5``), and a full disk, a read-only or forbidden output
folder (``OSError`` ENOSPC/EDQUOT/EROFS/EACCES/EPERM/ENOTDIR/EISDIR). A run folder this command
created and left without anything but its ``config.yaml`` is removed again. A negative number after
an option (``--model.init_args.lr -1e-3``) is that option's value, not an option.

Output: Lightning's litlogger/litmodels tips, torch's ``LeafSpec`` deprecation warning, "Found N
module(s) in eval mode", under DDP Lightning's ``sync_dist`` advice (the evaluator has reduced its
metrics already) and its all_gather deprecation, and the Hugging Face hub/transformers progress bars are silenced;
``--verbose`` (any subcommand) shows them.

Run folders (``fit``/``validate``/``test``/``predict``): a run has one stable folder,
``<save_dir>/<name>/<version>`` of the CSV/TensorBoard logger, where ``version`` defaults to the
config files' names joined by ``+`` (``-c configs/m3d.yaml -c configs/m3d/exp1.yaml`` →
``m3d+exp1``) instead of Lightning's next free ``version_N``; ``--run_dir DIR`` names it
directly. ``--ckpt_path last`` is ``<run folder>/checkpoints/last.ckpt`` (or the ``dirpath`` of the
config's ``ModelCheckpoint``); when there is none the command stops with one line, unless
``fit --fresh_if_missing true`` asks to start the run from step 0 then (job scripts that use one
command for the first start and every requeue). A fresh ``fit`` refuses a run folder that already
holds checkpoints (resume it with ``--ckpt_path last`` or pick another ``--run_dir``). The run's
``metrics.csv`` keeps its earlier rows when a run resumes or is evaluated again in its folder
(:mod:`recon3d.utils.run_log`).

Checkpoint vs command line (every subcommand, and ``recon3d export --ckpt``): a checkpoint's
model hyper-parameters define the trained model and win over the config, except the *run-time
options* the module class declares in ``RUNTIME_OPTIONS`` (evaluation, export and rendering
settings such as ``mesh_density_level``, ``export_resolution``, ``refine``, ``eval_chunk``; see
:class:`recon3d.methods.base.ReconModule`), where the command line (config files and flags) wins.
Every checkpoint value that differs from the command line's is printed on one ``recon3d:`` line.
To start a *new* stage from an earlier checkpoint, pass the weights with
``--model.init_args.init_weights PATH`` (weights only) instead. Run-control settings (steps,
devices, callbacks, logging) live in ``trainer``, never in the model's hyper-parameters, so they
always come from the command line.

The datamodule is a part like the model (``subclass_mode_data``): ``data:`` takes
``class_path`` + ``init_args`` naming a subclass of :class:`~recon3d.data.datamodule.ReconDataModule`
(a method's own sampling or batching), and a ``data:`` block without ``class_path`` (every config
under ``configs/``) is ``ReconDataModule``'s init_args, as before. Keys are given with or without
``init_args`` (``--data.batch_size 4`` or ``--data.init_args.batch_size 4``); ``--print_config``
and the saved ``config.yaml`` show the resolved form, ``data: {class_path: ..., init_args: {...}}``.
A new datamodule class starts from its own defaults (the rule below), so give its ``dataset``
after its ``class_path``.

Changing a part's class (``class_path`` in a later ``-c`` file or on the command line, e.g.
``--data.dataset.class_path recon3d.data.formats.BlenderDataset``) starts that part from the new
class's defaults: the init_args given for the previous class are dropped, also those the new class
happens to accept. jsonargparse alone keeps every init_arg the new class accepts (its documented
rule, jsonargparse #460 / Lightning #15796), so a synthetic set's ``num_surface_points: 2048``
would silently reach a 3D-FRONT dataset. Give init_args after the class_path that they belong to.

Reliability defaults (:mod:`recon3d.utils.ckpt_io`): checkpoints are written atomically
(:class:`~recon3d.utils.ckpt_io.AtomicCheckpointIO`, unless the config names another
``CheckpointIO`` plugin) and read weights-only; a checkpoint that needs pickled code is refused
unless ``--allow_pickle true`` is given; every rank's RNG state travels in the checkpoint
(:class:`~recon3d.utils.ckpt_io.RNGStateCallback`).
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import importlib
import logging
import os
import re
import sys
import warnings
from pathlib import Path

#: ``recon3d <name>`` → module in ``recon3d.commands`` with a ``main(argv) -> int``.
EXTRA_COMMANDS = {
    "demo": "recon3d.commands.demo",
    "data": "recon3d.commands.data",
    "export": "recon3d.commands.export",
    "bench": "recon3d.commands.bench",
    "compare": "recon3d.commands.compare",
}

#: The LightningCLI subcommands recon3d exposes.
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

#: One line per subcommand for ``recon3d --help`` (kept here, not read from the modules, so the
#: help imports nothing).
COMMAND_HELP = {
    "fit": "train a model; resume an interrupted run with --ckpt_path last",
    "validate": "evaluate a checkpoint on the validation objects",
    "test": "evaluate a checkpoint on the held-out objects (test/metrics.csv, per_object.csv)",
    "predict": "reconstruct the held-out objects with a checkpoint: meshes and turntables",
    "demo": "train, evaluate and export GTR on the embedded synthetic data, end to end on a CPU",
    "data": "prepare data: synthetic objects, format conversion, depth-prior caches, evaluation sets rendered from meshes",
    "export": "reconstruct objects from posed views with a checkpoint: meshes (.glb/.obj), turntables",
    "bench": "run the speed/memory benchmarks (make bench); results to benchmarks/results/<date>-<commit>.json, --compare FILE",
    "compare": "train/evaluate several configs on one budget and protocol: results table, plots, image grid",
}

_CKPT_HELP = {
    "fit": "resume from a checkpoint file, or `last`: this run's checkpoints/last.ckpt",
    "validate": "the checkpoint to evaluate, or `last`: this run's checkpoints/last.ckpt",
}
_CKPT_HELP["test"] = _CKPT_HELP["predict"] = _CKPT_HELP["validate"]


def top_help() -> str:
    """``recon3d --help``: every subcommand with one line."""
    from recon3d import __version__

    width = max(map(len, COMMAND_HELP)) + 2
    lines = [
        "usage: recon3d <command> [options]   (recon3d <command> --help: that command's options)",
        "",
        f"Train, evaluate and export 3D reconstruction models on one Lightning stack (recon3d {__version__}).",
        "",
        "commands:",
        *(f"  {name:<{width}}{text}" for name, text in COMMAND_HELP.items()),
        "",
        "options:",
        "  -h, --help   this list",
        "  --version    the version",
        "  --verbose    (any command) also show Lightning's tips, library warnings and progress bars of downloads",
    ]
    return "\n".join(lines)


def lightning_help(command: str) -> str:
    """``recon3d <fit|validate|test|predict> --help``: recon3d's options, without importing Lightning."""
    opts = [
        ("-c, --config FILE", "a config file; several compose left to right"),
        ("--KEY VALUE", "any config key, e.g. --trainer.max_steps 100, --model.init_args.lr 1e-4,"),
        ("", "--data.dataset.class_path recon3d.data.formats.BlenderDataset,"),
        ("", "--data.class_path my.DataModule (another datamodule; then its init_args)"),
        ("--print_config", "print the resolved config (every key and its value) and exit"),
        ("--ckpt_path PATH|last", _CKPT_HELP[command]),
    ]
    if command == "fit":
        opts.append(("--fresh_if_missing BOOL", "with --ckpt_path last: start from step 0 when the run has no checkpoint yet"))
    opts += [
        ("--run_dir DIR", "this run's folder (logs, checkpoints, config.yaml); default"),
        ("", "<logger save_dir>/<name>/<config file names joined by +>"),
        ("--allow_pickle BOOL", "read a checkpoint that needs pickled code (only files you trust)"),
        ("--seed_everything INT", "the global seed"),
        ("--verbose", "also show Lightning's tips and library warnings"),
        ("--help-all", "LightningCLI's full list: every key with its type and default (slow: imports Lightning)"),
    ]
    width = max(len(o) for o, _ in opts) + 2
    lines = [
        f"usage: recon3d {command} -c CONFIG.yaml [-c MORE.yaml ...] [--KEY VALUE ...]",
        "",
        f"{COMMAND_HELP[command][0].upper()}{COMMAND_HELP[command][1:]} (LightningCLI `{command}`).",
        "",
        "options:",
        *(f"  {o:<{width}}{t}" for o, t in opts),
        "",
        "A checkpoint defines the trained model; its run-time options (evaluation, export, rendering)",
        "come from this command line (`recon3d --help` lists the other commands).",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- argv and output policy
_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def join_negative_numbers(argv: list[str]) -> list[str]:
    """``--key -1e-3`` → ``--key=-1e-3``.

    argparse takes a token that starts with ``-`` for an option unless it matches its own
    negative-number pattern (``-5``, ``-0.5``), so ``--model.init_args.lr -1e-3`` failed with
    "argument --model: expected one argument". A negative number (with exponent, ``-inf``,
    ``-nan``) right after a ``--long`` option without ``=`` is that option's value.
    """
    out: list[str] = []
    for tok in argv:
        prev = out[-1] if out else ""
        if _NUMBER.match(tok) and prev.startswith("--") and "=" not in prev and len(prev) > 2:
            out[-1] = f"{prev}={tok}"
        else:
            out.append(tok)
    return out


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("💡 Tip:") and ("litlogger" in msg or "litmodels" in msg))


#: Warnings silenced unless ``--verbose`` (message regex, category name).
QUIET_WARNINGS = (
    (r".*isinstance\(treespec, LeafSpec\).*is deprecated", FutureWarning),
    (r"Found \d+ module\(s\) in eval mode", None),
    # Under DDP: recon3d's evaluator reduces its metrics across processes before they are logged
    # (recon3d.metrics.protocol), so every rank logs the same epoch values without sync_dist.
    (r"It is recommended to use `self\.log\(.*sync_dist=True\)`", None),
    # Lightning's own all_gather (the non-finite-step vote) calls a torch API deprecated in 2.13.
    (r"torch\.distributed\.nn\.functional\.all_gather is deprecated", None),
)


@contextlib.contextmanager
def output_policy(verbose: bool):
    """While active, the noise listed in the module docstring is silenced unless ``verbose``."""
    if verbose:
        yield
        return
    # The hub/transformers progress bars read this when huggingface_hub is imported; if it
    # already is (an in-process caller), switch them off directly. DDP ranks that Lightning starts
    # inherit the variable; an in-process caller gets its previous state back.
    hf_env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hub = sys.modules.get("huggingface_hub")
    hub_was_off = None
    if hub is not None:
        with contextlib.suppress(Exception):
            hub_was_off = hub.utils.are_progress_bars_disabled()
            hub.utils.disable_progress_bars()
    tips = _DropLightningTips()
    rank_zero_logs = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                                                      "pytorch_lightning.utilities.rank_zero")]
    for lg in rank_zero_logs:
        lg.addFilter(tips)
    with warnings.catch_warnings():
        for message, category in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message, **({"category": category} if category else {}))
        try:
            yield
        finally:
            for lg in rank_zero_logs:
                lg.removeFilter(tips)
            if hf_env is None:
                os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
            hub = sys.modules.get("huggingface_hub")
            # Only a hub imported before (bars on) is switched back: one imported inside read the
            # variable at import and would warn that it overrides enable_progress_bars().
            if hub is not None and hub_was_off is False and hf_env is None:
                with contextlib.suppress(Exception):
                    hub.utils.enable_progress_bars()


# ---------------------------------------------------------------------- errors
def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


_OS_REASONS = {
    errno.ENOSPC: ("no space left on device", "free space there or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or write elsewhere"),
    errno.EROFS: ("read-only file system", "choose a writable folder"),
    errno.EACCES: ("permission denied", "choose a folder you can write to"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to"),
    errno.ENOTDIR: ("a part of this path is a file, expected a folder", "choose another folder"),
    errno.EISDIR: ("is a folder, expected a file", "choose another path"),
}


def _os_error_line(e: OSError) -> str | None:
    if e.errno == errno.EEXIST and e.filename and Path(e.filename).exists() and not Path(e.filename).is_dir():
        return f"{e.filename}: is a file, expected a folder; choose another output folder"
    if e.errno not in _OS_REASONS:
        return None
    reason, hint = _OS_REASONS[e.errno]
    # A failed write()/close() carries no file name: name the run folder then.
    where = str(e.filename or (f"a file in {_RUN_FOLDERS[-1][0]}" if _RUN_FOLDERS else "an output file"))
    # An atomic write fails on its hidden temporary file (recon3d.utils.io.atomic_path:
    # .<name>.<8 random chars><suffix>, e.g. .last.ckpt.k2x9_q0a.tmp): name the target.
    m = re.match(r"^\.(.+)\.[a-z0-9_]{8}(?:\.[^.]+)?$", Path(where).name)
    if m:
        where = str(Path(where).with_name(m.group(1)))
    return f"cannot write {where}: {reason}; {hint} (--run_dir / --trainer.logger.init_args.save_dir / --out)"


def error_line(e: BaseException) -> str | None:
    """The one-line message for a user mistake ``e`` (module docstring), or None for a bug."""
    from recon3d.errors import Recon3DError

    chain = list(_chain(e))
    ours = [x for x in chain if isinstance(x, Recon3DError)]
    if ours:
        return _one_line(ours[-1])  # the innermost: the constructor's own words
    for x in chain:
        name = type(x).__name__
        if name == "ArgumentError" and type(x).__module__.startswith(("jsonargparse", "argparse")):
            return f"config: {_config_error_line(x)}"
        if name == "MisconfigurationException":
            text = _one_line(x)
            if "gpu" in text.lower() and ("backend" in text.lower() or "available" in text.lower()):
                text += " (--trainer.accelerator gpu/cuda, but torch sees no CUDA GPU here; use cpu or auto)"
            return f"trainer: {text}"
    for x in chain:
        if isinstance(x, OSError):
            line = _os_error_line(x)
            if line:
                return line
    return None


def _one_line(e: BaseException) -> str:
    """A parser/config error condensed to one line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = " ".join(lines[:4]) if lines else type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."


_NOISE = ("Does not validate against any of the Union", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>",
          "Given value type:", "Given value:")


def _config_error_line(e: BaseException) -> str:
    """A jsonargparse error (nested union explanations over many lines) as one line that keeps
    the key, the class and the reason."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    keep = [ln[2:] if ln.startswith("- ") else ln for ln in lines if not ln.startswith(_NOISE)]
    text = " ".join(keep) if keep else type(e).__name__
    # A plain `data:` block is ReconDataModule's init_args (subclass_mode_data): name the key the
    # user wrote (data.batch_size), not the class_path they never gave.
    text = _IMPLICIT_DATA.sub(r'Parser key "data.\1"', text)
    return text if len(text) <= 400 else text[:397] + "..."


_IMPLICIT_DATA = re.compile(r'Parser key "data": Problem with given class_path \'recon3d\.data\.datamodule\.ReconDataModule\':\s*Parser key "([^"]+)"')


# ---------------------------------------------------------------------- run folders
#: Run folders a Lightning subcommand of this process set up: ``(folder, first ancestor it created)``.
_RUN_FOLDERS: list[tuple[Path, Path | None]] = []
_BOILERPLATE = {"config.yaml", "hparams.yaml"}


def _first_missing(path: Path) -> Path | None:
    """The highest ancestor of ``path`` (or ``path``) that does not exist yet, None if it exists."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


def remove_empty_run_folders() -> None:
    """After a failed command: remove the run folders it created that hold nothing of value
    (only ``config.yaml`` / ``hparams.yaml`` / empty folders), and the empty parents it created."""
    while _RUN_FOLDERS:
        folder, created = _RUN_FOLDERS.pop()
        if created is None:
            continue
        with contextlib.suppress(OSError):
            if folder.is_dir():
                files = [p for p in folder.rglob("*") if not p.is_dir()]
                if any(p.name not in _BOILERPLATE or p.parent != folder for p in files):
                    continue
                for p in files:
                    p.unlink()
                for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                    d.rmdir()
            # the folder and the parents this command created, while empty
            for p in [folder, *folder.parents]:
                if p.is_dir():
                    if any(p.iterdir()):
                        break
                    p.rmdir()
                if p == created:
                    break


_VERSIONED_LOGGERS = ("CSVLogger", "TensorBoardLogger")


def default_version(config_files) -> str:
    """A run's default folder name: the config files' stems joined by ``+`` (``run`` without any)."""
    stems = [re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(c)).stem) for c in (config_files or [])]
    return "+".join(s for s in stems if s) or "run"


def _lightning_cli_class():
    from jsonargparse import Namespace, set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    from recon3d.data.datamodule import ReconDataModule
    from recon3d.errors import CheckpointError, ConfigError
    from recon3d.methods.base import ReconModule

    set_parsing_settings(docstring_parse_attribute_docstrings=True)

    class Recon3DCLI(LightningCLI):
        """LightningCLI over :class:`~recon3d.methods.base.ReconModule` subclasses and the shared
        :class:`~recon3d.data.datamodule.ReconDataModule`.

        ``hparams_from`` (programs such as ``recon3d export``, which build the CLI with
        ``run=False``): a checkpoint whose model hyper-parameters are applied to the parsed config
        by the same rule as ``--ckpt_path`` (module docstring).
        """

        def __init__(self, *args, hparams_from: str | None = None, hparams_allow_pickle: bool = False, **kwargs):
            self._hparams_from = hparams_from
            self._hparams_allow_pickle = hparams_allow_pickle
            kwargs.setdefault("model_class", ReconModule)
            kwargs.setdefault("subclass_mode_model", True)
            kwargs.setdefault("datamodule_class", ReconDataModule)
            # `data:` swappable by class_path like `model:`; a block without class_path (every
            # config in configs/) still means ReconDataModule (module docstring).
            kwargs.setdefault("subclass_mode_data", True)
            kwargs.setdefault("save_config_kwargs", {"overwrite": True})
            kwargs.setdefault("auto_configure_optimizers", False)
            kwargs.setdefault(
                "trainer_defaults",
                {
                    "default_root_dir": "outputs",
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "outputs"}},
                },
            )
            super().__init__(*args, **kwargs)

        def init_parser(self, **kwargs):
            # Raise parse errors (caught by main() and printed as one line) instead of exiting
            # with a usage dump; applies to the main parser and every subcommand parser.
            kwargs.setdefault("exit_on_error", False)
            return super().init_parser(**kwargs)

        def parse_arguments(self, parser, args) -> None:
            with class_change_resets_init_args():
                super().parse_arguments(parser, args)

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument(
                "--allow_pickle", type=bool, default=False,
                help="Read checkpoints with full unpickling, which runs code stored in the file. Only for files "
                "from a source you trust; by default checkpoints are read weights-only and such files are refused.",
            )
            parser.add_argument(
                "--run_dir", type=str | None, default=None,
                help="This run's folder (logs, checkpoints/, config.yaml). Default: <logger save_dir>/<name>/<version>, "
                "version defaulting to the config files' names joined by '+'.",
            )
            parser.add_argument(
                "--fresh_if_missing", type=bool, default=False,
                help="fit with --ckpt_path last: start the run from step 0 when its folder has no last.ckpt yet "
                "(default: stop with an error).",
            )

        # ------------------------------------------------------------------ config helpers
        def _node(self):
            """The parsed config of the running subcommand (the root config when ``run=False``)."""
            name = self.config.get("subcommand")
            return self.config[name] if name else self.config

        def _allow_pickle(self) -> bool:
            return bool(self._node().get("allow_pickle", False)) or self._hparams_allow_pickle

        def _logger_spec(self, node):
            lg = node.trainer.get("logger")
            if isinstance(lg, list):
                lg = lg[0] if lg else None
            if isinstance(lg, Namespace) and str(lg.get("class_path", "")).rsplit(".", 1)[-1] in _VERSIONED_LOGGERS:
                return lg
            return None

        def _run_folder(self, node) -> tuple[Path, Path]:
            """``(run folder, checkpoint folder)`` by Lightning's rules (ModelCheckpoint dirpath, else
            the first logger's save_dir/name/version/checkpoints, else default_root_dir/checkpoints)."""
            lg = self._logger_spec(node)
            root = Path(str(node.trainer.get("default_root_dir") or "."))
            if lg is not None:
                a = lg.init_args
                version = a.get("version")
                version = version if isinstance(version, str) else f"version_{version}"
                folder = Path(str(a.get("save_dir") or root)) / str(a.get("name") or "") / version
            else:
                folder = root
            ckpt_dir = folder / "checkpoints"
            for cb in node.trainer.get("callbacks") or []:
                if isinstance(cb, Namespace) and str(cb.get("class_path", "")).endswith("ModelCheckpoint"):
                    if cb.get("init_args") and cb.init_args.get("dirpath"):
                        ckpt_dir = Path(str(cb.init_args.dirpath))
            return folder, ckpt_dir

        def _setup_run_folder(self, node, subcommand: str) -> None:
            """Stable run folder, ``--ckpt_path last`` and the fresh-fit guard (module docstring)."""
            lg = self._logger_spec(node)
            run_dir = node.get("run_dir")
            if run_dir:
                run_dir = Path(str(run_dir))
                if run_dir.exists() and not run_dir.is_dir():
                    raise ConfigError(f"--run_dir {run_dir}: is a file, expected a folder")
                node.trainer.default_root_dir = str(run_dir)
                if lg is not None:
                    lg.init_args.save_dir, lg.init_args.name, lg.init_args.version = str(run_dir.parent), "", run_dir.name
            elif lg is not None and lg.init_args.get("version") is None:
                lg.init_args.version = default_version(node.get("config"))
            folder, ckpt_dir = self._run_folder(node)
            if folder.exists() and not folder.is_dir():
                raise ConfigError(f"run folder {folder}: is a file, expected a folder (--run_dir)")
            _RUN_FOLDERS.append((folder, _first_missing(folder)))
            ckpt_path = node.get("ckpt_path")
            if ckpt_path == "last":
                last = ckpt_dir / "last.ckpt"
                if last.is_file():
                    node.ckpt_path = str(last)
                    _note(f"--ckpt_path last: {last}")
                elif subcommand == "fit" and node.get("fresh_if_missing"):
                    node.ckpt_path = None
                    _note(f"--ckpt_path last: no checkpoint in {ckpt_dir} yet; starting this run from step 0 (--fresh_if_missing)")
                else:
                    others = sorted(p.parent.parent.name for p in folder.parent.glob("*/checkpoints/last.ckpt")
                                    if p.parent.parent != folder)
                    hint = f"; runs beside it with a last.ckpt: {', '.join(others[:3])}" if others else ""
                    fresh = "; --fresh_if_missing true starts it from step 0" if subcommand == "fit" else ""
                    raise CheckpointError(
                        f"--ckpt_path last: {last} does not exist (this run has no checkpoint yet); give a checkpoint "
                        f"file or the run's folder (--run_dir){fresh}{hint}"
                    )
            elif subcommand == "fit" and not ckpt_path and ckpt_dir.is_dir():
                held = sorted(p.name for p in ckpt_dir.glob("*.ckpt"))
                if held:
                    raise ConfigError(
                        f"run folder {folder} already holds a run ({', '.join(held[:3])} in {ckpt_dir}); resume it with "
                        "--ckpt_path last, start another with --run_dir DIR, or delete the folder"
                    )

        # ------------------------------------------------------------------ checkpoint vs config
        def _parse_ckpt_path(self) -> None:
            # Lightning reads the checkpoint's hyper-parameters here with a bare torch.load; read it
            # through recon3d's safe loader instead (one-line errors, pickle refused unless allowed),
            # and keep the command line's run-time options (module docstring).
            subcommand = self.config.get("subcommand")
            if not subcommand:
                if self._hparams_from:
                    self._apply_checkpoint_hparams(self.config, self._hparams_from, "--ckpt")
                return
            node = self.config[subcommand]
            self._setup_run_folder(node, subcommand)
            ckpt_path = node.get("ckpt_path")
            if not ckpt_path or ckpt_path in ("best", "hpc", "registry") or str(ckpt_path).startswith(("s3://", "gs://", "http")):
                return
            if not Path(ckpt_path).is_file():
                raise CheckpointError(f"--ckpt_path {ckpt_path}: checkpoint file not found")
            self._apply_checkpoint_hparams(node, ckpt_path, "--ckpt_path")

        def _apply_checkpoint_hparams(self, node, ckpt_path: str, flag: str) -> None:
            from recon3d.utils.checkpoint import checkpoint_class_mismatch, load_state_dict_file

            ckpt = load_state_dict_file(ckpt_path, allow_pickle=self._allow_pickle())
            if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
                if flag == "--ckpt":  # recon3d export also takes bare weights
                    return
                raise CheckpointError(
                    f"{ckpt_path}: not a Lightning training checkpoint (no 'state_dict'); to start from bare weights "
                    "use --model.init_weights instead of --ckpt_path"
                )
            hparams = dict(ckpt.get("hyper_parameters", {}) or {})
            hparams.pop("_instantiator", None)
            if not hparams:
                return
            given = node.model
            if checkpoint_class_mismatch(ckpt, str(given.class_path)):
                # Another method's checkpoint: its options do not belong to this config's class; the
                # weight check names the mismatch ("this checkpoint is an M3DModule, ...").
                return
            before = given.clone().init_args if given.get("init_args") is not None else Namespace()
            if "_class_path" in hparams:
                hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
            root = {self.config.subcommand: {"model": hparams}} if self.config.get("subcommand") else {"model": hparams}
            try:
                self.config = self.parser.parse_object(root, self.config)
            except Exception as e:
                raise CheckpointError(f"{ckpt_path}: its model hyper-parameters do not fit this config ({_one_line(e)})") from None
            model = self._node().model
            runtime = runtime_options(model.class_path)
            from_ckpt = []
            for key in sorted(vars(model.init_args) if model.get("init_args") is not None else []):
                old, new = before.get(key), model.init_args.get(key)
                if key in runtime:
                    if key in before:
                        model.init_args[key] = old
                elif old != new:
                    from_ckpt.append(f"{key}={_short(new)} (command line: {_short(old)})")
            if from_ckpt:
                _note(f"{flag} {ckpt_path}: model options from the checkpoint (they define the trained model; run-time "
                      f"options come from the command line): {', '.join(from_ckpt)}")

        def _check_ckpt_matches_model(self) -> None:
            # Lightning would fail deep inside load_state_dict with a multi-line RuntimeError.
            sub = self.config.get(str(self.subcommand), {})
            ckpt_path = sub.get("ckpt_path") if hasattr(sub, "get") else None
            if not ckpt_path or not Path(ckpt_path).is_file() or self.model is None:
                return
            from recon3d.utils import checkpoint as ck

            ckpt = ck.load_state_dict_file(ckpt_path, allow_pickle=self._allow_pickle())
            # frozen pretrained parts left out of the file count with their recorded shapes
            sd = ck.checkpoint_state_dict(ckpt, str(ckpt_path)) if isinstance(ckpt, dict) else {}
            own = self.model.state_dict()
            if not own:  # built lazily (configure_model): Lightning checks after setup
                return
            problem = ck.state_dict_mismatch(own, sd)
            if problem:
                other = ck.checkpoint_class_mismatch(ckpt, self.model)
                problem = f"{other}; {problem}" if other else problem
                raise CheckpointError(f"{ckpt_path}: weights do not match {type(self.model).__name__}: {problem}")

        def before_fit(self) -> None:
            self._check_ckpt_matches_model()

        before_validate = before_test = before_predict = before_fit

        def instantiate_trainer(self, **kwargs):
            from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
            from lightning.pytorch.callbacks import ProgressBar

            from recon3d.utils.ckpt_io import AtomicCheckpointIO, RNGStateCallback
            from recon3d.utils.progress import Recon3DProgressBar
            from recon3d.utils.run_log import MetricsHistory, keep_history

            cfg = self._get(self.config_init, "trainer", default={}) or {}
            plugins = cfg.get("plugins") or []
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            allow = self._allow_pickle()
            ios = [p for p in plugins if isinstance(p, CheckpointIO)]
            if not ios:
                plugins.append(AtomicCheckpointIO(allow_pickle=allow))
            for p in ios:
                if isinstance(p, AtomicCheckpointIO):
                    p.allow_pickle = p.allow_pickle or allow
            kwargs["plugins"] = plugins
            callbacks = cfg.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
            if not any(isinstance(c, RNGStateCallback) for c in callbacks):
                callbacks.append(RNGStateCallback())
            if not any(isinstance(c, MetricsHistory) for c in callbacks):
                callbacks.append(MetricsHistory())
            if cfg.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
                # A tqdm bar with loss and ETA in a terminal, one plain line per N steps in a log file.
                every = cfg.get("log_every_n_steps") or 50
                callbacks.append(Recon3DProgressBar(log_every_n_steps=max(int(every) * 5, 1)))
            kwargs["callbacks"] = callbacks
            trainer = super().instantiate_trainer(**kwargs)
            for logger in trainer.loggers:
                keep_history(logger)  # metrics.csv keeps its earlier rows (recon3d.utils.run_log)
            return trainer

    return Recon3DCLI


def runtime_options(class_path: str) -> frozenset[str]:
    """The ``RUNTIME_OPTIONS`` a LightningModule class declares (empty if it declares none)."""
    mod, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError):
        return frozenset()
    return frozenset(getattr(cls, "RUNTIME_OPTIONS", ()) or ())


def _note(text: str) -> None:
    """One ``recon3d:`` information line on stderr, from the first process only (DDP ranks re-run the CLI)."""
    if all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK")):
        print(f"recon3d: {text}", file=sys.stderr)


def _short(v) -> str:
    text = repr(v.as_dict() if hasattr(v, "as_dict") else v)
    return text if len(text) <= 60 else text[:57] + "..."


def _drop_init_args_on_class_change(parser_or_action, prev_val, value) -> None:
    """jsonargparse's hook for a class_path change, made to drop *all* previous init_args.

    ``prev_val`` / ``value``: the previous and the new subclass spec (``class_path`` +
    ``init_args``); ``prev_val`` is edited in place, as jsonargparse's own hook does.
    """
    if prev_val and "init_args" in prev_val and "class_path" in value and prev_val["class_path"] != value["class_path"]:
        prev_val.pop("init_args")


@contextlib.contextmanager
def class_change_resets_init_args():
    """While active, a class_path change discards the previous class's init_args (module docstring).

    jsonargparse has no setting for this; its one hook (``discard_init_args_on_class_path_change``
    in ``jsonargparse._typehints``, used for config-file merges and command-line values alike) is
    swapped for the duration of a parse. A jsonargparse without that hook is refused with one
    line rather than silently leaking init_args (``tests/test_cli_class_change.py`` pins it).
    """
    from jsonargparse import _typehints

    from recon3d.errors import ConfigError

    name = "discard_init_args_on_class_path_change"
    original = getattr(_typehints, name, None)
    if not callable(original):  # pragma: no cover - guards a jsonargparse refactor
        import jsonargparse

        raise ConfigError(
            f"jsonargparse {jsonargparse.__version__} has no {name} hook; recon3d cannot keep init_args from leaking "
            "across a class_path change (pin jsonargparse to a version with it)"
        )
    setattr(_typehints, name, _drop_init_args_on_class_change)
    try:
        yield
    finally:
        setattr(_typehints, name, original)


def run_lightning_cli(argv: list[str] | None = None, run: bool = True, hparams_from: str | None = None,
                      allow_pickle: bool = False):
    """Build (and by default run) :class:`Recon3DCLI` on ``argv``; returns the CLI object.

    With an explicit ``argv`` (programs, tests, ``recon3d demo``), ``sys.argv`` is not read.
    ``hparams_from``: with ``run=False``, a checkpoint whose model hyper-parameters are applied to
    the config by the ``--ckpt_path`` rule (architecture from it, run-time options from ``argv``).
    """
    argv = None if argv is None else join_negative_numbers(list(argv))
    with warnings.catch_warnings():
        # LightningCLI warns whenever `args` is given while sys.argv holds anything (e.g. the
        # `recon3d demo ...` or pytest arguments); `args` is what is parsed, so it is noise.
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return _lightning_cli_class()(args=argv, run=run, hparams_from=hparams_from, hparams_allow_pickle=allow_pickle)


def _unknown_command(name: str) -> str:
    known = [*LIGHTNING_COMMANDS, *EXTRA_COMMANDS]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown command {name!r}{hint}; expected one of {', '.join(known)} (recon3d --help)"


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``recon3d``); returns the exit status (module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = join_negative_numbers([a for a in argv if a != "--verbose"])
    with output_policy(verbose):
        _RUN_FOLDERS.clear()
        try:
            if argv[:1] in (["-h"], ["--help"]):
                print(top_help())
                return 0
            if argv[:1] == ["--version"]:
                from recon3d import __version__

                print(f"recon3d {__version__}")
                return 0
            if not argv:
                print(f"recon3d: error: give a command: {', '.join([*LIGHTNING_COMMANDS, *EXTRA_COMMANDS])} (recon3d --help)",
                      file=sys.stderr)
                return 2
            command = argv[0]
            if command in EXTRA_COMMANDS:
                return int(importlib.import_module(EXTRA_COMMANDS[command]).main(argv[1:]) or 0)
            if command not in LIGHTNING_COMMANDS:
                print(f"recon3d: error: {_unknown_command(command)}", file=sys.stderr)
                return 2
            if ("-h" in argv or "--help" in argv) and "--help-all" not in argv:
                print(lightning_help(command))
                return 0
            run_lightning_cli(["--help" if a == "--help-all" else a for a in argv])
            return 0
        except Exception as e:
            line = error_line(e)
            if line is None:
                raise
            remove_empty_run_folders()
            print(f"recon3d: error: {line}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
