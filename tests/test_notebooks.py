"""Notebooks are valid JSON notebooks whose code cells compile; ``notebooks/quickstart.ipynb`` is
also executed (nbclient, a fresh kernel) with its smallest budget, and (slow) with a few minutes of
training."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_cells_compile(path):
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code
    for cell in code:
        compile("".join(cell["source"]), f"{path.name}", "exec")


def _execute(path: Path, tmp_path: Path, monkeypatch, **env: str) -> dict:
    """Run every cell of ``path`` in a fresh kernel from the repository root (nbclient), with the
    notebook's ``RECON3D_NB_*`` parameters from ``env``; returns the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("RECON3D_NB_OUT", str(tmp_path / "nb"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parents[1])}}).execute()
    return nb


def _outputs(nb) -> str:
    return "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


QUICKSTART = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_executes_with_the_smallest_budget(tmp_path, monkeypatch):
    nb = _execute(QUICKSTART, tmp_path, monkeypatch, RECON3D_NB_STEPS="2", RECON3D_NB_SMALL_DATA="1", RECON3D_NB_COMPARE_STEPS="2")
    text = _outputs(nb)
    assert "trained steps: 2" in text
    out = tmp_path / "nb"
    # the files the cells wrote and displayed: the test metrics, the orbit renders, the compare folder
    doc = json.loads((out / "gtr" / "test" / "metrics.json").read_text())
    assert len(doc["per_object"]) == 2 and "psnr" in doc["metrics"]
    assert (out / "gtr_orbit.png").is_file() and (out / "compare" / "grid.png").is_file()
    results = json.loads((out / "compare" / "results.json").read_text())
    assert set(results["entries"]) == {"toy_lr1e-3", "toy_lr3e-2"}
    assert all(f"| {n} |" in text for n in results["entries"])  # the table cell shows both entries
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    assert images == 5  # test grid, orbit strip, metric curves, per-object plot, compare grid


@pytest.mark.slow
def test_quickstart_executes_a_few_minutes_of_training(tmp_path, monkeypatch):
    nb = _execute(QUICKSTART, tmp_path, monkeypatch, RECON3D_NB_STEPS="120", RECON3D_NB_COMPARE_STEPS="20")
    assert "trained steps: 120" in _outputs(nb)
