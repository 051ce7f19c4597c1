"""TRELLIS's ``pipeline.json``: which checkpoints make the pipeline, how to sample, how to de-normalise.

Upstream (``trellis/pipelines/base.py`` ``Pipeline.from_pretrained`` and
``trellis_image_to_3d.py`` ``TrellisImageTo3DPipeline.from_pretrained``) reads
``<folder>/pipeline.json`` = ``{"name": <pipeline class>, "args": {...}}`` with ``args``:

* ``models``: ``{role: "ckpts/<name>"}`` — each role is a ``ckpts/<name>.json`` + ``.safetensors``
  pair (roles of TRELLIS-image-large: ``sparse_structure_decoder``, ``sparse_structure_flow_model``,
  ``slat_flow_model``, ``slat_decoder_gs``, ``slat_decoder_mesh``, ``slat_decoder_rf``);
* ``sparse_structure_sampler`` / ``slat_sampler``: ``{"name": <sampler class>, "args": {"sigma_min"},
  "params": {"steps", "cfg_strength", "cfg_interval", "rescale_t"}}``;
* ``slat_normalization``: ``{"mean": [8], "std": [8]}`` — the SLAT flow samples normalised latents,
  ``slat = sample * std + mean``;
* ``image_cond_model``: the DINOv2 hub name (``dinov2_vitl14_reg``).

:func:`read_pipeline_json` checks all of it and returns a :class:`TrellisPipelineConfig`; a
missing file or key, a value of the wrong kind, or a class recon3d has no counterpart for is
one :class:`~recon3d.errors.ConfigError` naming the file and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recon3d.errors import ConfigError

__all__ = ["TrellisPipelineConfig", "SamplerSpec", "read_pipeline_json", "PIPELINE_CLASSES", "SAMPLER_CLASSES",
           "TRELLIS_IMAGE_LARGE_SLAT_NORMALIZATION"]

#: Pipeline classes whose json recon3d reads (TrellisModule is the image-to-3D one).
PIPELINE_CLASSES = ("TrellisImageTo3DPipeline",)

#: Upstream sampler class -> what it adds over plain Euler (recon3d's FlowEulerSampler does all three).
SAMPLER_CLASSES = {
    "FlowEulerSampler": "no guidance",
    "FlowEulerCfgSampler": "classifier-free guidance",
    "FlowEulerGuidanceIntervalSampler": "classifier-free guidance inside cfg_interval",
}

#: The SLAT normalisation of TRELLIS-image-large (upstream
#: ``configs/generation/slat_flow_img_dit_L_64l8p2_fp16.json`` ``dataset.args.normalization``).
TRELLIS_IMAGE_LARGE_SLAT_NORMALIZATION = {
    "mean": [-2.1687545776367188, -0.004347046371549368, -0.13352349400520325, -0.08418072760105133,
             -0.5271206498146057, 0.7238689064979553, -1.1414450407028198, 1.2039363384246826],
    "std": [2.377650737762451, 2.386378288269043, 2.124418020248413, 2.1748552322387695,
            2.663944721221924, 2.371192216873169, 2.6217446327209473, 2.684523105621338],
}

_SAMPLER_PARAMS = ("steps", "cfg_strength", "cfg_interval", "rescale_t")


@dataclass
class SamplerSpec:
    """One ``*_sampler`` entry: upstream class ``name``, ``sigma_min`` and the sampling params.

    ``params`` keeps only the keys recon3d's :class:`~recon3d.models.flow.FlowEulerSampler`
    takes (``steps``, ``cfg_strength``, ``cfg_interval``, ``rescale_t``)."""

    name: str
    sigma_min: float
    params: dict[str, Any] = field(default_factory=dict)

    def sampler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~recon3d.models.flow.FlowEulerSampler` (TRELLIS's CFG
        convention; a plain ``FlowEulerSampler`` json means no guidance)."""
        kw = {"sigma_min": self.sigma_min, "cfg_convention": "trellis", **self.params}
        if self.name == "FlowEulerSampler":
            kw["cfg_strength"] = 0.0
        if self.name == "FlowEulerCfgSampler":
            kw["cfg_interval"] = (0.0, 1.0)
        return kw


