"""``recon3d compare``: several configs trained for one budget and scored under one protocol.

Give a suite file or a list of configs::

    recon3d compare configs/compare/cpu.yaml --out outputs/compare/cpu
    recon3d compare --configs configs/toy.yaml configs/gtr_cpu.yaml --max_steps 100 --out outputs/cmp

A **suite** is a YAML file (``configs/compare/*.yaml``; not a LightningCLI config)::

    budget: {max_steps: 200, val_every: 50, checkpoint_every: 50}   # or max_time: "00:00:05:00"
    data: {...}            # one data block (or a list of CLI args) forced on every entry
    evaluation: {...}      # optional: one model.init_args.evaluation forced on every entry
    metrics: [psnr, ssim]  # optional: the table's columns (default: every metric reported)
    grid_objects: 4        # held-out objects shown in grid.png
    papers: {GTR: {data: ..., protocol: ...}}   # optional: each paper's own layout, shown in results.md
    entries:
      - name: gtr
        config: configs/gtr_cpu.yaml
        overrides: [--model.init_args.lr, "2e-3"]   # CLI-style args, or a dict merged as a config
        ckpt: path/last.ckpt                         # optional: evaluate this checkpoint, no training
        data_differs: [num_input_views]              # optional: accept (and flag) these data keys

With ``--configs`` every file is an entry named by its file name; the first one's ``data:`` block
(or ``--data FILE``) is forced on all of them.

**Same protocol.** Every entry is resolved first (``recon3d fit --print_config``). Their ``data``
blocks must agree on every key that decides the held-out objects and views (dataset, split sizes,
seed, view sampling, target views and resolution, background, ...); only the keys in
:data:`METHOD_DATA_KEYS` (batch sizes, workers, input resolution, training view sampling) may differ,
and, when the data names a separate ``test_dataset`` (the held-out set), the training-side
:data:`TRAIN_SIDE_WITH_TEST_SET` (``dataset``, ``val_dataset``, split sizes: each method's own
training data).
A difference elsewhere stops the command with one line, unless the entry names the key under
``data_differs``; then the row is flagged in ``results.md``. The entries' evaluation protocols must be
equal too (``evaluation:`` forces one). Training runs ``recon3d fit`` with the budget as
``--trainer.max_steps`` / ``--trainer.max_time`` (``max_epochs`` unlimited), evaluation runs
``recon3d test`` on the datamodule's test split.

**Output** (``--out``): ``runs/<name>/`` (each entry's run folder: config.yaml, metrics.csv,
checkpoints/, test/metrics.json and per_object.csv, ``views.pt``: its renders of the first
``grid_objects`` held-out objects, ``done.json``), ``configs/<name>.yaml`` (the resolved config),
``results.json``, ``results.md``, ``plots/*.png``, ``grid.png``, ``environment.json`` (package
versions, git commit, command) — see :mod:`recon3d.commands.compare_report`.

**Resumable.** ``runs/<name>/done.json`` is written last; an entry that has it is not run again. An
entry without it continues from its ``checkpoints/last.ckpt`` (``fit --ckpt_path last
--fresh_if_missing true``). A failed entry writes ``failed.json`` (its one-line reason), the others
go on, and the command exits 1; running it again retries the failed entry from its last checkpoint.

**Several devices.** Started by a launcher Lightning recognises (``torchrun --nproc_per_node N``,
SLURM ``srun``), process ``r`` of ``W`` (Lightning's cluster environment) runs entries
``r, r + W, ...``, each as a one-device run on its local device, with the launcher's distributed
variables hidden from it (each entry is a separate single-process run, not one DDP job); rank 0
then waits for every entry's marker in the shared ``--out`` folder and writes the report. Entries
that need more than one device each are not split this way: run them one per command.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recon3d.commands import OneLineParser
from recon3d.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]

#: ``data`` keys an entry may set differently from the others: they change what a method is fed or
#: how fast, not which held-out objects and target views are scored.
METHOD_DATA_KEYS = frozenset({"batch_size", "eval_batch_size", "num_workers", "input_resolution", "train_view_sampling",
                              "on_bad_sample"})
#: With a separate ``test_dataset`` (the held-out set, e.g. GSO renders), these are training-side
#: too: each method may train on its own data.
TRAIN_SIDE_WITH_TEST_SET = frozenset({"dataset", "val_dataset", "num_val_objects", "num_test_objects"})
#: Evaluation-protocol keys that change speed, not values.
_EVAL_SPEED_KEYS = frozenset({"backend", "lpips_chunk"})
#: Environment variables of a distributed launch, hidden from each entry's single-process run.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
             "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
             "TORCHELASTIC_MAX_RESTARTS", "GROUP_WORLD_SIZE", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_PROCID",
             "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_NAME")
DONE, FAILED, VIEWS = "done.json", "failed.json", "views.pt"


@dataclass
class Entry:
    """One config of a suite: ``name``, ``config`` (path), ``overrides`` (CLI args or a dict; the
    text ``{out}`` in an argument is the output folder), optional ``ckpt`` (evaluate it, no
    training), ``data_differs`` (accepted data keys), ``after`` (earlier entries that must have
    finished first, e.g. the base whose checkpoint a boosting entry starts from) and ``note``
    (shown under the table)."""

    name: str
    config: Path
    overrides: list[str] | dict = field(default_factory=list)
    ckpt: Path | None = None
    data_differs: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    note: str = ""


@dataclass
class Suite:
    """A parsed suite file (module docstring)."""

    entries: list[Entry]
    budget: dict[str, Any] = field(default_factory=dict)
    data: dict | list[str] | None = None
    evaluation: dict | None = None
    metrics: list[str] | None = None
    grid_objects: int = 4
    source: str = "--configs"
    description: str = ""
    papers: dict = field(default_factory=dict)


_BUDGET_KEYS = ("max_steps", "max_time", "val_every", "checkpoint_every")
_SUITE_KEYS = ("entries", "budget", "data", "evaluation", "metrics", "grid_objects", "description", "name", "papers")
_ENTRY_KEYS = ("name", "config", "overrides", "ckpt", "data_differs", "after", "note")


def _find_file(value: Any, where: str, base: Path | None) -> Path:
    """A config/checkpoint path as given, else relative to the suite file's folder, else to the
    source checkout (``configs/...`` works from any working directory)."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ConfigError(f"{where}: expected a file path, got {value!r}")
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [p, *([base / p] if base else []), ROOT / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise ConfigError(f"{where}: {value}: no such file (looked in {', '.join(dict.fromkeys(str(c.parent) for c in candidates))})")


def is_suite_file(path: str | os.PathLike) -> bool:
    """True for a suite file (a YAML mapping with ``entries:``), not a LightningCLI config."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(doc, dict) and "entries" in doc


def _check_budget(budget: Any, where: str) -> dict:
    if budget is None:
        return {}
    if not isinstance(budget, dict):
        raise ConfigError(f"{where}: expected a mapping with {', '.join(_BUDGET_KEYS)}, got {budget!r}")
    bad = sorted(set(budget) - set(_BUDGET_KEYS))
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {bad}; expected {', '.join(_BUDGET_KEYS)}")
    for key in ("max_steps", "val_every", "checkpoint_every"):
        v = budget.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{where}.{key}: expected an integer >= 1, got {v!r}")
    t = budget.get("max_time")
    if t is not None and not (isinstance(t, str) and len(t.split(":")) == 4 and all(x.isdigit() for x in t.split(":"))):
        raise ConfigError(f"{where}.max_time: expected 'DD:HH:MM:SS' (Lightning's max_time), got {t!r}")
    return {k: v for k, v in budget.items() if v is not None}


def _check_metrics(metrics: Any, where: str) -> list[str] | None:
    from recon3d.metrics.protocol import METRIC_NAMES

    if metrics is None:
        return None
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise ConfigError(f"{where}: expected a list of metric names, got {metrics!r}")
    bad = [m for m in metrics if m not in METRIC_NAMES]
    if bad:
        raise ConfigError(f"{where}: unknown metric(s) {bad}; the protocol reports {', '.join(METRIC_NAMES)}")
    return list(metrics)


def load_suite(path: str | os.PathLike) -> Suite:
    """Parse and check a suite file (module docstring); raises :class:`ConfigError` with one line."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"suite {path}: no such file")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"suite {path}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list) or not doc["entries"]:
        raise ConfigError(f"suite {path}: expected a mapping with a non-empty list under 'entries'")
    bad = sorted(set(doc) - set(_SUITE_KEYS))
    if bad:
        raise ConfigError(f"suite {path}: unknown key(s) {bad}; expected {', '.join(_SUITE_KEYS)}")
    entries, seen = [], set()
    for i, e in enumerate(doc["entries"]):
        where = f"suite {path}: entries[{i}]"
        if not isinstance(e, dict):
            raise ConfigError(f"{where}: expected a mapping with name and config, got {e!r}")
        unknown = sorted(set(e) - set(_ENTRY_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; expected {', '.join(_ENTRY_KEYS)}")
        name = e.get("name")
        if not isinstance(name, str) or not name or any(c in name for c in "/\\ ") or name.startswith("."):
            raise ConfigError(f"{where}.name: expected a folder-safe name (no '/', '\\', spaces), got {name!r}")
        if name in seen:
            raise ConfigError(f"{where}.name: {name!r} is used twice")
        seen.add(name)
        overrides = e.get("overrides") or []
        if not isinstance(overrides, (list, dict)) or (isinstance(overrides, list) and not all(isinstance(a, (str, int, float)) for a in overrides)):
            raise ConfigError(f"{where}.overrides: expected a list of CLI arguments or a mapping, got {overrides!r}")
        if isinstance(overrides, list):
            overrides = [str(a) for a in overrides]
        differs = e.get("data_differs") or []
        if not isinstance(differs, list) or not all(isinstance(k, str) for k in differs):
            raise ConfigError(f"{where}.data_differs: expected a list of data keys, got {differs!r}")
        ckpt = _find_file(e["ckpt"], f"{where}.ckpt", p.parent) if e.get("ckpt") else None
        after = e.get("after") or []
        if isinstance(after, str):
            after = [after]
        late = [a for a in after if a not in seen - {name}]
        if late:
            raise ConfigError(f"{where}.after: {late} must name entries listed before {name!r}")
        entries.append(Entry(name, _find_file(e.get("config"), f"{where}.config", p.parent), overrides, ckpt, tuple(differs),
                             tuple(after), str(e.get("note") or "")))
    data = doc.get("data")
    if data is not None and not isinstance(data, (dict, list)):
        raise ConfigError(f"suite {path}: data: expected a data block (mapping) or a list of CLI arguments, got {data!r}")
    ev = doc.get("evaluation")
    if ev is not None and not isinstance(ev, dict):
        raise ConfigError(f"suite {path}: evaluation: expected a mapping (class_path + init_args), got {ev!r}")
    papers = doc.get("papers") or {}
    if not isinstance(papers, dict) or not all(isinstance(v, dict) for v in papers.values()):
        raise ConfigError(f"suite {path}: papers: expected a mapping of paper -> {{data, protocol, ...}}, got {papers!r}")
    grid = doc.get("grid_objects", 4)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 0:
        raise ConfigError(f"suite {path}: grid_objects: expected an integer >= 0, got {grid!r}")
    return Suite(entries, _check_budget(doc.get("budget"), f"suite {path}: budget"),
                 [str(a) for a in data] if isinstance(data, list) else data, ev,
                 _check_metrics(doc.get("metrics"), f"suite {path}: metrics"), grid, str(p), str(doc.get("description") or ""),
                 papers)


def suite_from_configs(configs: list[str], data: str | None = None) -> Suite:
    """The suite of ``--configs A.yaml B.yaml ...``: entries named by file name (``-2``, ... for
    repeats), the data block of ``data`` (a YAML file with ``data:``) or of the first config."""
    import yaml

    entries, names = [], {}
    for i, c in enumerate(configs):
        path = _find_file(c, f"--configs[{i}]", None)
        stem = path.stem
        names[stem] = names.get(stem, 0) + 1
        entries.append(Entry(stem if names[stem] == 1 else f"{stem}-{names[stem]}", path))
    src = _find_file(data, "--data", None) if data else entries[0].config
    block = (yaml.safe_load(src.read_text()) or {}).get("data")
    if not isinstance(block, dict):
        raise ConfigError(f"{'--data' if data else '--configs[0]'} {src}: has no data: block to force on every entry")
    return Suite(entries, {}, block)


# ---------------------------------------------------------------------- command lines of an entry
def _yaml_file(path: Path, doc: dict) -> Path:
    import yaml

    from recon3d.utils.io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(doc, sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return path


def config_args(entry: Entry, suite: Suite, out: Path) -> list[str]:
    """The entry's config arguments shared by ``fit`` and ``test``: its config, the suite's forced
    data and evaluation (as config files under ``out/configs/``), then the entry's overrides."""
    args = ["-c", str(entry.config)]
    if isinstance(suite.data, dict):
        args += ["-c", str(_yaml_file(out / "configs" / "_suite_data.yaml", {"data": suite.data}))]
    elif isinstance(suite.data, list):
        args += suite.data
    if suite.evaluation is not None:
        args += ["-c", str(_yaml_file(out / "configs" / "_suite_evaluation.yaml", {"model": {"init_args": {"evaluation": suite.evaluation}}}))]
    if isinstance(entry.overrides, dict):
        args += ["-c", str(_yaml_file(out / "configs" / f"{entry.name}.overrides.yaml", entry.overrides))]
    else:
        args += [a.replace("{out}", str(out)) for a in entry.overrides]
    return args


def budget_args(budget: dict) -> list[str]:
    """``--trainer.*`` arguments of a budget: a step and/or a wall-time limit (``max_epochs``
    unlimited) and validation every ``val_every`` steps (``checkpoint_every``: see
    :func:`checkpoint_args`). A wall-time budget alone keeps each config's own ``max_steps``: the
    methods' learning-rate schedules are laid out over it (an unlimited step count has no cosine),
    and the time limit stops training first when it is shorter."""
    args = []
    if "max_steps" in budget or "max_time" in budget:
        args += ["--trainer.max_epochs", "-1"]
        if "max_steps" in budget:
            args += ["--trainer.max_steps", str(budget["max_steps"])]
        args += ["--trainer.max_time", str(budget["max_time"]) if "max_time" in budget else "null"]
    if "val_every" in budget:
        args += ["--trainer.val_check_interval", str(budget["val_every"]), "--trainer.check_val_every_n_epoch", "null"]
    return args


_MODEL_CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"


def checkpoint_args(resolved: dict, budget: dict, path: Path) -> list[str]:
    """A ``last.ckpt`` every ``checkpoint_every`` steps (what a killed entry loses at most): the
    entry's resolved callback list with its ``ModelCheckpoint``'s ``every_n_train_steps`` set (one
    is added when it has none; two with equal settings could not share a checkpoint), written to
    ``path`` and returned as ``-c path``. Empty without ``checkpoint_every``."""
    if "checkpoint_every" not in budget:
        return []
    callbacks = [dict(c) for c in ((resolved.get("trainer") or {}).get("callbacks") or [])]
    mine = [c for c in callbacks if str(c.get("class_path")).endswith("ModelCheckpoint") and (c.get("init_args") or {}).get("save_last")]
    if not mine:
        callbacks.append({"class_path": _MODEL_CHECKPOINT, "init_args": {"save_last": True, "save_top_k": 0}})
        mine = callbacks[-1:]
    c = mine[0]
    c["init_args"] = {**(c.get("init_args") or {}), "every_n_train_steps": int(budget["checkpoint_every"]),
                      "train_time_interval": None, "every_n_epochs": None}
    return ["-c", str(_yaml_file(path, {"trainer": {"callbacks": callbacks}}))]


def _logger_args(run_dir: Path) -> list[str]:
    # A CSV logger always: validation curves come from its metrics.csv.
    return ["--trainer.logger.class_path", "lightning.pytorch.loggers.CSVLogger", "--run_dir", str(run_dir)]


# ---------------------------------------------------------------------- resolution and checks
def resolve_config(args: list[str]) -> dict:
    """The resolved config of ``recon3d fit <args>`` (``--print_config``), as a dict."""
    import yaml

    from recon3d.cli import run_lightning_cli

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            run_lightning_cli(["fit", *args, "--print_config"])
    except SystemExit as e:
        if e.code not in (0, None):
            raise ConfigError(f"config does not parse: {' '.join(args)}") from None
    return yaml.safe_load(buf.getvalue()) or {}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _data_key(path: str) -> str:
    """``init_args.batch_size`` / ``batch_size`` -> ``batch_size``; ``init_args.dataset...`` -> ``dataset``."""
    parts = path.split(".")
    if parts[0] == "init_args":
        parts = parts[1:]
    return parts[0] if parts else path


def check_same_protocol(resolved: dict[str, dict], entries: list[Entry]) -> dict[str, dict[str, tuple]]:
    """Refuse entries whose held-out data or evaluation protocol differs from the first entry's.

    Returns ``{entry name: {data key: (its value, the first entry's value)}}`` for the differences
    an entry accepted with ``data_differs`` (flagged in the report); raises :class:`ConfigError`
    (one line naming the entry, the key and both values) for any other difference."""
    ref_name = entries[0].name
    ref_data = _flat(resolved[ref_name].get("data") or {})
    ref_eval = _eval_block(resolved[ref_name])
    own_test_set = any(_data_key(k) == "test_dataset" and v is not None for k, v in ref_data.items())
    free = METHOD_DATA_KEYS | (TRAIN_SIDE_WITH_TEST_SET if own_test_set else frozenset())
    flags: dict[str, dict[str, tuple]] = {}
    for e in entries:
        cfg = resolved[e.name]
        data = _flat(cfg.get("data") or {})
        for key in sorted(set(data) | set(ref_data)):
            top = _data_key(key)
            if top in free or data.get(key) == ref_data.get(key):
                continue
            if top in e.data_differs:
                flags.setdefault(e.name, {})[key.removeprefix("init_args.")] = (data.get(key), ref_data.get(key))
                continue
            raise ConfigError(
                f"compare: entry {e.name!r}: data.{key.removeprefix('init_args.')} is {data.get(key)!r} but "
                f"{ref_data.get(key)!r} in {ref_name!r}: the entries would be scored on different held-out data "
                f"(force one data block in the suite, or accept it with data_differs: [{top}])"
            )
        ev = _eval_block(cfg)
        if ev is None:
            raise ConfigError(f"compare: entry {e.name!r}: its model has no evaluation protocol (model.init_args.evaluation); nothing to compare")
        for key in sorted(set(ev) | set(ref_eval or {})):
            if key.split(".")[-1] in _EVAL_SPEED_KEYS or ev.get(key) == (ref_eval or {}).get(key):
                continue
            raise ConfigError(
                f"compare: metric mismatch: entry {e.name!r} evaluates with evaluation.{key} = {ev.get(key)!r} but "
                f"{ref_name!r} with {(ref_eval or {}).get(key)!r}; give the suite one evaluation: block"
            )
    return flags


def _eval_block(cfg: dict) -> dict | None:
    ev = ((cfg.get("model") or {}).get("init_args") or {}).get("evaluation")
    return None if ev is None else _flat(ev)


# ---------------------------------------------------------------------- ranks
def rank_and_world() -> tuple[int, int, int]:
    """``(global rank, world size, local rank)`` from Lightning's cluster environments (torchrun /
    TorchElastic, SLURM with several tasks); ``(0, 1, 0)`` for a plain process."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for env_cls in (TorchElasticEnvironment, SLURMEnvironment):
        if env_cls.detect():
            env = env_cls() if env_cls is TorchElasticEnvironment else env_cls(auto_requeue=False)
            return env.global_rank(), env.world_size(), env.local_rank()
    return 0, 1, 0


@contextlib.contextmanager
def single_process_env():
    """Hide the launcher's distributed variables while one entry runs as its own one-device job."""
    saved = {k: os.environ.pop(k) for k in _DIST_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# ---------------------------------------------------------------------- one entry
def _write_json(path: Path, doc: dict) -> None:
    from recon3d.utils.io import atomic_write_text

    atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")


def _ckpt_step(path: Path) -> int | None:
    from recon3d.utils.checkpoint import load_state_dict_file

    try:
        ck = load_state_dict_file(str(path))
    except Exception:  # noqa: BLE001 - an unreadable checkpoint only loses the step count
        return None
    return int(ck.get("global_step", 0)) if isinstance(ck, dict) else None


def run_entry(entry: Entry, suite: Suite, out: Path, fit_args: list[str] | None = None, device_args: list[str] | None = None) -> dict:
    """Train (or load) and evaluate one entry in ``out/runs/<name>``; returns its ``done.json``.

    Continues from ``checkpoints/last.ckpt`` when an earlier attempt left one. ``fit_args``: more
    ``fit`` arguments (:func:`checkpoint_args`); ``device_args``: this rank's device. Raises on
    failure (the caller records it)."""
    from recon3d.cli import run_lightning_cli

    run_dir = out / "runs" / entry.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).unlink(missing_ok=True)
    cargs = config_args(entry, suite, out)
    last = run_dir / "checkpoints" / "last.ckpt"
    record: dict[str, Any] = {"name": entry.name, "config": str(entry.config), "overrides": entry.overrides,
                              "budget": suite.budget, "resumed_from_step": _ckpt_step(last) if last.is_file() and not entry.ckpt else None}
    t0 = time.time()
    extra = list(device_args or [])
    with single_process_env():
        if entry.ckpt is None:
            fit = run_lightning_cli(["fit", *cargs, *budget_args(suite.budget), *(fit_args or []), *extra, *_logger_args(run_dir),
                                     "--ckpt_path", "last", "--fresh_if_missing", "true"])
            record["steps"] = int(fit.trainer.global_step)
            ckpt = last
            if not ckpt.is_file():  # a config without a save_last ModelCheckpoint: keep the final state
                fit.trainer.save_checkpoint(str(ckpt))
            del fit
        else:
            ckpt = entry.ckpt
            record["steps"] = _ckpt_step(ckpt)
        record["fit_seconds"] = round(time.time() - t0, 1)
        record["checkpoint"] = str(ckpt)
        t1 = time.time()
        test = run_lightning_cli(["test", *cargs, *extra, *_logger_args(run_dir), "--ckpt_path", str(ckpt)])
        record["test_seconds"] = round(time.time() - t1, 1)
        record["views"] = save_views(test.model, test.datamodule, run_dir / VIEWS, suite.grid_objects)
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _write_json(run_dir / DONE, record)  # last: its presence means "finished"
    return record


def save_views(model, dm, path: Path, n_objects: int) -> str | None:
    """Render the first ``n_objects`` held-out objects at their target cameras and save
    ``{"object_ids": [K], "inputs": (K, Vi, 3, H, W), "preds", "targets": (K, Vt, 3, h, w)}``
    (float16 on the CPU) for the side-by-side grid; None when there are no target views."""
    import torch

    if n_objects == 0:
        return None
    ids, inputs, preds, targets = [], [], [], []
    device = next(iter(model.parameters()), torch.zeros(())).device
    model.eval()
    with torch.no_grad():
        for batch in dm.test_dataloader():
            if batch.targets is None or batch.targets.images is None or batch.targets.images.shape[1] == 0:
                return None
            batch = batch.to(device)
            rec = model.reconstruct(batch)
            pred = model.render_reconstruction(rec, batch.targets.cameras)["rgb"].clamp(0, 1)
            ids += list(batch.object_ids)
            inputs.append(batch.inputs.images.cpu())
            preds.append(pred.cpu())
            targets.append(batch.targets.images.cpu())
            if len(ids) >= n_objects:
                break
    if not ids:
        return None
    k = min(n_objects, len(ids))
    doc = {"object_ids": ids[:k], "inputs": torch.cat(inputs)[:k].half(), "preds": torch.cat(preds)[:k].half(),
           "targets": torch.cat(targets)[:k].half()}
    tmp = path.with_suffix(".pt.tmp")
    torch.save(doc, tmp)
    os.replace(tmp, path)
    return str(path)


def _wait_for(out: Path, entry: Entry, poll: float = 2.0) -> None:
    """Block until the entries named in ``entry.after`` have finished (another rank may run them);
    raise when one of them failed."""
    while True:
        states = {a: entry_state(out, a) for a in entry.after}
        bad = [a for a, s in states.items() if s == "failed"]
        if bad:
            raise ConfigError(f"entry {entry.name!r} needs {bad}, which failed (see runs/{bad[0]}/{FAILED})")
        if all(s == "done" for s in states.values()):
            return
        time.sleep(poll)


def entry_state(out: Path, name: str) -> str:
    """``"done"``, ``"failed"`` or ``"pending"`` from the entry's marker files."""
    run_dir = out / "runs" / name
    if (run_dir / DONE).is_file():
        return "done"
    if (run_dir / FAILED).is_file():
        return "failed"
    return "pending"


# ---------------------------------------------------------------------- the command
def _device_args(resolved: dict, world: int, local_rank: int) -> list[str]:
    """One device per rank: the rank's local GPU when the entry trains on GPUs."""
    if world == 1:
        return []
    acc = str(((resolved.get("trainer") or {}).get("accelerator")) or "auto").lower()
    if acc in ("gpu", "cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            return ["--trainer.accelerator", "gpu", "--trainer.devices", f"[{local_rank}]", "--trainer.num_nodes", "1"]
    return ["--trainer.devices", "1", "--trainer.num_nodes", "1"]


def main(argv: list[str]) -> int:
    p = OneLineParser(prog="recon3d compare", description=__doc__.split("\n\n")[0])
    p.add_argument("suite", nargs="?", help="a suite file (configs/compare/*.yaml)")
    p.add_argument("--configs", nargs="+", default=None, help="configs to compare instead of a suite (one entry each)")
    p.add_argument("--out", default=None, help="output folder (default: outputs/compare/<suite name>)")
    p.add_argument("--data", default=None, help="with --configs: a YAML file whose data: block every entry uses (default: the first config's)")
    p.add_argument("--max_steps", type=int, default=None, help="training budget in steps (overrides the suite's)")
    p.add_argument("--max_time", default=None, help="training budget in wall time, DD:HH:MM:SS (overrides the suite's)")
    p.add_argument("--val_every", type=int, default=None, help="validate every N steps (the metric-vs-step plots)")
    p.add_argument("--checkpoint_every", type=int, default=None, help="save last.ckpt every N steps (what a killed run loses)")
    p.add_argument("--metrics", nargs="+", default=None, help="the table's columns (default: the suite's, else every metric reported)")
    p.add_argument("--grid_objects", type=int, default=None, help="held-out objects in grid.png")
    p.add_argument("--report_only", action="store_true", help="only (re)write the report from the finished entries")
    p.add_argument("--wait_timeout", type=float, default=24 * 3600.0, help="rank 0: seconds to wait for other ranks' entries")
    a = p.parse_args(argv)
    if bool(a.suite) == bool(a.configs):
        raise ConfigError("recon3d compare: give a suite file or --configs A.yaml B.yaml ..., not both and not neither (recon3d compare --help)")
    if a.suite and is_suite_file(a.suite) is False and Path(a.suite).is_file():
        raise ConfigError(f"recon3d compare: {a.suite} is not a suite file (no entries: list); to compare configs use --configs {a.suite} ...")
    suite = load_suite(a.suite) if a.suite else suite_from_configs(a.configs, a.data)
    if a.configs is None and a.data:
        raise ConfigError("recon3d compare: --data goes with --configs; a suite file has its own data: block")
    overrides = {k: getattr(a, k) for k in _BUDGET_KEYS if getattr(a, k) is not None}
    suite.budget = _check_budget({**suite.budget, **overrides}, "budget")
    if a.metrics is not None:
        suite.metrics = _check_metrics(a.metrics, "--metrics")
    if a.grid_objects is not None:
        if a.grid_objects < 0:
            raise ConfigError(f"--grid_objects: expected an integer >= 0, got {a.grid_objects}")
        suite.grid_objects = a.grid_objects
    out = Path(a.out or (ROOT / "outputs" / "compare" / (Path(a.suite).stem if a.suite else "configs")))
    return run_suite(suite, out, report_only=a.report_only, wait_timeout=a.wait_timeout, argv=argv)


def run_suite(suite: Suite, out: Path, report_only: bool = False, wait_timeout: float = 24 * 3600.0,
              argv: list[str] | None = None) -> int:
    """Check, run (this rank's share of) and report a suite; returns the exit status (0 every entry
    finished, 1 some failed)."""
    from recon3d.cli import error_line
    from recon3d.commands import compare_report as report

    rank, world, local_rank = rank_and_world()
    out.mkdir(parents=True, exist_ok=True)
    # Every rank resolves and checks every entry, so a bad suite stops all of them the same way.
    resolved = {e.name: resolve_config([*config_args(e, suite, out), *budget_args(suite.budget)]) for e in suite.entries}
    flags = check_same_protocol(resolved, suite.entries)
    ckpt_args = {e.name: checkpoint_args(resolved[e.name], suite.budget, out / "configs" / f"{e.name}.callbacks.yaml")
                 for e in suite.entries}
    if any(ckpt_args.values()):  # the saved configs show the callbacks the entries train with
        resolved = {e.name: resolve_config([*config_args(e, suite, out), *budget_args(suite.budget), *ckpt_args[e.name]])
                    for e in suite.entries}
    if rank == 0:
        import yaml

        from recon3d.utils.io import atomic_write_text

        for name, cfg in resolved.items():
            # a finished entry keeps the config it ran with (the suite file may have changed since)
            if entry_state(out, name) != "done" or not (out / "configs" / f"{name}.yaml").is_file():
                atomic_write_text(out / "configs" / f"{name}.yaml", yaml.safe_dump(cfg, sort_keys=False))
    failed = 0
    if not report_only:
        mine = [e for i, e in enumerate(suite.entries) if i % world == rank]
        for e in mine:
            state = entry_state(out, e.name)
            if state == "done":
                print(f"recon3d compare: {e.name}: finished earlier ({out / 'runs' / e.name / DONE}); not run again", file=sys.stderr)
                continue
            print(f"recon3d compare: {e.name}: {'retrying' if state == 'failed' else 'running'} ({e.config.name}"
                  f"{', rank ' + str(rank) if world > 1 else ''})", file=sys.stderr)
            try:
                _wait_for(out, e)
                run_entry(e, suite, out, ckpt_args[e.name], _device_args(resolved[e.name], world, local_rank))
            except Exception as err:  # noqa: BLE001 - one entry's failure is recorded; the others go on
                line = error_line(err) or f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
                _write_json(out / "runs" / e.name / FAILED, {"name": e.name, "error": line,
                                                              "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                print(f"recon3d compare: {e.name}: failed: {line}", file=sys.stderr)
                failed += 1
    if rank != 0:
        return 1 if failed else 0
    deadline = time.time() + wait_timeout
    while world > 1 and any(entry_state(out, e.name) == "pending" for e in suite.entries) and time.time() < deadline:
        time.sleep(2.0)
    report.write_report(out, suite, flags, argv=argv)
    states = {e.name: entry_state(out, e.name) for e in suite.entries}
    print(f"recon3d compare: {sum(s == 'done' for s in states.values())}/{len(states)} entries finished; "
          f"{out / 'results.md'}", file=sys.stderr)
    return 0 if all(s == "done" for s in states.values()) else 1
