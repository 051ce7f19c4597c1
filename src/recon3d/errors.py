"""Exception types with one-line, user-facing messages.

Every error a user can cause with bad input (a file, a config key, a checkpoint) is raised as
one of these, with a message that names the thing and what was expected. The CLI prints
``str(err)`` on one line instead of a traceback (``recon3d.cli.main``).
"""

from __future__ import annotations


class Recon3DError(Exception):
    """Base class of every error recon3d raises on purpose for bad input."""


class ShapeError(Recon3DError, ValueError):
    """A tensor argument has the wrong shape, dtype or non-finite values."""


class DataError(Recon3DError, ValueError):
    """A dataset file is missing, corrupt, malformed or inconsistent."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(Recon3DError, ValueError):
    """A configuration value is missing or not what was expected."""


class CheckpointError(Recon3DError, ValueError):
    """A checkpoint or weight file is missing, unsafe, or does not match the model."""


class BackendUnavailableError(Recon3DError, RuntimeError):
    """An explicitly requested compute backend (gsplat, nvdiffrast, diso, mamba_ssm) is not usable."""
