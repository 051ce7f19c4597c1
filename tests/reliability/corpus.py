"""The bad-input corpus of issue 7 across data, configs and checkpoints.

Each case builds its broken input under a folder and runs it the way a user would meet it:
config and checkpoint cases through the real CLI (``recon3d.cli.main``, in-process), data cases
through the dataset readers (the 43 cases of :mod:`tests.data.bad_inputs`). A case passes when
it ends in exactly one ``recon3d: error:`` line (exit status 2 for the CLI) that contains the
expected text, with no traceback, and no file of the case changed, lost or half-written.

``python scripts/bad_input_table.py`` runs the corpus and writes ``docs/bad_input_corpus.md``.

Outcomes (``Case.outcome``): ``"refused"`` (the one-line error above) or ``"correct"`` (exit
status 0 and a result checked against an independent reference, e.g. an image decoded by
OpenCV): an input is either refused with a clear line or handled right, never accepted with a
wrong result. Issue 13 added cases of both kinds (:data:`ISSUE13_CASES`, which construct the
classes directly), and the same mistakes through the command line plus the CLI's own
(:data:`CLI_CASES`: constructor errors inside jsonargparse's Union message, a negative number as
a value, ``--ckpt_path last`` without a checkpoint, a fresh fit into a finished run, output
folders that are files, read-only, forbidden or full, an accelerator that is not there). No
refused CLI case may leave a run folder holding only ``config.yaml`` behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.reliability.harness import CONFIGS, REPO

TOY = CONFIGS[0]


@dataclass
class Outcome:
    rc: int
    error_lines: list[str]
    traceback: bool
    text: str
    inputs_changed: bool = False


@dataclass
class Case:
    name: str
    category: str
    what: str
    expected: str
    run: Callable[[Path, Path], Outcome]  # (case folder, synthetic cache) -> outcome
    outcome: str = "refused"  # or "correct": exit 0 with a verified result


def _cli(argv: list[str]) -> Outcome:
    from recon3d.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # pragma: no cover - main() must not exit on its own
            rc = int(e.code or 0) + 1000
    text = out.getvalue() + err.getvalue()
    lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("recon3d: error:")]
    return Outcome(rc, lines, "Traceback" in text, text)


def _fit(d: Path, cache: Path, *extra: str, config: str | None = None) -> Outcome:
    argv = ["fit", "-c", config or str(REPO / TOY.config), "--data.dataset.init_args.cache_dir", str(cache),
            "--trainer.logger.init_args.save_dir", str(d / "out"), "--trainer.max_epochs", "1", "--trainer.max_steps", "1"]
    before = snapshot(d)
    o = _cli(argv + list(extra))
    o.inputs_changed = snapshot(d) != before
    return o


# ---------------------------------------------------------------------- config cases
def _yaml(d: Path, text: str) -> str:
    d.mkdir(parents=True, exist_ok=True)
    (d / "cfg.yaml").write_text(text)
    return str(d / "cfg.yaml")


def _missing_dataset_config(d: Path) -> str:
    text = (REPO / TOY.config).read_text()
    start = text.index("data:\n  dataset:")
    end = text.index("  num_val_objects")
    return _yaml(d, text[:start] + "data:\n" + text[end:])


CONFIG_CASES = [
    Case("unknown model key", "config", "--model.init_args.bogus 1", "Option 'bogus' is not accepted",
         lambda d, c: _fit(d, c, "--model.init_args.bogus", "1")),
    Case("unknown trainer key", "config", "--trainer.bogus 3", "unrecognized arguments: --trainer.bogus",
         lambda d, c: _fit(d, c, "--trainer.bogus", "3")),
    Case("unknown key in a YAML file", "config", "data: {bogus_key: 1}", "bogus_key",
         lambda d, c: _fit(d, c, "-c", _yaml(d, "data:\n  bogus_key: 1\n"))),
    Case("wrong type (int)", "config", "--data.batch_size abc", 'Parser key "data.batch_size": Expected a <class \'int\'>',
         lambda d, c: _fit(d, c, "--data.batch_size", "abc")),
    Case("wrong type (float, nested)", "config", "--model.init_args.lr abc", "Expected a <class 'float'>. Got value: abc",
         lambda d, c: _fit(d, c, "--model.init_args.lr", "abc")),
    Case("value outside a Literal", "config", "--data.on_bad_sample ignore", "data.on_bad_sample",
         lambda d, c: _fit(d, c, "--data.on_bad_sample", "ignore")),
    Case("invalid value", "config", "--data.batch_size 0", "batch_size >= 1",
         lambda d, c: _fit(d, c, "--data.batch_size", "0")),
    Case("missing required", "config", "config without data.dataset", "dataset",
         lambda d, c: _fit(d, c, config=_missing_dataset_config(d))),
    Case("bad class_path", "config", "--model.class_path recon3d.methods.nope.Nope", "recon3d.methods.nope.Nope",
         lambda d, c: _fit(d, c, "--model.class_path", "recon3d.methods.nope.Nope")),
    Case("config file missing", "config", "-c /nonexistent.yaml", "File does not exist",
         lambda d, c: _fit(d, c, "-c", str(d / "nonexistent.yaml"))),
    Case("YAML syntax error", "config", "a file with 'trainer: [unclosed'", "Problems parsing config: while parsing a flow sequence",
         lambda d, c: _fit(d, c, "-c", _yaml(d, "trainer: [unclosed\n"))),
]


# ---------------------------------------------------------------------- checkpoint cases
_GOOD: dict[str, Path] = {}


def good_checkpoint(cache: Path, root: Path) -> Path:
    """A real 1-step toy checkpoint (made once per cache)."""
    key = str(cache)
    if key not in _GOOD:
        d = root / "_good"
        o = _fit(d, cache)
        assert o.rc == 0, o.text[-2000:]
        _GOOD[key] = d / "out" / "run" / "checkpoints" / "last.ckpt"
    return _GOOD[key]


class _Planted:
    """Unpickling this runs ``os.mkdir(marker)``: stands for any code a stranger's pickle could run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _ckpt_case(build: Callable[[Path, Path], Path], *args: str, flag: str = "--ckpt_path"):
    def run(d: Path, cache: Path) -> Outcome:
        d.mkdir(parents=True, exist_ok=True)
        path = build(d, good_checkpoint(cache, d.parent))
        return _fit(d, cache, flag, str(path), *args)

    return run


