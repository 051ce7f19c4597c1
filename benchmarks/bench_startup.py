"""Start-up time of the ``recon3d`` command against ``python -c pass``, measured in the same run.

Each command runs in a fresh subprocess (median of 3, 1 with ``quick``); the table gives the
wall time, the time above the bare interpreter, and the ratio to it. The goal (issue 13): the
help texts, ``recon3d --help`` and ``recon3d <command> --help``, within 1.5 s of a bare
interpreter on the 2-core CI machine; they import neither Lightning nor torch. For comparison
the last row runs LightningCLI's full ``fit --help-all``, which imports Lightning and every
model (what ``recon3d --help`` cost before: ~12 s).

Run: ``.venv/bin/python benchmarks/bench_startup.py [--quick]``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

RECON3D = [sys.executable, "-c", "import sys; from recon3d.cli import main; sys.exit(main())"]
COMMANDS = [
    ("python -c pass", [sys.executable, "-c", "pass"]),
    ("recon3d --help", [*RECON3D, "--help"]),
    ("recon3d export --help", [*RECON3D, "export", "--help"]),
    ("recon3d fit --help", [*RECON3D, "fit", "--help"]),
]
FULL = ("recon3d fit --help-all", [*RECON3D, "fit", "--help-all"])
TARGET_S = 1.5


def _time(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        times.append(time.perf_counter() - t0)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[3:]) or cmd}: exit status {p.returncode}: {p.stderr[-500:]}")
    return statistics.median(times)


def main(quick: bool = False) -> list[tuple[str, float]]:
    """Print the table; returns ``[(command, median seconds)]``."""
    repeat = 1 if quick else 3
    rows = [(name, _time(cmd, repeat)) for name, cmd in COMMANDS + ([] if quick else [FULL])]
    base = rows[0][1]
    print(f"{'command':<26}{'median s':>10}{'above python':>14}{'x python':>10}  goal")
    for name, t in rows:
        goal = "" if name == "python -c pass" or name == FULL[0] else ("ok" if t - base <= TARGET_S else f"> {TARGET_S} s")
        print(f"{name:<26}{t:>10.2f}{t - base:>14.2f}{t / base:>10.1f}  {goal}")
    return rows


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