@dataclass
class TrellisPipelineConfig:
    """A checked ``pipeline.json`` (module docstring).

    Attributes:
        path: the json file.
        name: the pipeline class.
        models: ``{role: path of the checkpoint without suffix}``, resolved against the json's folder.
        sparse_structure_sampler, slat_sampler: the two samplers.
        slat_mean, slat_std: the 8-d SLAT normalisation (lists of floats, ``std > 0``).
        image_cond_model: DINOv2 hub name.
    """

    path: Path
    name: str
    models: dict[str, Path]
    sparse_structure_sampler: SamplerSpec
    slat_sampler: SamplerSpec
    slat_mean: list[float]
    slat_std: list[float]
    image_cond_model: str

    def model_json(self, role: str) -> Path:
        """``<ckpt>.json`` of ``role`` (ConfigError naming the file and the roles it has)."""
        if role not in self.models:
            raise ConfigError(f"{self.path}: args.models has no {role!r} (has {sorted(self.models)})")
        return self.models[role].with_name(self.models[role].name + ".json")


def _get(obj: Any, key: str, where: str, path: Path, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ConfigError(f"{path}: missing key {where}{key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ConfigError(f"{path}: {where}{key!r} must be a {names}, got {type(value).__name__}")
    return value


def _sampler(args: dict, key: str, path: Path) -> SamplerSpec:
    spec = _get(args, key, "args.", path, dict)
    where = f"args.{key}."
    name = _get(spec, "name", where, path, str)
    if name not in SAMPLER_CLASSES:
        raise ConfigError(f"{path}: {where}name names an unknown sampler class {name!r}; expected one of {sorted(SAMPLER_CLASSES)}")
    sargs = _get(spec, "args", where, path, dict)
    sigma = _get(sargs, "sigma_min", f"{where}args.", path, (int, float))
    params = _get(spec, "params", where, path, dict) if "params" in spec else {}
    unknown = sorted(set(params) - set(_SAMPLER_PARAMS))
    if unknown:
        raise ConfigError(f"{path}: {where}params has keys recon3d's sampler does not take: {unknown} (known: {list(_SAMPLER_PARAMS)})")
    out = {}
    for k, v in params.items():
        if k == "cfg_interval":
            if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(isinstance(x, (int, float)) for x in v):
                raise ConfigError(f"{path}: {where}params.cfg_interval must be [lo, hi], got {v!r}")
            out[k] = (float(v[0]), float(v[1]))
        elif k == "steps":
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{path}: {where}params.steps must be an integer >= 1, got {v!r}")
            out[k] = v
        else:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"{path}: {where}params.{k} must be a number, got {v!r}")
            out[k] = float(v)
    return SamplerSpec(name, float(sigma), out)


def _vector(norm: dict, key: str, path: Path) -> list[float]:
    v = _get(norm, key, "args.slat_normalization.", path, list)
    if not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise ConfigError(f"{path}: args.slat_normalization.{key} must be a non-empty list of numbers")
    return [float(x) for x in v]


def read_pipeline_json(path: str | Path) -> TrellisPipelineConfig:
    """Read and check a TRELLIS ``pipeline.json`` (a file, or the folder holding it)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "pipeline.json"
    if not p.is_file():
        raise ConfigError(f"TRELLIS pipeline file {str(p)!r} not found (expected <model folder>/pipeline.json "
                          "beside ckpts/; nothing is downloaded)")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    name = _get(cfg, "name", "", p, str)
    if name not in PIPELINE_CLASSES:
        raise ConfigError(f"{p}: 'name' names an unknown pipeline class {name!r}; expected one of {list(PIPELINE_CLASSES)}")
    args = _get(cfg, "args", "", p, dict)
    models = _get(args, "models", "args.", p, dict)
    resolved = {}
    for role, rel in models.items():
        if not isinstance(rel, str) or not rel:
            raise ConfigError(f"{p}: args.models.{role} must be a checkpoint path such as 'ckpts/<name>', got {rel!r}")
        resolved[role] = (p.parent / rel).resolve() if not Path(rel).is_absolute() else Path(rel)
    norm = _get(args, "slat_normalization", "args.", p, dict)
    mean, std = _vector(norm, "mean", p), _vector(norm, "std", p)
    if len(mean) != len(std):
        raise ConfigError(f"{p}: args.slat_normalization mean ({len(mean)}) and std ({len(std)}) differ in length")
    if any(s <= 0 for s in std):
        raise ConfigError(f"{p}: args.slat_normalization.std must be > 0 everywhere, got {std}")
    cond = _get(args, "image_cond_model", "args.", p, str)
    return TrellisPipelineConfig(p, name, resolved, _sampler(args, "sparse_structure_sampler", p),
                                 _sampler(args, "slat_sampler", p), mean, std, cond)
