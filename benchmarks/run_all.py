"""Run every ``benchmarks/bench_*.py``: ``python -m benchmarks.run_all [--quick] [-k NAME]``.

Each module's ``main(quick)`` is called in turn (sorted by file name); a benchmark that fails is
reported and the next one still runs. A summary with each benchmark's status and wall time is
printed at the end, and the exit status is 1 when any benchmark failed. ``recon3d bench`` runs
the same suite (also from an installed package, which ships a copy of this folder) and appends
the results to ``benchmarks/results/<date>-<commit>.json``.
"""

from __future__ import annotations

import os

# Set before torch is imported by any benchmark (see bench_render's docstring); overridable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent


def discover() -> list[str]:
    """Module names ``benchmarks.bench_*`` found next to this file, sorted."""
    return [f"{__package__ or 'benchmarks'}.{p.stem}" for p in sorted(HERE.glob("bench_*.py"))]


def run(quick: bool = False, only: str | None = None, returns: dict | None = None) -> list[tuple[str, str, float]]:
    """Run the benchmarks: ``[(name, status, seconds)]``; ``returns`` (when given) receives each
    benchmark's ``main()`` return value (rows some of them return) under its name."""
    results = []
    for name in discover():
        short = name.rsplit(".", 1)[-1]
        if only and only not in short:
            continue
        print(f"\n=== {short} (quick={quick}) ===", flush=True)
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(name)
            main = getattr(mod, "main", None)
            if main is None:
                raise AttributeError(f"{name} has no main()")
            value = main(quick=quick) if "quick" in inspect.signature(main).parameters else main()
            if returns is not None:
                returns[short] = value
            status = "ok"
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # noqa: BLE001 - a failing (or sys.exit-ing) benchmark must not stop the others
            traceback.print_exc()
            status = f"FAILED ({type(err).__name__}: {err})"
        results.append((short, status, time.perf_counter() - t0))
        sys.stdout.flush()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (each benchmark about a minute or less)")
    ap.add_argument("-k", dest="only", default=None, help="run only benchmarks whose name contains this")
    a = ap.parse_args(argv)
    results = run(a.quick, a.only)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\n=== summary (quick={a.quick}, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}) ===")
    width = max((len(r[0]) for r in results), default=0)
    for name, status, secs in results:
        print(f"{name.ljust(width)}  {secs:7.1f} s  {status}")
    failed = [r for r in results if r[1] != "ok"]
    print(f"{len(results) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
