"""Shared helpers of the reliability tests: run the real ``recon3d`` CLI, read checkpoints.

Every training run goes through the console script (``recon3d fit -c ...``) in a process of its
own, as users run it: forked from a server that has the heavy imports done
(:mod:`tests.reliability.forkserver`, ~9 s saved per run), or a plain subprocess with
``RECON3D_TEST_NO_FORKSERVER=1`` (or where the server does not apply). :data:`CONFIGS` lists the method configs the distributed, resume and conformance tests are
parametrized over, found by :func:`discover_configs` (nothing to register).
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tests.reliability import forkserver

REPO = Path(__file__).resolve().parents[2]
RECON3D = Path(sys.executable).parent / "recon3d"


@dataclass(frozen=True)
class ConfigCase:
    """A method config under test.

    Attributes:
        name: test id.
        config: config file, relative to the repository.
        args: extra CLI arguments for every run (``{cache}`` → the shared synthetic-data cache).
        ddp_args: arguments of the 2-process run whose global batch equals the 1-process batch,
            and that switch off per-rank random noise so the loss curves can be compared.
        steps_per_epoch: optimizer steps per epoch with ``max_epochs`` below.
        max_epochs: epochs of the test runs.
    """

    name: str
    config: str
    args: tuple[str, ...] = ()
    ddp_args: tuple[str, ...] = ()
    single_args: tuple[str, ...] = ()
    steps_per_epoch: int = 3
    max_epochs: int = 2
    extra: dict = field(default_factory=dict)
    ddp: bool = True  # False: per-rank random sampling makes DDP curves differ from 1 process by design


#: Method configs found without registration (the conformance rule): every ``configs/*_cpu.yaml``
#: with its test-size overlay ``configs/<name>/reliability.yaml`` (required), the toy config, and
#: the plug-in method of ``tests/methods/plugin``; not the configs of a model that declares
#: ``RECONSTRUCTS_3D = False`` (:func:`reconstructs_3d`: a multi-view generator). A ``configs/<name>/deterministic.yaml`` (no
#: per-rank randomness) makes the DDP tests compare the 2-process curve with the 1-process one;
#: without it they check that the ranks hold equal weights.
PLUGIN = REPO / "tests/methods/plugin/gaussian_fit.yaml"

#: Set to 1 (``make test-ddp`` does) to run the whole kill-point / multi-node matrix on every
#: config; the default suite runs it on a few configs and one point on the rest (its time budget).
FULL_MATRIX_ENV = "RECON3D_FULL_MATRIX"


def full_matrix() -> bool:
    """True when :data:`FULL_MATRIX_ENV` asks for every kill point and launcher on every config."""
    import os

    return os.environ.get(FULL_MATRIX_ENV, "") not in ("", "0")


def reconstructs_3d(cfg: Path) -> bool:
    """False for a config whose model class declares ``RECONSTRUCTS_3D = False`` in its body (a
    multi-view generator such as ``methods.mv_diffusion``: views at its own fixed cameras, no 3D
    representation to render at the targets' cameras or to export). The conformance contract does
    not apply to it; it carries its own train/reload/resume tests. Read from the source with
    ``ast`` (importing every method here would cost collection ~20 s)."""
    import ast

    import yaml

    path = ((yaml.safe_load(cfg.read_text()) or {}).get("model") or {}).get("class_path", "")
    module, _, name = path.rpartition(".")
    src = REPO / "src" / Path(*module.split(".")).with_suffix(".py")
    if not module.startswith("recon3d.") or not src.exists():
        return True
    for node in ast.parse(src.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            for stmt in node.body:
                target = stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else getattr(stmt, "target", None)
                if isinstance(target, ast.Name) and target.id == "RECONSTRUCTS_3D" and isinstance(stmt.value, ast.Constant):
                    return bool(stmt.value.value)
    return True


def discover_configs() -> list[ConfigCase]:
    cache = ("--data.dataset.init_args.cache_dir", "{cache}")
    found = [REPO / "configs/toy.yaml", *sorted(p for p in (REPO / "configs").glob("*_cpu.yaml") if reconstructs_3d(p)), PLUGIN]
    cases = []
    for cfg in found:
        name = cfg.stem.removesuffix("_cpu")
        folder = cfg.parent / name
        overlay = folder / "reliability.yaml"
        if cfg.stem.endswith("_cpu") and not overlay.exists():
            raise FileNotFoundError(f"{cfg.relative_to(REPO)}: add its test-size overlay {overlay.relative_to(REPO)} (see configs/gtr/reliability.yaml)")
        args = (("-c", str(overlay)) if overlay.exists() else ()) + cache
        det = folder / "deterministic.yaml"
        det_args = ("-c", str(det)) if det.exists() else ()
        cases.append(ConfigCase(name, str(cfg.relative_to(REPO)), args=args, ddp_args=det_args + ("--data.batch_size", "1"),
                                single_args=det_args, ddp=det.exists()))
    return cases


CONFIGS = discover_configs()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_args(case: ConfigCase, run_dir: Path, cache: Path, *extra: str) -> list[str]:
    args = ["fit", "-c", str(REPO / case.config)]
    args += [a.replace("{cache}", str(cache)) for a in case.args]
    args += ["--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.max_epochs", str(case.max_epochs)]
    return args + list(extra)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK",
                                                            "WORLD_SIZE", "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")}
    # PYTHONPATH: the plug-in method's class_path lives in tests/ (not an installed package).
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **extra})
    return env


def run(args: list[str], cwd: Path, timeout: float = 240, env: dict | None = None, lane: str = "") -> subprocess.CompletedProcess:
    """``recon3d <args>`` in ``cwd``; returns the completed process (stdout+stderr captured).

    ``lane="reference"`` for a run that others are compared with bit for bit
    (:func:`tests.reliability.forkserver.server_for`).
    """
    env = env or clean_env()
    server = forkserver.server_for(args, env, str(RECON3D), lane)
    if server is not None:
        try:
            return server.run([str(RECON3D), *args], cwd, env, timeout)
        except (OSError, RuntimeError) as e:  # the server broke: the same run as a subprocess
            warnings.warn(f"recon3d test fork server failed ({e}); using subprocesses", stacklevel=2)
            forkserver.drop(server)
    return subprocess.run([str(RECON3D), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def popen(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen | forkserver.ForkedProcess:
    """``recon3d <args>`` started in ``cwd``, stderr merged into stdout; read it with ``communicate``."""
    env = env or clean_env()
    server = forkserver.server_for(args, env, str(RECON3D))
    if server is not None:
        try:
            return server.spawn([str(RECON3D), *args], cwd, env, merge_stderr=True)
        except (OSError, RuntimeError) as e:
            warnings.warn(f"recon3d test fork server failed ({e}); using subprocesses", stacklevel=2)
            forkserver.drop(server)
    return subprocess.Popen([str(RECON3D), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def ckpt_dir(run_dir: Path) -> Path:
    return run_dir / "run" / "checkpoints"


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"tensors differ: {diff}"


def loss_curve(run_dir: Path) -> dict[int, float]:
    """``step -> train/loss`` from the CSV log (the last value logged for a step wins)."""
    out: dict[int, float] = {}
    with open(run_dir / "run" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def tail(p: subprocess.CompletedProcess | str, n: int = 3000) -> str:
    text = p if isinstance(p, str) else (p.stdout or "") + (p.stderr or "")
    return text[-n:]
