"""Issue 13: a geometry metric that cannot be computed says why in ``metrics.json``; bad
protocol options are :class:`ConfigError` (still a ``ValueError``)."""

from __future__ import annotations

import json

import pytest
import torch
from tests.methods.test_gtr import _module, batch  # noqa: F401  (batch is a fixture)

from recon3d.errors import ConfigError
from recon3d.metrics.protocol import EvaluationProtocol


@pytest.mark.parametrize("kw, key", [
    ({"image_metrics": ["psnr", "bogus"]}, "evaluation.image_metrics: unknown ['bogus']"),
    ({"image_metrics": "psnr"}, "evaluation.image_metrics: expected a list"),
    ({"num_points": 0}, "evaluation.num_points: expected an integer >= 1, got 0"),
    ({"geometry_preset": "nope"}, "evaluation.geometry_preset: expected one of"),
])
def test_bad_options_are_config_errors(kw, key):
    with pytest.raises(ConfigError) as e:
        EvaluationProtocol(**kw)
    assert key in str(e.value) and isinstance(e.value, ValueError)


def _sphere(n, seed, r=1.0):
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1) * r
    return p


class _Stub:
    """The pieces of a ReconModule that ``_eval_geometry`` uses, with a scripted prediction."""

    GEOMETRY_METRICS = ("cd", "fscore", "precision", "recall", "nc")
    empty_surface_reason = "empty"

    def __init__(self, evaluation, geo):
        self.evaluation, self._geo = evaluation, geo

    def reconstruct(self, b):
        from recon3d.representations.reconstruction import Reconstruction

        return Reconstruction(list(b.object_ids), None)

    def reconstruction_meshes(self, rec, b):
        return None

    def reconstruction_geometry(self, rec, b):
        return self._geo


class _Batch:
    def __init__(self, ids, gt):
        from recon3d.data.batch import Geometry

        self.object_ids = ids
        self.geometry = Geometry(surface_points=gt)


def test_objects_without_surface_are_noted_and_the_rest_scored(tmp_path):
    from recon3d.methods.base import ReconModule

    gt = torch.stack([_sphere(300, 0), _sphere(300, 1)])
    pred = torch.stack([_sphere(300, 2) * 1.1, torch.zeros(300, 3)])
    geo = {"points": pred, "valid": torch.tensor([True, False]), "invalid_reason": "empty surface: density below 10"}
    ev = EvaluationProtocol(image_metrics=("psnr",), geometry_preset="raw", num_points=300)
    ReconModule._eval_geometry(_Stub(ev, geo), _Batch(["good", "empty"], gt))
    alone = EvaluationProtocol(image_metrics=("psnr",), geometry_preset="raw", num_points=300)
    alone.update_geometry(["good"], pred[:1], gt[:1])
    assert ev.compute()["cd"] == pytest.approx(alone.compute()["cd"], rel=1e-12)
    doc = json.loads((ev.write(tmp_path) / "metrics.json").read_text())
    assert doc["missing_metrics"] == {}  # cd exists (over 1 object) ...
    assert doc["notes"] == [{"reason": "empty surface: density below 10", "metrics": ["cd", "fscore", "precision", "recall"],
                             "num_objects": 1, "objects": ["empty"]}]  # ... and the note says which object it lacks


def test_untrained_gtr_says_why_cd_is_missing(tmp_path, batch):  # noqa: F811
    ev = EvaluationProtocol(image_metrics=("psnr",), num_points=256)
    model = _module(evaluation=ev, mesh_density_level=1e6)  # far above any density: no surface
    model.eval()
    model._eval_geometry(batch)
    doc = json.loads((ev.write(tmp_path) / "metrics.json").read_text())
    assert "cd" not in doc["metrics"]
    n = len(batch.object_ids)
    assert doc["missing_metrics"]["cd"] == f"empty surface: the density never reaches mesh_density_level 1e+06 ({n} objects)"
    assert doc["notes"][0]["objects"] == sorted(batch.object_ids)
    ev.reset()
    assert ev.notes_summary() == ([], {})
