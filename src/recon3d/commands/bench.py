"""``recon3d bench [--quick] [NAME ...]``: run the benchmarks in ``benchmarks/`` (same as ``make bench``)."""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parents[3]
    if not (root / "benchmarks").is_dir():
        print("recon3d: error: benchmarks/ not found; run `recon3d bench` from a source checkout", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    from benchmarks.run_all import main as run_all

    return int(run_all(argv) or 0)
