"""The report of ``recon3d compare``: what it writes into its output folder, and how to read it back.

Files (every one rewritten from the entries' run folders each time, so a resumed suite reports all
of its entries):

- ``results.json``: ``{"suite", "budget", "metrics", "higher_is_better", "best", "protocol",
  "held_out", "entries": {name: {"status", "config", "steps", "fit_seconds", "metrics",
  "per_object": [{"object_id", metric: value}], "curves": {metric: [[step, value], ...]},
  "data_flags", "error"}}}``
- ``results.md``: one table (a row per entry, a column per metric with ↑/↓, the best value of each
  column in bold), then the protocol and its conventions (:func:`recon3d.metrics.protocol.describe_protocol`).
  A value the run's ``metrics.json`` flags (``flagged_metrics``: computed, but not a measurement of
  the method, e.g. the pose errors of an untrained camera head) is shown with ‡, its reason in the
  notes, and is not a candidate for bold (``best``).
- ``plots/metrics_vs_step.png``: each validation metric against the training step, a line per entry
  (from the run's ``metrics.csv``); ``plots/per_object.png``: per metric, each entry's per-object
  values (box + points) on the held-out objects.
- ``grid.png``: per held-out object, a row of its input view 0 and true target views, then a row per
  entry of its renders at those cameras.
- ``environment.json``: package versions, the git commit (and whether the tree had local changes),
  platform, the command line.

:func:`load_results` reads ``results.json`` back; :func:`results_table` turns it into rows (a
notebook or a script builds its own table from them).
"""

from __future__ import annotations

import csv
import json
import math
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from recon3d.utils.io import atomic_write_text

_PACKAGES = ("recon3d", "torch", "lightning", "torchmetrics", "jsonargparse", "numpy", "scipy", "matplotlib", "peft",
             "diffusers", "transformers")


def load_results(out: str | Path) -> dict:
    """``results.json`` of a compare folder."""
    return json.loads((Path(out) / "results.json").read_text())


def results_table(doc: dict) -> tuple[list[str], list[list[Any]]]:
    """``(columns, rows)`` of the results table: entry, status, steps, then one column per metric
    (``None`` where an entry has no value)."""
    cols = ["entry", "status", "steps", *doc["metrics"]]
    rows = []
    for name, e in doc["entries"].items():
        rows.append([name, e["status"], e.get("steps"), *[e.get("metrics", {}).get(m) for m in doc["metrics"]]])
    return cols, rows


