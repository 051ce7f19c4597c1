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
"""

from __future__ import annotations

import importlib
import sys

#: ``recon3d <name>`` → module in ``recon3d.commands`` with a ``main(argv) -> int``.
EXTRA_COMMANDS = {
    "demo": "recon3d.commands.demo",
    "data": "recon3d.commands.data",
    "export": "recon3d.commands.export",
    "bench": "recon3d.commands.bench",
}


def _lightning_cli_class():
    from jsonargparse import set_docstring_parse_options
    from lightning.pytorch.cli import LightningCLI

    from recon3d.data.datamodule import ReconDataModule
    from recon3d.methods.base import ReconModule

    set_docstring_parse_options(attribute_docstrings=True)

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

    return Recon3DCLI


def run_lightning_cli(argv: list[str] | None = None, run: bool = True):
    """Build (and by default run) :class:`Recon3DCLI` on ``argv``; returns the CLI object."""
    return _lightning_cli_class()(args=argv, run=run)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``recon3d``)."""
    from recon3d.errors import Recon3DError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            return int(importlib.import_module(EXTRA_COMMANDS[argv[0]]).main(argv[1:]) or 0)
        run_lightning_cli(argv)
        return 0
    except Recon3DError as e:
        print(f"recon3d: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
