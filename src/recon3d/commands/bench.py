"""``recon3d bench [--quick] [-k NAME] [--compare EARLIER.json]``: the speed/memory benchmarks.

Runs the suite of ``benchmarks/bench_*.py`` (``benchmarks.run_all``, the same as ``make bench``),
then appends the run to a versioned results file and, with ``--compare``, prints ratios against
an earlier one.

Where the suite comes from (first that exists):

1. ``--benchmarks-dir DIR`` (a recon3d checkout's ``benchmarks/``);
2. the source checkout this package runs from (``<checkout>/benchmarks``: a clone, or an
   editable install);
3. the copy shipped inside an installed package (``recon3d/benchmarks``, with the configs it reads
   in ``recon3d/configs``; ``setup.py`` copies both into the wheel).

The folder is imported as the package ``benchmarks`` either way, so the modules run exactly as in
a checkout (``from benchmarks.bench_render import ...``).

Results: ``<results-dir>/<YYYY-MM-DD>-<commit>.json`` (UTC date; the checkout's short commit with
``-dirty`` for uncommitted changes, an installed package's VCS commit, else ``v<version>``);
``--results-dir`` defaults to the suite's ``benchmarks/results`` in a checkout and to
``./benchmarks/results`` for an installed package. A second run on the same day and commit is
appended to the file's ``runs``. Each run records, per benchmark, its status, wall time and the
numbers its ``main()`` returned (numeric leaves, flattened to ``key.sub`` names).

``--compare EARLIER.json``: for every benchmark in both this run and the earlier file's last run,
``now / earlier`` of the wall time and of every shared number (> 1: slower or larger now). With
``--current NOW.json`` two files are compared without running anything. A missing or garbled
file is one ``recon3d: error:`` line, exit status 2 (checked before anything runs).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.machinery
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from recon3d.commands import OneLineParser
from recon3d.errors import ConfigError, DataError

__all__ = ["main", "build_parser", "locate_suite", "load_results", "compare_lines", "results_path", "RESULTS_FORMAT"]

RESULTS_FORMAT, RESULTS_VERSION = "recon3d-bench", 1
_PKG = Path(__file__).resolve().parents[1]  # .../recon3d
#: The checkout's suite (a clone or an editable install: src/recon3d -> ../../benchmarks).
CHECKOUT_BENCHMARKS = _PKG.parents[1] / "benchmarks"
#: The copy an installed package ships (setup.py's build_py).
PACKAGED_BENCHMARKS = _PKG / "benchmarks"


def build_parser() -> OneLineParser:
    ap = OneLineParser(prog="recon3d bench", description="Run the speed/memory benchmarks (benchmarks/bench_*.py, as make bench), "
                       "append the results to <results-dir>/<date>-<commit>.json, optionally compare with an earlier file.")
    ap.add_argument("--quick", action="store_true", help="small sizes (each benchmark about a minute or less)")
    ap.add_argument("-k", dest="only", default=None, help="run only benchmarks whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and where the suite was found; run nothing")
    ap.add_argument("--benchmarks-dir", default=None, help="the suite's folder (default: the checkout's benchmarks/, else the installed copy)")
    ap.add_argument("--results-dir", default=None,
                    help="where <date>-<commit>.json goes (default: benchmarks/results of the checkout, ./benchmarks/results when installed)")
    ap.add_argument("--no-save", action="store_true", help="do not write a results file")
    ap.add_argument("--compare", default=None, metavar="EARLIER.json", help="print now/earlier ratios against this results file")
    ap.add_argument("--current", default=None, metavar="NOW.json", help="with --compare: compare this file instead of running")
    return ap


# ---------------------------------------------------------------------- the suite
def locate_suite(explicit: str | None = None) -> tuple[Path, str]:
    """``(folder, "option" | "checkout" | "installed")`` of the benchmark suite (module docstring)."""
    if explicit is not None:
        d = Path(explicit)
        if not (d / "run_all.py").is_file():
            raise ConfigError(f"--benchmarks-dir {d}: no run_all.py there; expected a recon3d checkout's benchmarks/ folder")
        return d.resolve(), "option"
    for d, kind in ((CHECKOUT_BENCHMARKS, "checkout"), (PACKAGED_BENCHMARKS, "installed")):
        if (d / "run_all.py").is_file():
            return d, kind
    raise ConfigError(f"recon3d bench: no benchmark suite found (neither {CHECKOUT_BENCHMARKS} nor {PACKAGED_BENCHMARKS}); "
                      "reinstall recon3d from a checkout (pip install .) or pass --benchmarks-dir DIR")


@contextlib.contextmanager
def _suite_as_benchmarks(folder: Path) -> Iterator[object]:
    """Import ``folder`` as the package ``benchmarks``; on exit the previous ``benchmarks*``
    modules (an in-process caller's) are restored."""
    saved = {k: v for k, v in sys.modules.items() if k == "benchmarks" or k.startswith("benchmarks.")}
    for k in saved:
        del sys.modules[k]
    init = folder / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location("benchmarks", init, submodule_search_locations=[str(folder)])
    else:  # a folder without __init__.py: a plain package over it
        spec = importlib.machinery.ModuleSpec("benchmarks", None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = pkg
    try:
        if init.is_file():
            spec.loader.exec_module(pkg)
        yield importlib.import_module("benchmarks.run_all")
    finally:
        for k in [k for k in sys.modules if k == "benchmarks" or k.startswith("benchmarks.")]:
            del sys.modules[k]
        sys.modules.update(saved)


# ---------------------------------------------------------------------- results files
def _git(folder: Path, *args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def commit_label(folder: Path, kind: str) -> str:
    """The results file's commit part (module docstring)."""
    if kind != "installed":
        head = _git(folder, "rev-parse", "--short=12", "HEAD")
        if head:
            dirty = _git(folder, "status", "--porcelain", "--untracked-files=no")
            return head + ("-dirty" if dirty else "")
    try:
        from importlib.metadata import distribution

        url = json.loads(distribution("recon3d").read_text("direct_url.json") or "{}")
        commit = (url.get("vcs_info") or {}).get("commit_id")
        if commit:
            return str(commit)[:12]
    except Exception:  # noqa: BLE001 - no metadata: fall back to the version
        pass
    from recon3d import __version__

    return f"v{__version__}"


def results_path(results_dir: Path, commit: str, when: _dt.datetime) -> Path:
    return results_dir / f"{when.strftime('%Y-%m-%d')}-{commit}.json"


def load_results(path: str | Path) -> dict:
    """A results file as a dict with a non-empty ``runs`` list; one-line :class:`DataError` otherwise."""
    path = Path(path)
    want = f"a recon3d bench results file ({{'format': '{RESULTS_FORMAT}', 'runs': [...]}})"
    if not path.is_file():
        raise DataError(path, f"file not found; expected {want}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(path, f"cannot parse JSON ({e.msg} at line {e.lineno} column {e.colno}); expected {want}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read ({type(e).__name__}); expected {want}") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT or not isinstance(runs, list) or not runs \
            or not all(isinstance(r, dict) and isinstance(r.get("benchmarks"), dict) for r in runs):
        raise DataError(path, f"not {want}")
    return data


def _numeric_leaves(obj: object, prefix: str = "", out: dict | None = None) -> dict[str, float]:
    """Finite numbers in ``obj`` (dicts, lists of rows, tuples) as ``{"a.b": x}``; a row that holds
    a string is named by its first string (``[{"config": "cfg", "ratio": 2}]`` → ``cfg.ratio``)."""
    out = {} if out is None else out
    if isinstance(obj, bool) or obj is None:
        return out
    if isinstance(obj, (int, float)):
        if math.isfinite(obj):
            out[prefix or "value"] = float(obj)
        return out
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        with contextlib.suppress(Exception):
            return _numeric_leaves(obj.item(), prefix, out)
        return out
    join = (lambda k: f"{prefix}.{k}" if prefix else str(k))
    if isinstance(obj, dict):
        for k, v in obj.items():
            _numeric_leaves(v, join(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            label = None
            if isinstance(v, dict):
                label = next((x for x in v.values() if isinstance(x, str)), None)
            elif isinstance(v, (list, tuple)):
                label = next((x for x in v if isinstance(x, str)), None)
                nums = [x for x in v if not isinstance(x, (str, bool)) and isinstance(x, (int, float))]
                if label is not None and len(nums) == 1 and len(v) == 2:  # a (name, value) row
                    _numeric_leaves(nums[0], join(label), out)
                    continue
            _numeric_leaves(v, join(label if label is not None else i), out)
    return out


def _run_record(results: list, returns: dict, quick: bool, only: str | None, kind: str, when: _dt.datetime) -> dict:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "started": when.isoformat(timespec="seconds"), "quick": bool(quick), "only": only, "suite": kind,
        "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load": [round(x, 2) for x in load if math.isfinite(x)],
        "benchmarks": {name: {"status": status, "seconds": round(secs, 4), "metrics": _numeric_leaves(returns.get(name))}
                       for name, status, secs in results},
    }


def append_run(path: Path, commit: str, run: dict) -> None:
    """Append ``run`` to the results file at ``path`` (created when absent; atomic write)."""
    from recon3d.utils.io import atomic_write_text

    if path.exists():
        data = load_results(path)  # a garbled file is reported, never overwritten
    else:
        data = {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "commit": commit, "date": path.stem[:10], "runs": []}
    data["runs"].append(run)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------- comparison
def compare_lines(now: dict, earlier: dict, earlier_name: str = "earlier") -> list[str]:
    """Table lines: per benchmark in both runs (``{"benchmarks": {...}}`` dicts), ``now / earlier``
    of the wall time and of every shared metric."""
    a, b = now["benchmarks"], earlier["benchmarks"]
    shared = [n for n in a if n in b]
    lines = [f"=== compare with {earlier_name} (earlier: {earlier.get('started', '?')}, quick={earlier.get('quick')}; "
             f"now: {now.get('started', '?')}, quick={now.get('quick')}); ratio = now / earlier ==="]
    if not shared:
        return [*lines, "no benchmark in both runs"]
    rows = []
    for n in shared:
        x, y = a[n], b[n]
        if x.get("status") != "ok" or y.get("status") != "ok":
            rows.append((n, "wall s", y.get("seconds"), x.get("seconds"), f"status now {x.get('status')!r}, earlier {y.get('status')!r}"))
            continue
        rows.append((n, "wall s", y["seconds"], x["seconds"], _ratio(x["seconds"], y["seconds"])))
        mx, my = x.get("metrics") or {}, y.get("metrics") or {}
        for k in mx:
            if k in my:
                rows.append(("", k, my[k], mx[k], _ratio(mx[k], my[k])))
    w0 = max(len("benchmark"), *(len(r[0]) for r in rows))
    w1 = max(len("value"), *(len(r[1]) for r in rows))
    lines.append(f"{'benchmark':<{w0}}  {'value':<{w1}}  {'earlier':>12}  {'now':>12}  ratio")
    for n, k, e, c, r in rows:
        lines.append(f"{n:<{w0}}  {k:<{w1}}  {_num(e):>12}  {_num(c):>12}  {r}")
    only_now, only_earlier = [n for n in a if n not in b], [n for n in b if n not in a]
    if only_now:
        lines.append(f"only now: {', '.join(only_now)}")
    if only_earlier:
        lines.append(f"only earlier: {', '.join(only_earlier)}")
    return lines


def _ratio(now: float, earlier: float) -> str:
    if not earlier:
        return "n/a (earlier 0)"
    return f"{now / earlier:.3f}x"


def _num(x) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


# ---------------------------------------------------------------------- command
def main(argv: Sequence[str] | None = None) -> int:
    """``recon3d bench ...``; returns the exit status (1 when a benchmark failed)."""
    a = build_parser().parse_args(None if argv is None else list(argv))
    earlier = load_results(a.compare) if a.compare else None  # before anything runs
    if a.current:
        if earlier is None:
            raise ConfigError("recon3d bench: --current NOW.json needs --compare EARLIER.json")
        for line in compare_lines(load_results(a.current)["runs"][-1], earlier["runs"][-1], a.compare):
            print(line)
        return 0
    folder, kind = locate_suite(a.benchmarks_dir)
    # Set before torch is imported by any benchmark (run_all does the same for `make bench`).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with _suite_as_benchmarks(folder) as run_all:
        if a.list:
            print(f"recon3d bench: suite in {folder} ({kind})")
            for name in run_all.discover():
                print(f"  {name.rsplit('.', 1)[-1]}")
            return 0
        when = _dt.datetime.now(_dt.timezone.utc)
        returns: dict = {}
        results = run_all.run(a.quick, a.only, returns=returns)
    if not results:
        raise ConfigError(f"recon3d bench: no benchmark matches -k {a.only!r} (recon3d bench --list)")
    print(f"\n=== summary (quick={a.quick}, suite: {kind} {folder}) ===")
    width = max(len(r[0]) for r in results)
    for name, status, secs in results:
        print(f"{name.ljust(width)}  {secs:7.1f} s  {status}")
    failed = [r for r in results if r[1] != "ok"]
    print(f"{len(results) - len(failed)} ok, {len(failed)} failed")
    run = _run_record(results, returns, a.quick, a.only, kind, when)
    if not a.no_save:
        if a.results_dir is not None:
            rdir = Path(a.results_dir)
        else:
            rdir = folder / "results" if kind != "installed" else Path.cwd() / "benchmarks" / "results"
        commit = commit_label(folder, kind)
        path = results_path(rdir, commit, when)
        append_run(path, commit, run)
        print(f"recon3d bench: results appended to {path}")
    if earlier is not None:
        print()
        for line in compare_lines(run, earlier["runs"][-1], a.compare):
            print(line)
    return 1 if failed else 0