# ---------------------------------------------------------------------- reading the run folders
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def val_curves(metrics_csv: Path) -> dict[str, list[list[float]]]:
    """``{metric: [[step, value], ...]}`` of the ``val/<metric>`` columns of a run's ``metrics.csv``
    (rows without that value skipped; one value per step, the last logged)."""
    if not metrics_csv.is_file():
        return {}
    curves: dict[str, dict[int, float]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            for key, val in row.items():
                if not key or not key.startswith("val/") or val in (None, "") or step in (None, ""):
                    continue
                try:
                    v = float(val)
                except ValueError:
                    continue
                if math.isfinite(v):
                    curves.setdefault(key[4:], {})[int(float(step))] = v
    return {m: [[s, v] for s, v in sorted(pts.items())] for m, pts in curves.items()}


def collect(out: Path, suite, flags: dict[str, dict[str, tuple]]) -> dict:
    """The ``results.json`` document of ``suite`` from ``out/runs/*`` (see the module docstring)."""
    from recon3d.metrics.protocol import HIGHER_IS_BETTER, METRIC_NAMES

    entries: dict[str, dict] = {}
    protocol_doc = None
    for e in suite.entries:
        run_dir = out / "runs" / e.name
        done, failed = _read_json(run_dir / "done.json"), _read_json(run_dir / "failed.json")
        test = _read_json(run_dir / "test" / "metrics.json") if done else None
        row: dict[str, Any] = {
            "status": "done" if done else ("failed" if failed else "pending"),
            "config": str(e.config), "overrides": e.overrides, "ckpt": str(e.ckpt) if e.ckpt else None, "note": e.note,
            "run_dir": str(run_dir), "data_flags": {k: list(v) for k, v in flags.get(e.name, {}).items()},
            "curves": val_curves(run_dir / "metrics.csv"),
        }
        if done:
            row.update({k: done.get(k) for k in ("steps", "fit_seconds", "test_seconds", "checkpoint", "resumed_from_step")})
        if failed:
            row["error"] = failed.get("error")
        if test:
            row["metrics"] = {k: v for k, v in test.get("metrics", {}).items() if isinstance(v, (int, float))}
            row["per_object"] = test.get("per_object", [])
            row["missing_metrics"] = test.get("missing_metrics", {})
            row["flagged_metrics"] = test.get("flagged_metrics", {})
            protocol_doc = protocol_doc or test
        entries[e.name] = row
    reported = {m for r in entries.values() for m in r.get("metrics", {})}
    metrics = list(suite.metrics) if suite.metrics else [m for m in METRIC_NAMES if m in reported]
    best = {}
    for m in metrics:
        vals = {n: r["metrics"][m] for n, r in entries.items()
                if m in r.get("metrics", {}) and math.isfinite(r["metrics"][m]) and m not in (r.get("flagged_metrics") or {})}
        if vals:
            target = max(vals.values()) if HIGHER_IS_BETTER[m] else min(vals.values())
            best[m] = sorted(n for n, v in vals.items() if v == target)
    cfg0 = _read_yaml(out / "configs" / f"{suite.entries[0].name}.yaml")
    data = (cfg0.get("data") or {}).get("init_args", cfg0.get("data") or {})
    first_done = next((r for r in entries.values() if r.get("per_object")), None)
    held_out = {
        "objects": [r["object_id"] for r in first_done["per_object"]] if first_done else [],
        "num_test_objects": data.get("num_test_objects"), "num_target_views": data.get("num_target_views"),
        "num_input_views": data.get("num_input_views"), "target_resolution": data.get("target_resolution"),
        "eval_view_sampling": data.get("eval_view_sampling"), "seed": data.get("seed"),
        "dataset": (data.get("dataset") or {}).get("class_path") if isinstance(data.get("dataset"), dict) else data.get("dataset"),
    }
    return {
        "suite": suite.source, "description": suite.description, "papers": suite.papers, "budget": suite.budget, "metrics": metrics,
        "higher_is_better": {m: HIGHER_IS_BETTER[m] for m in metrics}, "best": best,
        "protocol": {k: protocol_doc.get(k) for k in ("geometry_protocol", "image_metrics", "lpips")} if protocol_doc else None,
        "protocol_text": _protocol_lines(protocol_doc) if protocol_doc else [],
        "held_out": held_out, "entries": entries,
    }


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _protocol_lines(doc: dict) -> list[str]:
    from recon3d.metrics.protocol import describe_protocol

    return describe_protocol(doc, with_missing=False)  # what is missing is said per entry, in the notes


# ---------------------------------------------------------------------- results.md
def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def results_markdown(doc: dict) -> str:
    """``results.md``: the table (best of each column in bold, ↑ higher / ↓ lower is better), the
    held-out set, the budget, the protocol's conventions and the entries' notes."""
    metrics = doc["metrics"]
    head = ["entry", "steps", "train s", *[f"{m} {'↑' if doc['higher_is_better'][m] else '↓'}" for m in metrics]]
    lines = [f"# recon3d compare: {Path(doc['suite']).name if doc['suite'] != '--configs' else 'configs'}", ""]
    if doc.get("description"):
        lines += [doc["description"].strip(), ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    notes = []
    any_flagged = False
    for name, e in doc["entries"].items():
        label = name + (" †" if e.get("data_flags") else "")
        if e["status"] != "done":
            why = e.get("error") or "not finished"
            lines.append("| " + " | ".join([label, "–", "–", *[e["status"]] * len(metrics)]) + " |")
            notes.append(f"- {name}: {e['status']}: {why}")
            continue
        cells = []
        flagged = e.get("flagged_metrics") or {}
        for m in metrics:
            v = e.get("metrics", {}).get(m)
            text = _fmt(v)
            if v is not None and name in doc["best"].get(m, []):
                text = f"**{text}**"
            if v is not None and m in flagged:
                text, any_flagged = f"{text} ‡", True
            cells.append(text)
        lines.append("| " + " | ".join([label, _fmt(e.get("steps")), _fmt(e.get("fit_seconds")), *cells]) + " |")
        for m, why in sorted((e.get("missing_metrics") or {}).items()):
            if m in metrics:
                notes.append(f"- {name}: `{m}` not measured: {why}")
        by_reason: dict[str, list[str]] = {}
        for m in metrics:
            if m in flagged and m in e.get("metrics", {}):
                by_reason.setdefault(flagged[m], []).append(f"`{m}`")
        for why, ms in by_reason.items():
            notes.append(f"- {name} ‡: {', '.join(ms)} reported but not a measurement of the method: {why}")
        if e.get("data_flags"):
            diffs = ", ".join(f"data.{k} = {v[0]!r} (others {v[1]!r})" for k, v in e["data_flags"].items())
            notes.append(f"- {name} †: scored on different data: {diffs}")
        if e.get("note"):
            notes.append(f"- {name}: {e['note']}")
        if e.get("ckpt"):
            notes.append(f"- {name}: evaluated from the given checkpoint {e['ckpt']} (not trained here)")
        if e.get("resumed_from_step"):
            notes.append(f"- {name}: resumed from its checkpoint at step {e['resumed_from_step']}")
    lines += ["", "Bold: the best value of each column (↑ higher is better, ↓ lower is better); – no value."]
    if any_flagged:
        lines.append("‡: computed as every other value but flagged by the run (not a measurement of the method, e.g. the "
                     "poses of an untrained camera head; reason in the notes); never bold.")
    lines.append("")
    b = doc.get("budget") or {}
    budget = ", ".join(f"{k} {v}" for k, v in b.items()) or "each config's own trainer settings"
    h = doc.get("held_out") or {}
    lines += [
        "## Protocol",
        "",
        f"- Budget (every entry): {budget}.",
        f"- Held-out objects: the datamodule's test split, the same for every entry: {len(h.get('objects') or [])} objects"
        f" ({', '.join(h.get('objects') or []) or '?'}) of `{h.get('dataset')}` (data seed {h.get('seed')}); "
        f"{h.get('num_input_views')} input views, {h.get('num_target_views')} target views at "
        f"{str(h.get('target_resolution')) + ' px' if h.get('target_resolution') else 'the dataset resolution'} "
        f"(`{h.get('eval_view_sampling')}` view sampling).",
        *doc.get("protocol_text", []),
    ]
    if doc.get("papers"):
        lines += ["", "## Each paper's own data layout and protocol", "",
                  "The table above uses the one protocol of this suite; the papers reported theirs:", ""]
        for paper, info in doc["papers"].items():
            lines.append(f"- **{paper}**: " + "; ".join(f"{k}: {' '.join(str(v).split())}" for k, v in info.items()))
    if notes:
        lines += ["", "## Notes", "", *notes]
    lines += ["", "Files: results.json (per entry and per object), plots/metrics_vs_step.png, plots/per_object.png, grid.png, "
              "configs/<entry>.yaml (resolved), environment.json, runs/<entry>/ (run folders)."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- plots and grid
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(doc: dict, path: Path) -> Path | None:
    """Each validation metric vs training step, a line per entry; None when nothing was validated."""
    names = [m for m in doc["metrics"] if any(m in e.get("curves", {}) for e in doc["entries"].values())]
    names += sorted({m for e in doc["entries"].values() for m in e.get("curves", {}) if m not in names and m in doc["higher_is_better"]})
    if not names:
        return None
    plt = _pyplot()
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, m in zip(axes.flat, names):
        for i, (name, e) in enumerate(doc["entries"].items()):
            pts = e.get("curves", {}).get(m)
            if pts:  # one colour per entry in every panel (the legend is drawn once)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name, color=f"C{i % 10}")
        ax.set_title(f"val/{m} ({'higher' if doc['higher_is_better'].get(m, True) else 'lower'} is better)")
        ax.set_xlabel("step (as logged in metrics.csv)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
    fig.legend(list(handles.values()), list(handles), loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_per_object(doc: dict, path: Path) -> Path | None:
    """Per metric, every entry's per-object test values (box plot with the points over it)."""
    names = [m for m in doc["metrics"] if any(m in r for e in doc["entries"].values() for r in e.get("per_object", []))]
    if not names:
        return None
    plt = _pyplot()
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    entries = [n for n, e in doc["entries"].items() if e.get("per_object")]
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.2, 1.1 * len(entries) + 1.5) * cols, 3.4 * rows), squeeze=False)
    for ax, m in zip(axes.flat, names):
        data = [[r[m] for r in doc["entries"][n]["per_object"] if m in r and math.isfinite(r[m])] for n in entries]
        ax.boxplot([d if d else [math.nan] for d in data], showfliers=False)
        for i, d in enumerate(data, start=1):
            color = f"C{list(doc['entries']).index(entries[i - 1]) % 10}"
            ax.scatter([i + 0.08 * ((j % 5) - 2) for j in range(len(d))], d, s=10, alpha=0.7, color=color)
        ax.set_xticks(range(1, len(entries) + 1), entries, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{m} per held-out object ({'↑' if doc['higher_is_better'][m] else '↓'})")
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def comparison_grid(out: Path, names: list[str], path: Path, min_view_size: int = 96) -> Path | None:
    """``grid.png``: per held-out object a row "input 0 + true targets", then a row per entry of
    its renders at the same target cameras (from ``runs/<name>/views.pt``); None without views."""
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageDraw, ImageFont

    from recon3d.utils.images import to_uint8_hwc

    views = {}
    for n in names:
        p = out / "runs" / n / "views.pt"
        if p.is_file() and (out / "runs" / n / "done.json").is_file():
            views[n] = torch.load(p, map_location="cpu", weights_only=True)
    if not views:
        return None
    ref = next(iter(views.values()))
    h, w = ref["targets"].shape[-2:]
    s = max(1, -(-min_view_size // max(h, w)))
    H, W, pad = h * s, w * s, 2

    def tile(imgs: torch.Tensor) -> torch.Tensor:  # (V, 3, h', w') -> (3, H + 2 pad, V (W + 2 pad))
        v = imgs.float()
        if v.shape[-2:] != (H, W):
            v = F.interpolate(v, size=(H, W), mode="nearest")
        v = F.pad(v, (pad, pad, pad, pad), value=0.5)
        return torch.cat(list(v), dim=2)

    rows, labels = [], []
    for i, oid in enumerate(ref["object_ids"]):
        # input view 0 may have another size than the targets (input_resolution): each tile is resized
        rows.append(torch.cat([tile(ref["inputs"][i, :1]), tile(ref["targets"][i])], dim=-1))
        labels.append(f"{oid}\ninput 0 | truth")
        for n, v in views.items():
            if oid not in v["object_ids"]:
                continue
            j = v["object_ids"].index(oid)
            blank = torch.ones_like(ref["targets"][i, :1])
            rows.append(torch.cat([tile(blank), tile(v["preds"][j][: ref["targets"].shape[1]])], dim=-1))
            labels.append(n)
    width = max(r.shape[-1] for r in rows)
    grid = to_uint8_hwc(torch.cat([F.pad(r, (0, width - r.shape[-1]), value=1.0) for r in rows], dim=1))
    font = ImageFont.load_default(size=max(11, H // 8))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 8 + max(int(probe.multiline_textbbox((0, 0), t, font=font)[2]) for t in labels)
    canvas = Image.new("RGB", (label_w + grid.shape[1], grid.shape[0]), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(labels):
        draw.multiline_text((4, k * (H + 2 * pad) + 4), text, fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ---------------------------------------------------------------------- environment
def environment(argv: list[str] | None = None) -> dict:
    """Package versions, git commit (``dirty``: tracked files changed), platform and command."""
    from importlib import metadata

    import torch

    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    root = Path(__file__).resolve().parents[3]
    git = {"commit": None, "dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20)
        if commit.returncode == 0:
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=20)
            git = {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "packages": versions, "git": git,
        "torch_threads": torch.get_num_threads(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "command": ["recon3d", "compare", *(argv or [])],
    }


def write_report(out: Path, suite, flags: dict[str, dict[str, tuple]], argv: list[str] | None = None) -> dict:
    """Write every report file into ``out`` (module docstring); returns the results document."""
    doc = collect(out, suite, flags)
    plots = {"metrics_vs_step": plot_curves(doc, out / "plots" / "metrics_vs_step.png"),
             "per_object": plot_per_object(doc, out / "plots" / "per_object.png"),
             "grid": comparison_grid(out, [e.name for e in suite.entries], out / "grid.png")}
    doc["files"] = {k: str(v.relative_to(out)) if v else None for k, v in plots.items()}
    atomic_write_text(out / "results.json", json.dumps(doc, indent=2, allow_nan=True, default=str) + "\n")
    atomic_write_text(out / "results.md", results_markdown(doc))
    atomic_write_text(out / "environment.json", json.dumps(environment(argv), indent=2) + "\n")
    return doc
