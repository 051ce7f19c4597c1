"""The package's layering (DESIGN.md: arrows point down only), read from the source with ``ast``.

Every ``import recon3d...`` / ``from recon3d... import`` / relative import in ``src/recon3d`` is
collected per module, including imports inside functions (a lazy import is still a dependency:
the ``data/formats/front3d.py <-> models/depth_prior.py`` cycle was two lazy imports). Each module
belongs to a unit (its top-level sub-package, or ``cli``/``errors`` for those modules), and a
unit may import only the units of its own layer or below:

====  ==============================  ==============================================================
rank  units                           may import
====  ==============================  ==============================================================
0     errors, utils                   errors, utils (errors: nothing)
1     geometry                        ... rank 0 (mesh/grid algorithms shared by data and render)
2     data, representations           ... ranks 0-1 and each other (DESIGN: the bottom block)
3     render, metrics                 ... ranks 0-2
4     models, adapters                ... ranks 0-3
5     methods                         ... ranks 0-4
6     commands, cli                   anything
====  ==============================  ==============================================================

so data and representations import nothing above them, render/metrics import no model, method or
command, models import no method, and only methods, commands and the CLI import methods. On top,
the graph between units has no cycle (same-rank units must not import each other both ways), and
the package root ``recon3d/__init__.py`` imports nothing of recon3d (``import recon3d`` stays cheap
for the CLI's start-up).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "recon3d"

RANK = {
    "errors": 0, "utils": 0,
    "geometry": 1,
    "data": 2, "representations": 2,
    "render": 3, "metrics": 3,
    "models": 4, "adapters": 4,
    "methods": 5,
    "commands": 6, "cli": 6,
}

#: ``(importing module, imported module)`` pairs allowed against the table, each a deliberate lazy
#: import inside a function. Empty today: keep it small, and say why next to every entry.
ALLOWED: dict[tuple[str, str], str] = {}


def _module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, root: Path = SRC) -> list[tuple[str, int]]:
    """``(absolute recon3d module name, line)`` of every recon3d import in ``path``.

    ``from recon3d.x import y`` counts as importing ``recon3d.x`` (``y`` may be a name or a
    sub-module; either way the unit is that of ``recon3d.x`` or below it).
    """
    mod = _module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "recon3d"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] == "recon3d":
                if name == "recon3d":  # ``from recon3d import x``: x is a sub-module or a root name
                    pkg_dir = root / "recon3d"
                    out += [(f"recon3d.{a.name}" if (pkg_dir / a.name).is_dir() or (pkg_dir / f"{a.name}.py").is_file()
                             else "recon3d", node.lineno) for a in node.names]
                else:
                    out.append((name, node.lineno))
    return out


def _unit(module: str) -> str:
    """``recon3d.data.formats.front3d`` -> ``data``; ``recon3d`` -> ``""`` (the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, list[tuple[str, int]]]:
    return {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_unit_has_a_rank():
    units = {_unit(m) for m in _graph()} - {""}
    assert units <= set(RANK), f"new top-level units without a layer in tests/test_layering.py: {sorted(units - set(RANK))}"
    # the walk sees the package (guards against a wrong SRC path passing every check vacuously)
    assert {"data", "render", "methods", "geometry"} <= units


def test_imports_point_down_only():
    bad = []
    for mod, imports in _graph().items():
        src = _unit(mod)
        for target, line in imports:
            dst = _unit(target)
            if src == "":
                bad.append(f"{mod}:{line} imports {target} (the package root imports nothing of recon3d)")
            elif dst in ("", src) or (mod, target) in ALLOWED:
                continue
            elif dst not in RANK:
                bad.append(f"{mod}:{line} imports {target}, a unit without a layer")
            elif RANK[dst] > RANK[src]:
                bad.append(f"{mod}:{line} imports {target}: {src} (layer {RANK[src]}) must not import {dst} (layer {RANK[dst]})")
    assert not bad, "layering violations (DESIGN.md):\n" + "\n".join(bad)


def test_no_import_cycle_between_units():
    edges: dict[str, set[str]] = {}
    for mod, imports in _graph().items():
        for target, _ in imports:
            a, b = _unit(mod), _unit(target)
            if a and b and a != b and (mod, target) not in ALLOWED:
                edges.setdefault(a, set()).add(b)
    # depth-first search for a back edge; report the cycle's units
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(edges):
        if u not in state and (cycle := visit(u)):
            pytest.fail("import cycle between sub-packages: " + " -> ".join(cycle))


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    """The collector itself: a lazy import inside a function and a relative import both count."""
    pkg = tmp_path / "recon3d" / "data"
    pkg.mkdir(parents=True)
    f = pkg / "mod.py"
    (tmp_path / "recon3d" / "models").mkdir()
    f.write_text("from . import batch\n\ndef g():\n    from recon3d.models.depth_prior import x\n    import recon3d.metrics.geometry\n"
                 "    from recon3d import models, __version__\n")
    assert sorted(_imports(f, tmp_path)) == [
        ("recon3d", 6), ("recon3d.data", 1), ("recon3d.metrics.geometry", 5), ("recon3d.models", 6), ("recon3d.models.depth_prior", 4),
    ]
