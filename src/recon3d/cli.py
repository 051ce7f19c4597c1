"""The ``recon3d`` command line.

``recon3d fit|validate|test|predict`` are LightningCLI subcommands (:class:`Recon3DCLI`): configs
compose with ``-c base.yaml -c override.yaml``, any part is swapped by ``class_path``, and
``--print_config`` shows the resolved config. Other subcommands (``demo``, ``data``, ``export``,
``bench``) are plain argparse programs in :mod:`recon3d.commands`, one module each; add one by
adding a module there and a line to :data:`EXTRA_COMMANDS`.

Errors that recon3d raises on purpose for bad input (:class:`recon3d.errors.Recon3DError`) are
printed as one line, ``recon3d: error: <message>``, with exit status 2 and no traceback.

Resume semantics (a LightningCLI behaviour recon3d keeps): with ``--ckpt_path``, the model's
hyper-parameters come from the checkpoint, so a resumed run is the run that was saved. To start
a *new* stage from an earlier checkpoint, pass the weights with ``--model.init_weights PATH``
(weights only) instead. Run-control settings (steps, devices, callbacks, logging) live in
``trainer``, never in the model's hyper-parameters, so they always come from the command line.

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
(:class:`~recon3d.utils.ckpt_io.RNGStateCallback`). Config errors (unknown key, wrong type, bad
``class_path``) are printed as one ``recon3d: error:`` line with exit status 2.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

#: ``recon3d <name>`` → module in ``recon3d.commands`` with a ``main(argv) -> int``.
EXTRA_COMMANDS = {
    "demo": "recon3d.commands.demo",
    "data": "recon3d.commands.data",
    "export": "recon3d.commands.export",
    "bench": "recon3d.commands.bench",
}


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


def _lightning_cli_class():
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    from recon3d.data.datamodule import ReconDataModule
    from recon3d.errors import CheckpointError
    from recon3d.methods.base import ReconModule

    set_parsing_settings(docstring_parse_attribute_docstrings=True)

    class Recon3DCLI(LightningCLI):
        """LightningCLI over :class:`~recon3d.methods.base.ReconModule` subclasses and the shared
        :class:`~recon3d.data.datamodule.ReconDataModule`."""

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("model_class", ReconModule)
            kwargs.setdefault("subclass_mode_model", True)
            kwargs.setdefault("datamodule_class", ReconDataModule)
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

        def _allow_pickle(self) -> bool:
            name = self.config.get("subcommand")
            sub = self.config.get(name, self.config) if name else self.config
            return bool(sub.get("allow_pickle", False))

        def _parse_ckpt_path(self) -> None:
            # Lightning reads the checkpoint's hyper-parameters here with a bare torch.load; read it
            # through recon3d's safe loader instead (one-line errors, pickle refused unless allowed).
            if not self.config.get("subcommand"):
                return
            ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
            if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry") or not Path(ckpt_path).is_file():
                if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not str(ckpt_path).startswith(
                    ("s3://", "gs://", "http")
                ):
                    raise CheckpointError(f"--ckpt_path {ckpt_path}: checkpoint file not found")
                return
            from recon3d.utils.checkpoint import load_state_dict_file

            ckpt = load_state_dict_file(ckpt_path, allow_pickle=self._allow_pickle())
            if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
                raise CheckpointError(
                    f"{ckpt_path}: not a Lightning training checkpoint (no 'state_dict'); to start from bare weights "
                    "use --model.init_weights instead of --ckpt_path"
                )
            hparams = dict(ckpt.get("hyper_parameters", {}) or {})
            hparams.pop("_instantiator", None)
            if not hparams:
                return
            if "_class_path" in hparams:
                hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
            try:
                self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)
            except Exception as e:
                raise CheckpointError(f"{ckpt_path}: its model hyper-parameters do not fit this config ({_one_line(e)})") from None

        def _check_ckpt_matches_model(self) -> None:
            # Lightning would fail deep inside load_state_dict with a multi-line RuntimeError.
            sub = self.config.get(str(self.subcommand), {})
            ckpt_path = sub.get("ckpt_path") if hasattr(sub, "get") else None
            if not ckpt_path or not Path(ckpt_path).is_file() or self.model is None:
                return
            from recon3d.utils.checkpoint import load_state_dict_file, state_dict_mismatch

            sd = load_state_dict_file(ckpt_path, allow_pickle=self._allow_pickle()).get("state_dict", {})
            own = self.model.state_dict()
            if not own:  # built lazily (configure_model): Lightning checks after setup
                return
            problem = state_dict_mismatch(own, sd)
            if problem:
                raise CheckpointError(f"{ckpt_path}: weights do not match {type(self.model).__name__}: {problem}")

        def before_fit(self) -> None:
            self._check_ckpt_matches_model()

        before_validate = before_test = before_predict = before_fit

        def instantiate_trainer(self, **kwargs):
            from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

            from lightning.pytorch.callbacks import ProgressBar

            from recon3d.utils.ckpt_io import AtomicCheckpointIO, RNGStateCallback
            from recon3d.utils.progress import Recon3DProgressBar

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
            if cfg.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
                # A tqdm bar with loss and ETA in a terminal, one plain line per N steps in a log file.
                every = cfg.get("log_every_n_steps") or 50
                callbacks.append(Recon3DProgressBar(log_every_n_steps=max(int(every) * 5, 1)))
            kwargs["callbacks"] = callbacks
            return super().instantiate_trainer(**kwargs)

    return Recon3DCLI


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
    return text if len(text) <= 400 else text[:397] + "..."


def run_lightning_cli(argv: list[str] | None = None, run: bool = True):
    """Build (and by default run) :class:`Recon3DCLI` on ``argv``; returns the CLI object.

    With an explicit ``argv`` (programs, tests, ``recon3d demo``), ``sys.argv`` is not read.
    """
    import warnings

    with warnings.catch_warnings():
        # LightningCLI warns whenever `args` is given while sys.argv holds anything (e.g. the
        # `recon3d demo ...` or pytest arguments); `args` is what is parsed, so it is noise.
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return _lightning_cli_class()(args=argv, run=run)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``recon3d``)."""
    from jsonargparse import ArgumentError

    from recon3d.errors import Recon3DError

    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            return int(importlib.import_module(EXTRA_COMMANDS[argv[0]]).main(argv[1:]) or 0)
        # LightningCLI reads sys.argv itself; passing it again as `args` makes it warn.
        run_lightning_cli(None if from_sys else argv)
        return 0
    except Recon3DError as e:
        print(f"recon3d: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ArgumentError as e:
        print(f"recon3d: error: config: {_config_error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
