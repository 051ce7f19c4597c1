"""Non-Lightning subcommands of ``recon3d`` (see :data:`recon3d.cli.EXTRA_COMMANDS`)."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one :class:`~recon3d.errors.ConfigError`
    line (``recon3d: error: recon3d export: the following arguments are required: --ckpt``, exit
    status 2 from :func:`recon3d.cli.main`) instead of a usage dump; ``--help`` is unchanged."""

    def error(self, message: str):
        from recon3d.errors import ConfigError

        raise ConfigError(f"{self.prog}: {message} ({self.prog} --help)")