def _garbage(d, good):
    (d / "x.ckpt").write_bytes(b"this is not a checkpoint\n" * 10)
    return d / "x.ckpt"


def _truncated(d, good):
    data = good.read_bytes()
    (d / "t.ckpt").write_bytes(data[: len(data) // 2])
    return d / "t.ckpt"


def _pickled(d, good):
    ck = torch.load(good, weights_only=True)
    ck["extra"] = _Planted(str(d / "PWNED"))
    torch.save(ck, d / "p.ckpt")
    return d / "p.ckpt"


def _renamed_key(d, good):
    ck = torch.load(good, weights_only=True)
    sd = ck["state_dict"]
    sd["decoder.9.weight"] = sd.pop("decoder.0.weight")
    torch.save(ck, d / "k.ckpt")
    return d / "k.ckpt"


def _wrong_shape(d, good):
    ck = torch.load(good, weights_only=True)
    ck["state_dict"]["base_planes"] = torch.zeros(3, 4, 16, 16)
    torch.save(ck, d / "s.ckpt")
    return d / "s.ckpt"


def _bare_state_dict(d, good):
    torch.save(torch.load(good, weights_only=True)["state_dict"], d / "w.pt")
    return d / "w.pt"


def _weights_wrong_shape(d, good):
    from safetensors.torch import save_file

    sd = dict(torch.load(good, weights_only=True)["state_dict"])
    sd["base_planes"] = torch.zeros(3, 4, 16, 16)
    save_file(sd, str(d / "w.safetensors"))
    return d / "w.safetensors"


def _weights_garbage(d, good):
    (d / "g.safetensors").write_bytes(b"\x00\x01garbage" * 5)
    return d / "g.safetensors"


def _missing(d, good):
    return d / "does_not_exist.ckpt"


CHECKPOINT_CASES = [
    Case("not a checkpoint", "checkpoint", "--ckpt_path: a text file", "not a PyTorch checkpoint", _ckpt_case(_garbage)),
    Case("truncated checkpoint", "checkpoint", "--ckpt_path: first half of a real .ckpt", "not a PyTorch checkpoint", _ckpt_case(_truncated)),
    Case("pickled code (--ckpt_path)", "checkpoint", "--ckpt_path: .ckpt with an object whose unpickling runs os.mkdir",
         "refused to load", _ckpt_case(_pickled)),
    Case("pickled code (init_weights)", "checkpoint", "--model.init_args.init_weights: the same file", "refused to load",
         _ckpt_case(_pickled, flag="--model.init_args.init_weights")),
    Case("mismatched keys", "checkpoint", "--ckpt_path: a key renamed", "1 missing (e.g. ['decoder.0.weight']); 1 unexpected",
         _ckpt_case(_renamed_key)),
    Case("mismatched shapes", "checkpoint", "--ckpt_path: base_planes 16x16 instead of 8x8", "base_planes (3, 4, 16, 16) vs (3, 4, 8, 8)",
         _ckpt_case(_wrong_shape)),
    Case("bare weights as --ckpt_path", "checkpoint", "--ckpt_path: a plain state dict", "not a Lightning training checkpoint",
         _ckpt_case(_bare_state_dict)),
    Case("init_weights wrong shapes", "checkpoint", "--model.init_args.init_weights: .safetensors with another shape",
         "base_planes (3, 4, 16, 16) vs (3, 4, 8, 8)", _ckpt_case(_weights_wrong_shape, flag="--model.init_args.init_weights")),
    Case("init_weights corrupt safetensors", "checkpoint", "--model.init_args.init_weights: garbage .safetensors",
         "not a readable safetensors file", _ckpt_case(_weights_garbage, flag="--model.init_args.init_weights")),
    Case("checkpoint file missing", "checkpoint", "--ckpt_path: no such file", "not found", _ckpt_case(_missing)),
]


# ---------------------------------------------------------------------- data cases
def _data_case(fn) -> Case:
    def run(d: Path, cache: Path) -> Outcome:
        from recon3d.errors import Recon3DError
        from tests.data.bad_inputs import load_all

        factory, expected = fn(d)
        before = snapshot(d)
        try:
            load_all(factory())
            o = Outcome(0, [], False, "no error")
        except Recon3DError as e:
            msg = f"recon3d: error: {e}"
            o = Outcome(2, msg.splitlines(), False, msg)
            if expected not in msg:
                o.error_lines = []
                o.text = f"{msg} (expected {expected!r})"
        except Exception as e:  # a raw library error: the case fails
            o = Outcome(1, [], True, f"{type(e).__name__}: {e}")
        o.inputs_changed = snapshot(d) != before
        return o

    return run


def data_cases() -> list[Case]:
    from tests.data.bad_inputs import CASES

    out = []
    for fn in CASES:
        doc = (fn.__doc__ or fn.__name__).strip().splitlines()[0]
        out.append(Case(fn.__name__.removeprefix("case_").replace("_", " "), "data", doc, "<case's own>", _data_case(fn)))
    return out


# ---------------------------------------------------------------------- issue 13
def _construct(build: Callable[[], object]) -> Callable[[Path, Path], Outcome]:
    """Run ``build()`` (a constructor with a bad option); a recon3d error is the one line."""

    def run(d: Path, cache: Path) -> Outcome:
        from recon3d.errors import Recon3DError

        try:
            build()
            return Outcome(0, [], False, "no error")
        except Recon3DError as e:
            msg = f"recon3d: error: {e}"
            return Outcome(2, msg.splitlines(), False, msg)
        except Exception as e:  # a raw library error: the case fails
            return Outcome(1, [], True, f"{type(e).__name__}: {e}")

    return run


def _gtr(**kw):
    from recon3d.methods.gtr import GTRModule

    return lambda: GTRModule(lambda_lpips=0.0, **kw)


def _m3d(**kw):
    from recon3d.methods.m3d import M3DModule

    return lambda: M3DModule(**kw)


def _protocol(**kw):
    from recon3d.metrics.protocol import EvaluationProtocol

    return lambda: EvaluationProtocol(**kw)


def _as_m3d(d, good):
    """The toy checkpoint relabelled as an M3D run with M3D-like keys (no key shared)."""
    ck = torch.load(good, weights_only=True)
    ck["state_dict"] = {"net.shallow.stem.0.weight": torch.zeros(8, 3, 3, 3), "density.beta": torch.zeros(())}
    ck.setdefault("hyper_parameters", {})["_class_path"] = "recon3d.methods.m3d.M3DModule"
    torch.save(ck, d / "m3d.ckpt")
    return d / "m3d.ckpt"


def _export(build: Callable[[Path, Path], Path]):
    def run(d: Path, cache: Path) -> Outcome:
        d.mkdir(parents=True, exist_ok=True)
        path = build(d, good_checkpoint(cache, d.parent))
        before = snapshot(d)
        o = _cli(["export", "-c", str(REPO / TOY.config), "--ckpt", str(path), "--out", str(d / "out"), "--",
                  "--data.dataset.init_args.cache_dir", str(cache)])
        o.inputs_changed = snapshot(d) != before
        if (d / "out" / "exports.json").exists():
            o.error_lines, o.text = [], "exports.json written from weights that do not fit"
        return o

    return run


def _decoded_right(write: Callable[[Path], None], atol: float) -> Callable[[Path, Path], Outcome]:
    """A Blender object whose ``r_0.png`` is written by ``write``: it must load (exit 0) with the
    values OpenCV decodes from the same file (RGB, and alpha where OpenCV finds one)."""

    def run(d: Path, cache: Path) -> Outcome:
        import json

        import cv2
        import numpy as np

        from recon3d.data.formats import BlenderDataset

        obj = d / "obj"
        (obj / "train").mkdir(parents=True, exist_ok=True)
        write(obj / "train" / "r_0.png")
        pose = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
        (obj / "transforms_train.json").write_text(json.dumps(
            {"camera_angle_x": 0.69, "frames": [{"file_path": "./train/r_0", "transform_matrix": pose}]}))
        before = snapshot(d)
        try:
            raw = BlenderDataset(str(d)).load_views(0, [0])
        except Exception as e:
            return Outcome(1, [], False, f"refused a valid image: {type(e).__name__}: {e}")
        ref = cv2.imdecode(np.fromfile(str(obj / "train" / "r_0.png"), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        ref = ref.astype(np.float64) / (65535.0 if ref.dtype == np.uint16 else 255.0)
        ref = np.repeat(ref[..., None], 3, -1) if ref.ndim == 2 else ref[..., [2, 1, 0, 3][: ref.shape[-1]]]
        got = raw.rgb[0].permute(1, 2, 0).double().numpy()
        err = float(np.abs(got - ref[..., :3]).max())
        has_alpha = ref.shape[-1] == 4
        if has_alpha != (raw.alpha is not None):
            return Outcome(1, [], False, f"alpha {'lost' if has_alpha else 'invented'}")
        if has_alpha:
            err = max(err, float(np.abs(raw.alpha[0, 0].double().numpy() - ref[..., 3]).max()))
        o = Outcome(0 if err <= atol else 1, [], False, f"decoded as OpenCV does (max error {err:.2g})" if err <= atol
                    else f"WRONG VALUES: max error {err:.3g} against OpenCV")
        o.inputs_changed = snapshot(d) != before
        return o

    return run


def _pil_writer(make: Callable[[], object], **save) -> Callable[[Path], None]:
    return lambda p: make().save(p, **save)


def _images():
    import numpy as np
    from PIL import Image

    rgba = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    return rgba, Image


def _palette_trns(p: Path) -> None:
    rgba, Image = _images()
    Image.fromarray(rgba[..., :3]).quantize(8).save(p, transparency=2)


def _one_bit(p: Path) -> None:
    rgba, Image = _images()
    Image.fromarray(rgba[..., 0] > 127).save(p)


def _cmyk(p: Path) -> None:
    rgba, Image = _images()
    Image.fromarray(rgba[..., :3]).convert("CMYK").save(p, format="JPEG", quality=100)


def _rgba16(p: Path) -> None:
    import cv2
    import numpy as np

    cv2.imwrite(str(p), np.random.default_rng(1).integers(0, 65536, (8, 8, 4), dtype=np.uint16))


def issue13_data_cases() -> list[Case]:
    from tests.data.bad_inputs import BATCH_CASES

    return [Case(fn.__name__.replace("_", " "), "data", (fn.__doc__ or "").strip().splitlines()[0], "<case's own>", _data_case(fn))
            for fn in BATCH_CASES]


ISSUE13_CASES = [
    Case("NaN loss weight (GTR)", "config", "GTRModule(mesh_loss_weights={depth: nan})",
         "model.mesh_loss_weights.depth: expected a finite number, got nan", _construct(_gtr(mesh_loss_weights={"depth": float("nan")}))),
    Case("NaN loss weight (M3D)", "config", "M3DModule(loss_weights={rgb: nan})",
         "model.loss_weights.rgb: expected a finite number, got nan", _construct(_m3d(loss_weights={"rgb": float("nan")}))),
    Case("NaN lambda (GTR)", "config", "GTRModule(lambda_mask=nan)", "model.lambda_mask: expected a finite number",
         _construct(_gtr(lambda_mask=float("nan")))),
    Case("negative lr", "config", "GTRModule(lr=-1e-3)", "model.lr: expected a number > 0, got -0.001", _construct(_gtr(lr=-1e-3))),
    Case("negative weight_decay", "config", "M3DModule(weight_decay=-0.1)", "model.weight_decay: expected a number >= 0, got -0.1",
         _construct(_m3d(weight_decay=-0.1))),
    Case("n_samples 0", "config", "GTRModule(n_samples=0)", "model.n_samples: expected an integer >= 1, got 0", _construct(_gtr(n_samples=0))),
    Case("unknown image metric", "config", "EvaluationProtocol(image_metrics=[psnr, bogus])",
         "evaluation.image_metrics: unknown ['bogus']", _construct(_protocol(image_metrics=["psnr", "bogus"]))),
    Case("init_weights of another method", "checkpoint", "--model.init_args.init_weights: an M3D checkpoint on the toy config",
         "this checkpoint is an M3DModule, the config is a ToyTriplaneModule", _ckpt_case(_as_m3d, flag="--model.init_args.init_weights")),
    Case("init_weights missing keys", "checkpoint", "--model.init_args.init_weights: a key renamed (was loaded with strict=False)",
         "1 missing (e.g. ['decoder.0.weight']); 1 unexpected", _ckpt_case(_renamed_key, flag="--model.init_args.init_weights")),
    Case("export with another method's checkpoint", "checkpoint", "recon3d export --ckpt: an M3D checkpoint on the toy config",
         "this checkpoint is an M3DModule, the config is a ToyTriplaneModule", _export(_as_m3d)),
    Case("palette PNG with transparency", "data", "r_0.png: P mode with a tRNS entry", "alpha from tRNS",
         _decoded_right(_palette_trns, 1e-6), outcome="correct"),
    Case("1-bit PNG", "data", "r_0.png: mode 1 (white must be 1.0, not 1/255)", "0/1 values",
         _decoded_right(_one_bit, 1e-6), outcome="correct"),
    Case("CMYK JPEG", "data", "r_0.png: a CMYK JPEG (K is not alpha)", "RGB, no alpha",
         _decoded_right(_cmyk, 2 / 255), outcome="correct"),
    Case("16-bit RGBA PNG", "data", "r_0.png: 16 bits per channel (PIL keeps 8)", "full precision",
         _decoded_right(_rgba16, 1e-6), outcome="correct"),
]


# ---------------------------------------------------------------------- issue 13, part B: the command line
GTR_CPU = str(REPO / "configs" / "gtr_cpu.yaml")


@contextlib.contextmanager
def deny_writes(folder: Path, code: int, mkdir: bool = True):
    """While active, creating or writing a file under ``folder`` fails with ``OSError(code)``
    (and, with ``mkdir``, creating a folder there): a read-only (EROFS), forbidden (EACCES) or
    full (ENOSPC) file system, simulated in-process (tests run as root, where permissions do not
    stop writes, and cannot mount one). Reads are untouched."""
    import builtins
    import errno as _errno

    folder = os.path.abspath(folder)
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open
    real_mkdir = os.mkdir

    def under(path) -> bool:
        try:
            return os.path.abspath(os.fspath(path)).startswith(folder + os.sep) or os.path.abspath(os.fspath(path)) == folder
        except TypeError:
            return False

    def fail(path):
        raise OSError(code, os.strerror(code), os.fspath(path))

    def wrapped_open(file, mode="r", *a, **k):
        if under(file) and any(c in mode for c in "wax+"):
            fail(file)
        return real_open(file, mode, *a, **k)

    def wrapped_os_open(path, flags, *a, **k):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            fail(path)
        return real_os_open(path, flags, *a, **k)

    def wrapped_mkdir(path, *a, **k):
        if mkdir and under(path) and not os.path.isdir(path):
            fail(path)
        return real_mkdir(path, *a, **k)

    builtins.open, io.open, os.open, os.mkdir = wrapped_open, wrapped_open, wrapped_os_open, wrapped_mkdir
    try:
        yield _errno
    finally:
        builtins.open, io.open, os.open, os.mkdir = real_open, real_io_open, real_os_open, real_mkdir


def _fit_denied(code: int, where: str, mkdir: bool):
    """A toy fit whose run folder (``where="run"``) or checkpoint folder (``"checkpoints"``) cannot be written."""

    def run(d: Path, cache: Path) -> Outcome:
        target = d / "out" / "run" if where == "run" else d / "out" / "run" / "checkpoints"
        with deny_writes(target, code, mkdir=mkdir):
            return _fit(d, cache)

    return run


def _disk_full_metrics(d: Path, cache: Path) -> Outcome:
    """A real ENOSPC from the kernel: the run's metrics.csv is a link to /dev/full."""
    run_dir = d / "out" / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    if not Path("/dev/full").exists():  # pragma: no cover - not Linux
        return Outcome(2, ["recon3d: error: cannot write metrics.csv: no space left on device (no /dev/full here)"], False, "")
    (run_dir / "metrics.csv").symlink_to("/dev/full")
    return _fit(d, cache)


def _accelerator(d: Path, cache: Path) -> Outcome:
    # On a machine with a GPU, ask for one that is surely absent instead (Apple's MPS).
    return _fit(d, cache, "--trainer.accelerator", "mps" if torch.cuda.is_available() else "gpu")


def _existing_run(d: Path, cache: Path) -> Outcome:
    """A fresh fit into a run folder that holds a checkpoint (would write last-v1.ckpt, drop metrics.csv)."""
    run_dir = d / "held"
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's checkpoint")
    (run_dir / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.0\n")
    return _fit(d, cache, "--run_dir", str(run_dir))


def _export_cli(*extra: str, views: Callable[[Path], Path] | None = None):
    def run(d: Path, cache: Path) -> Outcome:
        d.mkdir(parents=True, exist_ok=True)
        good = good_checkpoint(cache, d.parent)
        args = ["export", "-c", str(REPO / TOY.config), "--ckpt", str(good)]
        if views is not None:
            args += ["--views", str(views(d))]
        before = snapshot(d)
        o = _cli(args + [a.replace("{d}", str(d)) for a in extra] + ["--", "--data.dataset.init_args.cache_dir", str(cache)])
        o.inputs_changed = snapshot(d) != before
        return o

    return run


def _empty_views(d: Path) -> Path:
    (d / "views").mkdir(parents=True, exist_ok=True)
    return d / "views"


def _a_file(d: Path) -> str:
    d.mkdir(parents=True, exist_ok=True)
    (d / "afile").write_text("not a folder\n")
    return str(d / "afile")


def _export_denied(d: Path, cache: Path) -> Outcome:
    with deny_writes(d / "out", 30):  # EROFS
        return _export_cli("--out", "{d}/out")(d, cache)


CLI_CASES = [
    Case("DINOv2 swap without pretrained_path", "config", "README: -c gtr_cpu.yaml -c gtr/dinov2.yaml (pretrained_path null)",
         "DinoV2Encoder: give exactly one of pretrained_path", lambda d, c: _fit(d, c, "-c", str(REPO / "configs/gtr/dinov2.yaml"),
                                                                          config=GTR_CPU)),
    Case("DINOv2 swap with a wrong pretrained_path", "config", "--model.init_args.encoder.init_args.pretrained_path /nonexistent",
         "pretrained_path '/nonexistent/dinov2' is not a directory",
         lambda d, c: _fit(d, c, "-c", str(REPO / "configs/gtr/dinov2.yaml"),
                           "--model.init_args.encoder.init_args.pretrained_path", "/nonexistent/dinov2", config=GTR_CPU)),
    Case("n_samples 0 (command line)", "config", "--model.init_args.n_samples 0", "model.n_samples: expected an integer >= 1, got 0",
         lambda d, c: _fit(d, c, "--model.init_args.n_samples", "0", config=GTR_CPU)),
    Case("unknown image metric (command line)", "config", "--model.init_args.evaluation.init_args.image_metrics [psnr, bogus]",
         "evaluation.image_metrics: unknown ['bogus']",
         lambda d, c: _fit(d, c, "--model.init_args.evaluation.init_args.image_metrics", "[psnr, bogus]", config=GTR_CPU)),
    Case("negative lr (command line)", "config", "--model.init_args.lr -1e-3 (was: 'expected one argument')",
         "model.lr: expected a number > 0, got -0.001", lambda d, c: _fit(d, c, "--model.init_args.lr", "-1e-3")),
    Case("negative weight_decay (command line)", "config", "--model.init_args.weight_decay -0.1",
         "model.weight_decay: expected a number >= 0, got -0.1",
         lambda d, c: _fit(d, c, "--model.init_args.weight_decay", "-0.1", config=GTR_CPU)),
    Case("negative max_steps", "config", "--trainer.max_steps -5", "trainer: `max_steps` must be a non-negative integer",
         lambda d, c: _fit(d, c, "--trainer.max_steps", "-5")),
    Case("accelerator without the device", "config", "--trainer.accelerator gpu on a CPU-only machine", "trainer: ", _accelerator),
    Case("fresh fit into a finished run", "config", "--run_dir of a run with checkpoints/last.ckpt, no --ckpt_path",
         "already holds a run", _existing_run),
    Case("--run_dir is a file", "config", "--run_dir <a file>", "is a file, expected a folder",
         lambda d, c: _fit(d, c, "--run_dir", _a_file(d))),
    Case("unknown command", "config", "recon3d fitt", "unknown command 'fitt' (did you mean 'fit'?)", lambda d, c: _cli(["fitt"])),
    Case("export usage error", "config", "recon3d export (no --ckpt)", "the following arguments are required",
         lambda d, c: _cli(["export", "-c", str(REPO / TOY.config)])),
    Case("--ckpt_path last without a checkpoint", "checkpoint", "README resume on a run that never saved (was: a new run, exit 0)",
         "last.ckpt does not exist", lambda d, c: _fit(d, c, "--ckpt_path", "last")),
    Case("export --out is a file", "output", "recon3d export --out <a file>", "is a file, expected a folder",
         lambda d, c: _export_cli("--out", _a_file(d))(d, c)),
    Case("export --views empty folder", "output", "recon3d export --views <empty folder>", "no objects found",
         _export_cli("--out", "{d}/out", views=_empty_views)),
    Case("read-only output folder (fit)", "output", "the run folder's file system is read-only (EROFS)", "read-only file system",
         _fit_denied(30, "run", mkdir=True)),
    Case("read-only output folder (export)", "output", "recon3d export --out on a read-only file system", "read-only file system",
         _export_denied),
    Case("no permission (fit)", "output", "writing the run folder is forbidden (EACCES)", "permission denied",
         _fit_denied(13, "run", mkdir=True)),
    Case("disk full at the checkpoint", "output", "ENOSPC writing checkpoints/last.ckpt", "no space left on device",
         _fit_denied(28, "checkpoints", mkdir=False)),
    Case("disk full (real ENOSPC)", "output", "metrics.csv on a full device (/dev/full)", "metrics.csv: no space left on device",
         _disk_full_metrics),
]


def all_cases() -> list[Case]:
    return CONFIG_CASES + CHECKPOINT_CASES + data_cases() + ISSUE13_CASES + issue13_data_cases() + CLI_CASES


# ---------------------------------------------------------------------- checking
def snapshot(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "out" not in p.relative_to(folder).parts[:1]}


def check(case: Case, d: Path, cache: Path) -> tuple[bool, str]:
    """Run ``case``; return (passed, the one-line outcome or what went wrong)."""
    d.mkdir(parents=True, exist_ok=True)
    o = case.run(d, cache)
    if case.outcome == "correct":
        problems = [p for p, bad in (("traceback", o.traceback), (f"exit status {o.rc}", o.rc != 0),
                                     ("input files changed", o.inputs_changed)) if bad]
        return not problems, ("; ".join(problems) + " | " if problems else "") + o.text
    problems = []
    if o.traceback:
        problems.append("traceback")
    if len(o.error_lines) != 1:
        problems.append(f"{len(o.error_lines)} error lines")
    if o.rc != 2:
        problems.append(f"exit status {o.rc}")
    line = o.error_lines[0] if o.error_lines else (o.text.strip().splitlines() or [""])[-1]
    if case.category != "data" and case.expected not in line:
        problems.append(f"expected {case.expected!r}")
    if o.inputs_changed:
        problems.append("input files changed")
    if [p for p in d.rglob("*.tmp")]:
        problems.append("temporary file left")
    if (d / "PWNED").exists():
        problems.append("PLANTED CODE RAN")
    left = empty_run_folders(d / "out")
    if left:
        problems.append(f"empty run folder left: {left[0]}")
    return not problems, ("; ".join(problems) + " | " if problems else "") + line


def empty_run_folders(out: Path) -> list[str]:
    """Folders under ``out`` holding nothing but Lightning's ``config.yaml`` / ``hparams.yaml``."""
    if not out.is_dir():
        return []
    keep = {"config.yaml", "hparams.yaml"}
    return [str(p) for p in [out, *out.rglob("*")] if p.is_dir() and not p.is_symlink()
            and not any(f.is_file() and f.name not in keep for f in p.rglob("*"))]
